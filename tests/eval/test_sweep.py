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
    assert len(partial) == 4  # two checkpoints finished both tasks before the interruption
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
