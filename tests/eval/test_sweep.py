"""Sweeps over a run's checkpoints: keyed records, work done once, interrupted sweeps resume."""

from __future__ import annotations

import pytest

from crystal_lm.eval.sweep import sweep
from crystal_lm.train.metrics import read_jsonl


def test_sweep_covers_every_checkpoint_once_and_resumes(trained_run, tmp_path, monkeypatch):
    recipe, run_dir, summary = trained_run
    store = tmp_path / "results.jsonl"
    import crystal_lm.eval.sweep as sw

    calls = []
    real = sw._code_task

    def counting(loaded, task, settings, limit, seed):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted mid-sweep
        return real(loaded, task, settings, limit, seed)

    monkeypatch.setattr(sw, "_code_task", counting)
    with pytest.raises(KeyboardInterrupt):
        sweep([run_dir], ["val_loss", "humaneval"], store, limit=3, recipe=recipe, log=lambda m: None)
    partial = read_jsonl(store)
    # two checkpoints finished both tasks before the interruption, the third its val_loss: each task's
    # record is written as soon as the task finishes
    assert len(partial) == 5
    assert [r["task"] for r in partial if r["checkpoint"] == partial[-1]["checkpoint"]] == ["val_loss"]
    records = sweep([run_dir], ["val_loss", "humaneval"], store, limit=3, recipe=recipe, log=lambda m: None)
    assert len(records) == 12 and len(read_jsonl(store)) == 12  # 6 checkpoints x 2 tasks, nothing twice
    assert len(calls) == 3 + 4  # the interrupted one is redone, finished ones are not
    again = sweep([run_dir], ["val_loss", "humaneval"], store, limit=3, recipe=recipe, log=lambda m: None)
    assert len(calls) == 7 and [r["key"] for r in again] == [r["key"] for r in records]
    final = next(
        r for r in records if r["checkpoint"] == "phase3_checkpoint_000004" and r["task"] == "val_loss"
    )
    assert final["metrics"]["code"] == pytest.approx(summary["stages"][2]["val_loss"]["code"], rel=1e-6)
    assert final["tokens"] == summary["tokens_seen"]
    he = [r for r in records if r["task"] == "humaneval"]
    assert all(r["metrics"]["n"] == 3 and 0.0 <= r["metrics"]["pass@1"] <= 1.0 for r in he)
    # A different limit is a different key: evaluated anew, old records kept.
    sweep(
        [run_dir / "checkpoints" / "phase1_checkpoint_000003"],
        ["humaneval"],
        store,
        limit=2,
        recipe=recipe,
        log=lambda m: None,
    )
    assert len(read_jsonl(store)) == 13


def test_val_loss_is_evaluated_anew_when_a_setting_that_changes_it_changes(trained_run, tmp_path):
    """val_max_samples, the micro-batch and the precision are part of val_loss's key (not only the data)."""
    import copy

    recipe, run_dir, _ = trained_run
    ckpt = [run_dir / "checkpoints" / "phase1_checkpoint_000003"]
    store = tmp_path / "v.jsonl"
    first = sweep(ckpt, ["val_loss"], store, recipe=recipe, log=lambda m: None)
    assert sweep(ckpt, ["val_loss"], store, recipe=recipe, log=lambda m: None) == first  # reused
    fewer = copy.deepcopy(recipe)
    fewer.data.val_max_samples = 2
    other = sweep(ckpt, ["val_loss"], store, recipe=fewer, log=lambda m: None)
    assert len(read_jsonl(store)) == 2 and other[0]["key"] != first[0]["key"]
    assert other[0]["metrics"] != first[0]["metrics"]  # fewer windows: a different value, not the stored one
    micro = copy.deepcopy(recipe)
    micro.train.micro_batch_size = 1
    sweep(ckpt, ["val_loss"], store, recipe=micro, log=lambda m: None)
    bf16 = copy.deepcopy(recipe)
    bf16.train.precision = "bf16"
    sweep(ckpt, ["val_loss"], store, recipe=bf16, log=lambda m: None)
    assert len({r["key"] for r in read_jsonl(store)}) == 4


def test_a_torn_last_line_is_cut_before_appending_and_a_bad_middle_line_is_an_error(trained_run, tmp_path):
    """A store whose last line a kill cut: the next sweep removes it (redoing that record) and appends after
    whole lines, so every later record stays readable; an invalid line elsewhere names file and line."""
    recipe, run_dir, _ = trained_run
    ckpts = [run_dir / "checkpoints" / n for n in ("phase1_checkpoint_000003", "phase1_checkpoint_000006")]
    store = tmp_path / "results.jsonl"
    sweep(ckpts, ["val_loss"], store, recipe=recipe, log=lambda m: None)
    whole = store.read_text()
    store.write_text(whole[: len(whole) - 40])  # the second record cut mid-line
    assert len(read_jsonl(store)) == 1
    logged = []
    sweep(ckpts, ["val_loss"], store, recipe=recipe, log=logged.append)
    assert "all 1 tasks already" in logged[0] and "val_loss in" in logged[1]  # only the torn one redone
    assert store.read_text() == whole  # the torn line is gone, the redone record on a line of its own
    logged.clear()
    sweep(ckpts, ["val_loss"], store, recipe=recipe, log=logged.append)
    assert all("already" in m for m in logged)  # readable from then on: nothing recomputed

    from crystal_lm.train.metrics import JsonlError

    lines = whole.splitlines(True)
    store.write_text(lines[0][:30] + "\n" + lines[1])
    with pytest.raises(JsonlError, match=rf"{store}:1: not a JSON record"):
        read_jsonl(store)


def test_eval_of_a_hugging_face_folder_says_to_import_it_first(trained_run, tmp_path, capsys):
    from crystal_lm.cli import main
    from crystal_lm.interop.llm360 import export_hf

    _, run_dir, _ = trained_run
    hf = export_hf(run_dir / "checkpoints" / "phase3_checkpoint_000004", tmp_path / "hf")
    assert main(["eval", str(hf), "--store", str(tmp_path / "r.jsonl"), "--tasks", "arc_easy"]) == 2
    assert f"run `crystal import {hf} --out OUT` first" in capsys.readouterr().err


def _resaved(ckpt, out, tokenizer_path=None, **model_over):
    """A copy of a checkpoint with another tokenizer file or other model keys (weights as they are)."""
    import json

    from crystal_lm.train.checkpoint import TrainState, load_tensors, save_checkpoint

    config = json.loads((ckpt / "config.json").read_text())
    config["model"].update(model_over)
    return save_checkpoint(
        out, load_tensors(ckpt), None, TrainState(), config, tokenizer_path or ckpt / "tokenizer.json"
    )


def test_data_tasks_refuse_a_checkpoint_that_does_not_fit_the_recipe(trained_run, tmp_path):
    """Another tokenizer, or a context shorter than the recipe's windows: refused before anything is scored,
    naming both tokenizer hashes / the key (the number would mean nothing)."""
    from crystal_lm.data.tokenizer import Tokenizer, train_bpe
    from crystal_lm.eval.code import BenchmarkError

    recipe, run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "phase1_checkpoint_000003"
    other = train_bpe(
        ["def f(x):\n    return x + 1\n" * 50, "To be or not to be. " * 50], 300, tmp_path / "t.json"
    )
    ours = Tokenizer(ckpt / "tokenizer.json").sha256
    store = tmp_path / "r.jsonl"
    foreign = _resaved(ckpt, tmp_path / "foreign", other.path)
    with pytest.raises(BenchmarkError, match="not this recipe's data tokenizer") as err:
        sweep([foreign], ["val_loss"], store, recipe=recipe, log=lambda m: None)
    assert other.sha256[:16] in str(err.value) and ours[:16] in str(err.value)
    short = _resaved(ckpt, tmp_path / "short", max_seq_len=32)
    with pytest.raises(BenchmarkError, match=r"max_seq_len is 32 there but .* data\.seq_len 64"):
        sweep([ckpt, short], ["memorization"], store, recipe=recipe, log=lambda m: None)
    assert read_jsonl(store) == []  # refused before the first checkpoint was scored
    sweep([_resaved(ckpt, tmp_path / "same")], ["val_loss"], store, recipe=recipe, log=lambda m: None)
    assert len(read_jsonl(store)) == 1


def test_memorization_of_an_imported_checkpoint_says_why_there_is_no_score(
    trained_run, recipe_dict, write_recipe, tmp_path, capsys
):
    """An imported checkpoint has no position in the recipe's data order: the record and the output say so
    (they held score null, n 0 and printed a blank)."""
    from crystal_lm.cli import main
    from crystal_lm.interop.llm360 import export_hf, import_hf

    _, run_dir, _ = trained_run
    hf = export_hf(
        run_dir / "checkpoints" / "phase2_checkpoint_000006",
        tmp_path / "CrystalCoder_phase2_checkpoint_000006",
    )
    ckpt = import_hf(hf, tmp_path / "imported")
    store = tmp_path / "r.jsonl"
    args = [
        "eval",
        str(ckpt),
        "--tasks",
        "memorization",
        "--store",
        str(store),
        "--recipe",
        str(write_recipe(recipe_dict)),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    (record,) = read_jsonl(store)
    reason = record["metrics"]["reason"]
    assert record["metrics"]["score"] is None and record["metrics"]["n"] == 0
    assert "imported checkpoint (phase 2, step 6 of its own training)" in reason and "data order" in reason
    assert (record["stage_index"], record["step"], record["tokens"]) == (1, 6, None)
    assert reason in out and "tokens unknown" in out
    # The run's own checkpoint has the same weights: it is measured, not handed the import's record.
    args[1] = str(run_dir / "checkpoints" / "phase2_checkpoint_000006")
    assert main(args) == 0
    own = read_jsonl(store)[-1]
    assert own["checkpoint"] == "phase2_checkpoint_000006" and own["metrics"]["score"] is not None


def test_data_tasks_need_no_tokenizer_of_the_checkpoint(trained_run, recipe_dict, write_recipe, tmp_path):
    """val_loss reads the recipe's token ids: an import without tokenizer.json was refused for it."""
    import shutil

    from crystal_lm.cli import main
    from crystal_lm.interop.llm360 import export_hf, import_hf

    _, run_dir, _ = trained_run
    hf = export_hf(run_dir / "checkpoints" / "phase1_checkpoint_000003", tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    for extra in hf.glob("tokenizer*"):
        extra.unlink() if extra.is_file() else shutil.rmtree(extra)
    ckpt = import_hf(hf, tmp_path / "imported")
    store = tmp_path / "r.jsonl"
    recipe = str(write_recipe(recipe_dict))
    assert main(["eval", str(ckpt), "--tasks", "val_loss", "--store", str(store), "--recipe", recipe]) == 0
    assert read_jsonl(store)[0]["metrics"]["code"] > 0


def _in_run_of(ckpt, run_dir, recipe_record: dict, fingerprint: str):
    """A copy of a checkpoint inside a run folder `run_dir` that records `recipe_record` (as `claim_run_dir`
    writes recipe.json), its training state naming the recipe `fingerprint` it was trained with."""
    import json

    from crystal_lm.train.checkpoint import load_state, load_tensors, save_checkpoint

    run_dir.mkdir(parents=True)
    body = {"name": recipe_record["name"], "fingerprint": fingerprint, "recipe": recipe_record}
    (run_dir / "recipe.json").write_text(json.dumps(body, default=list))
    state = load_state(ckpt)
    state.recipe_fingerprint = fingerprint
    config = json.loads((ckpt / "config.json").read_text())
    out = run_dir / "checkpoints" / ckpt.name
    return save_checkpoint(out, load_tensors(ckpt), None, state, config, ckpt / "tokenizer.json")


def test_memorization_of_a_checkpoint_of_another_recipe_says_why_there_is_no_score(trained_run, tmp_path):
    """A crystal-lm checkpoint trained with another recipe has no position in this recipe's data order: its
    record says so, as an import's does (it was probed through this recipe's order: score 0.0 of n 4). One of
    this run whose recipe fingerprint differs only by keys added since is measured."""
    import copy

    from crystal_lm.config import recipe_from_dict

    recipe, run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "phase2_checkpoint_000006"
    other_dict = copy.deepcopy(recipe.to_dict()) | {"seed": recipe.seed + 1}
    other = recipe_from_dict(other_dict)
    foreign = _in_run_of(ckpt, tmp_path / "other-run", other.to_dict(), other.fingerprint())
    store = tmp_path / "r.jsonl"
    (record,) = sweep([foreign], ["memorization"], store, recipe=recipe, log=lambda m: None)
    assert record["metrics"]["score"] is None and record["metrics"]["n"] == 0
    reason = record["metrics"]["reason"]
    assert "no position in this recipe's data order" in reason and "seed" in reason, reason
    # The same run, recorded by a version with fewer keys: its fingerprint differs, its recipe does not.
    older = _in_run_of(ckpt, tmp_path / "same-run", recipe.to_dict(), "0123456789abcdef")
    (measured,) = sweep([older], ["memorization"], store, recipe=recipe, log=lambda m: None)
    assert measured["metrics"]["score"] is not None and measured["metrics"]["n"] > 0
    assert measured["key"] != record["key"]


def test_limit_and_seed_are_not_part_of_the_data_tasks_key(trained_run, tmp_path):
    """val_loss and memorization read the recipe's data whatever --limit and --seed say: their records hold
    limit and seed null and another --limit or --seed finds them (each limit recomputed the same value under a
    key of its own). A record an earlier version stored with the limit in its key is still found with it."""
    import json

    from crystal_lm.eval.sweep import record_key

    recipe, run_dir, _ = trained_run
    ckpt = [run_dir / "checkpoints" / "phase1_checkpoint_000003"]
    store = tmp_path / "r.jsonl"
    logged: list[str] = []
    first = sweep(ckpt, ["val_loss", "memorization"], store, limit=2, recipe=recipe, log=logged.append)
    assert [(r["limit"], r["seed"]) for r in first] == [(None, None), (None, None)]
    assert any("--limit" in m and "val_loss, memorization" in m for m in logged), logged
    again = sweep(
        ckpt, ["val_loss", "memorization"], store, limit=3, seed=7, recipe=recipe, log=lambda m: None
    )
    assert again == first and len(read_jsonl(store)) == 2  # found, not computed again
    # An earlier version's record: the limit and seed in its key and fields.
    old = dict(first[0], limit=5, seed=1234)
    old["key"] = record_key(old["weights"], "val_loss", 0, 1234, 5, old["data"], "")
    store.write_text(json.dumps(old) + "\n")
    (found,) = sweep(ckpt, ["val_loss"], store, limit=5, recipe=recipe, log=lambda m: None)
    assert found == old and len(read_jsonl(store)) == 1
