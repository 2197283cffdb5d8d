"""The prefetching loader: a forked process (or a thread) gives exactly the batches `StageData.batch` does,
reports the child's failure with its traceback, and leaves no process behind."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from crystal_lm.data.loader import StageData


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_prefetched_batches_equal_direct_ones(prepared, worker):
    recipe, data = prepared
    stage = StageData(recipe, data, 1)  # FIM 0.9 on code: the tokenizer runs in the worker
    got = list(stage.batches(1, 5, rank=1, world_size=2, worker=worker))
    assert [step for step, _ in got] == [1, 2, 3, 4]
    for step, batch in got:
        want = stage.batch(step, rank=1, world_size=2)
        assert torch.equal(batch.input_ids, want.input_ids) and batch.input_ids.dtype == torch.int64
        assert torch.equal(batch.labels, want.labels)
        assert torch.equal(batch.loss_mask, want.loss_mask)
        assert (batch.sources, batch.fim_segments) == (want.sources, want.fim_segments)
    assert sum(b.fim_segments for _, b in got) > 0
    assert not [p for p in mp.active_children() if p.name == "crystal-data"]


def test_loader_process_failure_names_the_error(prepared, monkeypatch):
    recipe, data = prepared
    stage = StageData(recipe, data, 0)

    def broken(global_index: int):
        if global_index >= 2 * recipe.train.batch_size:
            raise ValueError(f"shard unreadable at sample {global_index}")
        return StageData.sample(stage, global_index)

    monkeypatch.setattr(stage, "sample", broken)  # the forked child inherits the broken instance
    batches = stage.batches(0, 5, worker="process")
    assert [step for step, _ in (next(batches), next(batches))] == [0, 1]
    with pytest.raises(RuntimeError, match=r"data loader process failed(.|\n)*ValueError: shard unreadable"):
        next(batches)


def test_stopping_early_ends_the_loader_process(prepared):
    recipe, data = prepared
    batches = StageData(recipe, data, 0).batches(0, 50, worker="process")
    next(batches)
    assert [p for p in mp.active_children() if p.name == "crystal-data"]
    batches.close()  # what leaving the training loop early does
    assert not [p for p in mp.active_children() if p.name == "crystal-data"]


def test_a_loader_process_that_dies_is_reported(prepared, monkeypatch):
    import os

    recipe, data = prepared
    stage = StageData(recipe, data, 0)

    def killed(global_index: int):
        if global_index >= recipe.train.batch_size:
            os._exit(3)  # as the kernel's OOM killer would end it: no traceback, no message
        return StageData.sample(stage, global_index)

    monkeypatch.setattr(stage, "sample", killed)
    batches = stage.batches(0, 5, worker="process")
    with pytest.raises(RuntimeError, match=r"stopped \(exit code 3\) without an error message"):
        for _ in range(5):  # step 0's batch may die with the process before it was sent
            next(batches)
