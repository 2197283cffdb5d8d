"""Training end to end on the small real corpus: stages in order, checkpoints, logs, and exact resume after
kill -9 and Ctrl-C."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from crystal_lm.config import load_recipe, recipe_from_dict
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_optimizer_state,
    verify_checkpoint,
)
from crystal_lm.train.metrics import read_jsonl
from crystal_lm.train.trainer import RunDirError, train


def test_run_writes_crystal_named_checkpoints_and_logs(trained_run):
    _recipe, run_dir, summary = trained_run
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == [
        "phase1_checkpoint_000003",
        "phase1_checkpoint_000006",
        "phase2_checkpoint_000003",
        "phase2_checkpoint_000006",
        "phase3_checkpoint_000002",
        "phase3_checkpoint_000004",
    ]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert len(metrics) == 16 and [m["global_step"] for m in metrics] == list(range(1, 17))
    for m in metrics:
        assert {"stage", "step", "tokens", "loss", "grad_norm", "lr", "tokens_per_s"} <= set(m)
        assert m["lr"]["hidden"] == pytest.approx(m["lr"]["embedding"] * 16 / 32)  # muP: base LR / m_d
        assert m["lr"]["no_decay"] == m["lr"]["embedding"]
    assert metrics[-1]["tokens"] == 16 * 4 * 64
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["checkpoint"] for e in evals] == [None, *names]  # the untrained model, then every checkpoint
    for e in evals:
        assert {"text", "code", "prose", "technical", "python", "web"} <= set(e["val_loss"])
    assert summary["complete"] and [s["name"] for s in summary["stages"]] == ["stage1", "stage2", "stage3"]
    for s in summary["stages"]:
        assert s["tokens"] > 0 and s["wall_s"] > 0 and {"text", "code"} <= set(s["val_loss"])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["stages"][1]["val_loss"] == summary["stages"][1]["val_loss"]


def test_stage2_keeps_the_optimizer_and_stage3_starts_fresh(trained_run):
    _, run_dir, _ = trained_run

    def adam_steps(name):
        state = read_optimizer_state(run_dir / "checkpoints" / name)["state"]
        return {int(v["step"]) for v in state.values()}

    assert adam_steps("phase1_checkpoint_000006") == {6}
    assert adam_steps("phase2_checkpoint_000006") == {12}  # moments carried over from stage 1
    assert adam_steps("phase3_checkpoint_000004") == {4}  # fresh optimizer from the stage-2 weights


def test_rerunning_a_finished_run_changes_nothing(trained_run):
    recipe, run_dir, summary = trained_run
    before = (run_dir / "metrics.jsonl").read_text()
    again = train(recipe, run_dir)
    assert again["stages"] == summary["stages"]
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_another_recipe_cannot_take_over_a_run_folder(trained_run, recipe_dict):
    _, run_dir, _ = trained_run
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["tokens"] *= 2
    with pytest.raises(RunDirError, match="another recipe"):
        train(recipe_from_dict(d), run_dir)


def test_resuming_with_changed_tokenizer_or_data_is_refused(trained_run, prepared, tmp_path):
    """Same recipe, same paths, different contents: resuming must refuse, naming both tokenizer hashes or the
    source whose shards changed, instead of training on other token ids or another data order."""
    recipe, run_dir, _ = trained_run
    _, data = prepared
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    before = (run_copy / "metrics.jsonl").read_text()

    other_tok = tmp_path / "tokenizer.json"  # the same vocabulary, other bytes: another file as far as ids go
    other_tok.write_text(json.dumps(json.loads(data.tokenizer.path.read_text()), indent=3))
    changed = dataclasses.replace(data, tokenizer=Tokenizer(other_tok))
    with pytest.raises(RunDirError, match="tokenizer") as err:
        train(recipe, run_copy, data=changed)
    assert data.tokenizer.sha256[:16] in str(err.value) and changed.tokenizer.sha256[:16] in str(err.value)

    manifest = json.loads((run_copy / "data_manifest.json").read_text())
    manifest["sources"]["python"]["train"]["shards"][0]["sha256"] = "0" * 64
    (run_copy / "data_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="python/train"):
        train(recipe, run_copy, data=data)
    (run_copy / "data_manifest.json").write_text(json.dumps(manifest)[:100])  # a torn record names itself
    with pytest.raises(RunDirError, match=r"data_manifest\.json: unreadable"):
        train(recipe, run_copy, data=data)
    assert (run_copy / "metrics.jsonl").read_text() == before  # nothing trained on the wrong data


def test_damaged_newest_checkpoint_is_skipped(trained_run, tmp_path, caplog):
    _, run_dir, _ = trained_run
    copy_dir = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", copy_dir)
    newest = copy_dir / "phase3_checkpoint_000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    (copy_dir / ".phase3_checkpoint_000006.tmp123").mkdir()  # a save killed half-way
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(copy_dir).name == "phase3_checkpoint_000002"
    assert "phase3_checkpoint_000004" in caplog.text and "checksum mismatch" in caplog.text


def test_a_checkpoint_is_checked_for_what_every_one_holds_not_only_what_its_checksums_list(
    trained_run, tmp_path, caplog
):
    """A checksums.json emptied (or cut short) let a truncated model pass, and training then crashed on it; a
    mid-stage checkpoint without optimizer state was resumed with a fresh AdamW, silently."""
    _, run_dir, _ = trained_run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    newest = root / "phase3_checkpoint_000004"
    (newest / "checksums.json").write_text("{}")
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"checksums\.json does not cover model\.safetensors"):
        verify_checkpoint(newest)
    mid = root / "phase3_checkpoint_000002"
    sums = json.loads((mid / "checksums.json").read_text())
    (mid / "checksums.json").write_text(json.dumps({k: v for k, v in sums.items() if "optimizer/" not in k}))
    shutil.rmtree(mid / "optimizer")
    verify_checkpoint(mid)  # still a whole model (eval and export may use it) ...
    with caplog.at_level("WARNING"):  # ... but not one to resume from
        assert latest_checkpoint(root, resumable=True).name == "phase2_checkpoint_000006"
    assert "phase3_checkpoint_000002" in caplog.text and "no optimizer state" in caplog.text


def test_a_run_whose_checkpoints_are_all_damaged_is_not_trained_over(trained_run, tmp_path):
    """With no checkpoint left to resume from, training started again from step 0, wrote over the damaged
    checkpoints one by one and cut metrics.jsonl and eval.jsonl to the new run's few lines."""
    recipe, run_dir, _ = trained_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    for ckpt in list_checkpoints(copy_dir / "checkpoints"):
        (ckpt / "COMPLETE").unlink()
    metrics = (copy_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="none of its checkpoints can be resumed from"):
        train(recipe, copy_dir)
    assert (copy_dir / "metrics.jsonl").read_text() == metrics


def test_a_second_trainer_on_the_same_run_folder_is_refused(small_recipe, prepared, tmp_path):
    """Two trainers on one folder (a rerun while the first still ran, or torchrun workers outliving their
    killed launcher) both trained and wrote checkpoints; one's log lines went to a file the other replaced."""
    from crystal_lm.train.run_dir import run_dir_lock

    _, data = prepared
    run = tmp_path / "run"
    held = pytest.raises(RunDirError, match=rf"another training process \(pid {os.getpid()}\)")
    with run_dir_lock(run), held:  # as a first trainer holds it
        train(small_recipe, run, data=data, stop_after_steps=1)
    assert not (run / "checkpoints").exists()
    assert train(small_recipe, run, data=data, stop_after_steps=1) == {"stopped_at": 1}  # released


def test_a_torchrun_worker_stops_when_its_launcher_is_gone(small_recipe, prepared, tmp_path, monkeypatch):
    """torchrun starts workers in their own sessions: after a kill -9 of the launcher they trained on alone."""
    _, data = prepared
    from crystal_lm.train import trainer

    # The launcher at the start and at steps 1 and 2; then PID 1 adopts the worker.
    parents = iter([4242, 4242, 4242])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(trainer, "parent_pid", lambda: next(parents, 1))
    with pytest.raises(RunDirError, match=r"torchrun launcher \(pid 4242\) is gone; the workers stop at"):
        train(small_recipe, tmp_path / "run", data=data)
    assert [m["global_step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# ------------------------------------------------------------------------------------------ resume


def _resume_recipe(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["model"].update(d_model=64, n_heads=4)
    for st, steps in zip(d["stages"], (20, 20, 15), strict=True):
        st["tokens"] = steps * 4 * 64
        st["checkpoint_every"] = 5
    d["stages"][0]["lr"]["decay_steps"] = 50
    return d


def _cli(recipe_path, out_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "crystal_lm.cli", "train", str(recipe_path), "--out", str(out_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_checkpoints(proc, root, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list_checkpoints(root)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended before {n} checkpoints: {proc.stdout.read().decode()[-2000:]}"
            )
        time.sleep(0.005)
    raise AssertionError("timed out waiting for checkpoints")


def test_kill_and_ctrl_c_then_resume_equals_an_uninterrupted_run(
    recipe_dict, write_recipe, tmp_path, prepared, caplog
):
    path = write_recipe(_resume_recipe(recipe_dict))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(load_recipe(path), straight)  # uninterrupted (in this process: the same computation)

    proc = _cli(path, broken)
    _wait_for_checkpoints(proc, broken / "checkpoints", 2)
    proc.send_signal(signal.SIGKILL)  # kill -9, mid-run
    proc.wait()
    assert not (broken / "summary.json").exists()
    killed_at = len(list_checkpoints(broken / "checkpoints"))

    proc = _cli(path, broken)
    _wait_for_checkpoints(proc, broken / "checkpoints", killed_at + 3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out = proc.communicate()[0].decode()
    assert proc.returncode == 130, out
    assert not (broken / "summary.json").exists()

    with caplog.at_level(logging.INFO, logger="crystal_lm.train.trainer"):
        train(load_recipe(path), broken)  # the same command again, to the end
    assert "resuming from" in caplog.text

    a = read_jsonl(straight / "metrics.jsonl")
    b = read_jsonl(broken / "metrics.jsonl")
    assert [m["global_step"] for m in b] == list(range(1, 56))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [p.name for p in list_checkpoints(straight / "checkpoints")] == [
        p.name for p in list_checkpoints(broken / "checkpoints")
    ]
    from safetensors.torch import load_file

    final = "checkpoints/phase3_checkpoint_000015/model.safetensors"
    wa, wb = load_file(str(straight / final)), load_file(str(broken / final))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-exact
    assert (
        json.loads((straight / "summary.json").read_text())["stages"][2]["val_loss"]
        == json.loads((broken / "summary.json").read_text())["stages"][2]["val_loss"]
    )


# --------------------------------------------------------------------------------------- retention


def test_checkpoints_are_ordered_by_stage_and_step_numbers(recipe_dict, prepared, tmp_path):
    """With 10+ stages, phase10 is newer than phase9 (as text it sorts first): retention must not remove the
    newest checkpoint and a resume must start from it."""
    _, data = prepared
    d = copy.deepcopy(recipe_dict)
    first = d["stages"][0]
    d["stages"] = [
        {**copy.deepcopy(first), "name": f"s{i + 1}", "tokens": 2 * 4 * 64, "checkpoint_every": 1}
        for i in range(11)
    ]
    d["train"]["keep_last"] = 1
    recipe = recipe_from_dict(d)
    train(recipe, tmp_path, data=data, stop_after_steps=19)  # stage 10, step 1
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "phase10_checkpoint_000001"
    names = [p.name for p in list_checkpoints(root)]
    assert names == [f"phase{i}_checkpoint_000002" for i in range(1, 10)] + ["phase10_checkpoint_000001"]


def test_list_checkpoints_orders_steps_past_a_million(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    real = run_dir / "checkpoints" / "phase1_checkpoint_000003"
    for name in ("phase1_checkpoint_999999", "phase1_checkpoint_1000000", "phase2_checkpoint_000001"):
        shutil.copytree(real, tmp_path / name)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "phase1_checkpoint_999999",
        "phase1_checkpoint_1000000",
        "phase2_checkpoint_000001",
    ]


def test_pruning_survives_a_damaged_old_checkpoint_and_removes_by_rename(
    trained_run, recipe_dict, tmp_path, monkeypatch
):
    """A kill in the middle of removing a checkpoint used to leave a checkpoint-named folder without
    state.json, and every later prune failed on it. Removal now renames first; damaged ones are pruned too."""
    from crystal_lm.train import retention
    from crystal_lm.train.checkpoint import clean_partial

    _, run_dir, _ = trained_run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    for name in ("state.json", "COMPLETE"):  # what an interrupted rmtree of the old code left
        (root / "phase1_checkpoint_000003" / name).unlink()
    d = copy.deepcopy(recipe_dict)
    d["train"]["keep_last"] = 1
    recipe = recipe_from_dict(d)

    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if str(path).endswith(".tmp-removed") and os.path.exists(path):
            raise KeyboardInterrupt  # killed while deleting
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        retention.prune_checkpoints(root, recipe)
    assert "phase1_checkpoint_000003" not in [p.name for p in list_checkpoints(root)]
    monkeypatch.setattr(retention.shutil, "rmtree", real_rmtree)
    clean_partial(root)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []

    removed = retention.prune_checkpoints(root, recipe)
    assert removed == ["phase2_checkpoint_000003", "phase3_checkpoint_000002"]
    assert [p.name for p in list_checkpoints(root)] == [
        "phase1_checkpoint_000006",
        "phase2_checkpoint_000006",
        "phase3_checkpoint_000004",
    ]


# ------------------------------------------------------------------------------------- run folder


def test_a_run_folder_refusal_names_the_keys_and_neutral_keys_may_change(
    trained_run, recipe_dict, prepared, tmp_path
):
    _, run_dir, summary = trained_run
    _, data = prepared
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    record = (run_copy / "recipe.json").read_text()
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["tokens"] *= 2
    d["stages"][2]["lr"]["peak"] = 0.001
    with pytest.raises(RunDirError, match="another recipe") as err:
        train(recipe_from_dict(d), run_copy, data=data)
    assert "stages[0].tokens; stages[2].lr.peak differ" in str(err.value)

    # Description, retention and logging change nothing computed: the run continues (here: is complete).
    d = copy.deepcopy(recipe_dict)
    d["description"] = "a new description"
    d["train"].update(keep_last=5, keep_every=3, log_every=2, tensorboard=False)
    # ... and so does how a step is computed: a run may resume on another layout or number of processes.
    d["train"].update(micro_batch_size=1, loader="thread", parallel="fsdp", activation_checkpointing=True)
    again = train(recipe_from_dict(d), run_copy, data=data)
    assert again["stages"] == summary["stages"]
    assert (run_copy / "recipe.json").read_text() == record  # the record stays the run's first recipe


def test_a_recipe_that_failed_before_training_does_not_lock_the_folder(
    trained_run, recipe_dict, prepared, tmp_path
):
    _, run_dir, _ = trained_run
    _, data = prepared
    ckpt = run_dir / "checkpoints" / "phase1_checkpoint_000003"
    wrong = copy.deepcopy(recipe_dict)
    wrong["model"].update(d_model=64, n_heads=4)  # not the checkpoint's shape
    with pytest.raises(RunDirError, match=r"d_model, n_heads differ"):
        train(recipe_from_dict(wrong), tmp_path / "run", data=data, init_from=ckpt)
    assert (tmp_path / "run" / "recipe.json").is_file()
    # Corrected: the folder holds no training yet, so it is this recipe's.
    out = train(
        recipe_from_dict(recipe_dict), tmp_path / "run", data=data, init_from=ckpt, stop_after_steps=1
    )
    assert out == {"stopped_at": 1}
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["recipe"]["model"]["d_model"] == 32


def test_a_folder_that_is_not_a_run_is_not_trained_into(small_recipe, prepared, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds other files and no crystal-lm run"):
        train(small_recipe, tmp_path, data=prepared[1], stop_after_steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_init_from_is_kept_by_the_run_folder(trained_run, recipe_dict, prepared, tmp_path):
    """A run started with --init-from and interrupted before its first checkpoint started again from a random
    initialisation when rerun without the flag; an --init-from given to a run with checkpoints was ignored."""
    _, run_dir, _ = trained_run
    _, data = prepared
    recipe = recipe_from_dict(recipe_dict)
    start, other = (
        run_dir / "checkpoints" / n for n in ("phase1_checkpoint_000003", "phase2_checkpoint_000003")
    )
    run = tmp_path / "run"
    train(recipe, run, data=data, init_from=start, stop_after_steps=1)  # stopped before a checkpoint
    first = read_jsonl(run / "metrics.jsonl")[0]["loss"]
    record = (run / "init_from.json").read_text()
    train(recipe, run, data=data, stop_after_steps=1)  # the same command without the flag
    assert read_jsonl(run / "metrics.jsonl")[-1]["loss"] == first  # from the recorded start, not random
    assert (run / "init_from.json").read_text() == record  # the path as first given is kept
    train(recipe, tmp_path / "fresh", data=data, stop_after_steps=1)
    assert read_jsonl(tmp_path / "fresh" / "metrics.jsonl")[0]["loss"] != first

    # A record written before the resolved path and weights hash were kept reads as well.
    (run / "init_from.json").write_text(json.dumps({"init_from": str(start), "optimizer": True}))
    train(recipe, run, data=data, stop_after_steps=1)
    assert read_jsonl(run / "metrics.jsonl")[-1]["loss"] == first

    train(recipe, run, data=data, stop_after_steps=3)  # a checkpoint now exists
    with pytest.raises(RunDirError, match=r"began from .*phase1_checkpoint_000003.*--init-from .*phase2"):
        train(recipe, run, data=data, init_from=other)
    assert train(recipe, run, data=data, init_from=start, stop_after_steps=4) == {"stopped_at": 4}


def test_resume_purges_tensorboard_steps_after_the_checkpoint_and_saves_quietly(
    recipe_dict, prepared, tmp_path
):
    """The process that was stopped logged steps 4-5 past its last checkpoint (step 3); the resumed writer
    marks step 4 as a new start, so TensorBoard drops those events instead of showing them twice. A checkpoint
    save or load in one process no longer warns that torch.distributed is disabled."""
    import warnings

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    _, data = prepared
    recipe = recipe_from_dict(recipe_dict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(recipe, tmp_path, data=data, stop_after_steps=5)
        assert latest_checkpoint(tmp_path / "checkpoints").name == "phase1_checkpoint_000003"
        train(recipe, tmp_path, data=data, stop_after_steps=7)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [4]
