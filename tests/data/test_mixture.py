"""Mixtures as a pure function of (seed, stage, global index)."""

from __future__ import annotations

from collections import Counter

import pytest

from crystal_lm.data.loader import StageData
from crystal_lm.data.mixture import Mixture, allocate


def test_allocation_sums_to_block_and_follows_weights():
    counts = allocate([0.53346, 0.26650, 0.04963, 0.04325, 0.04131, 0.03417, 0.03168], 1024)
    assert counts.sum() == 1024
    assert counts.tolist() == [546, 273, 51, 44, 42, 35, 33]


def test_shares_follow_weights_and_small_sources_wrap():
    m = Mixture({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 5000, "b": 800, "c": 7}, seed=1, stage=0, block=100)
    draws = [m(i) for i in range(3000)]
    share = Counter(s for s, _ in draws)
    assert share == {"a": 1800, "b": 900, "c": 300}
    c_samples = [i for s, i in draws if s == "c"]
    assert set(c_samples) == set(range(7))  # the small source repeats, every sample used
    first_epoch = c_samples[:7]
    assert sorted(first_epoch) == list(range(7))  # each epoch is a permutation
    assert m.epochs(3000)["c"] == pytest.approx(300 / 7)


def test_pure_function_of_seed_stage_and_index():
    sizes = {"a": 1000, "b": 300}
    m1 = Mixture({"a": 0.7, "b": 0.3}, sizes, seed=1, stage=0)
    m2 = Mixture({"a": 0.7, "b": 0.3}, sizes, seed=1, stage=0)
    forward = [m1(i) for i in range(5000)]
    backward = [m2(i) for i in reversed(range(5000))][::-1]
    assert forward == backward  # no hidden state: any index can be computed alone
    assert [Mixture({"a": 0.7, "b": 0.3}, sizes, seed=1, stage=1)(i) for i in range(50)] != forward[:50]
    assert [Mixture({"a": 0.7, "b": 0.3}, sizes, seed=2, stage=0)(i) for i in range(50)] != forward[:50]


def test_batches_are_independent_of_data_parallel_layout(prepared):
    recipe, data = prepared
    stage = StageData(recipe, data, 1)
    whole = stage.batch(3)
    halves = [stage.batch(3, rank=r, world_size=2) for r in (0, 1)]
    import torch

    assert torch.equal(torch.cat([h.input_ids for h in halves]), whole.input_ids)
    assert torch.equal(torch.cat([h.loss_mask for h in halves]), whole.loss_mask)
    prefetched = dict(stage.batches(2, 5))
    assert torch.equal(prefetched[3].input_ids, whole.input_ids)


def test_data_subset_reads_only_its_range_and_wraps_within_it():
    from crystal_lm.data.mixture import Mixture

    m = Mixture(
        {"a": 0.5, "b": 0.5}, {"a": 100, "b": 40}, seed=3, stage=2, subsets={"a": (0.0, 0.1), "b": (0.5, 1.0)}
    )
    draws = [m(i) for i in range(400)]
    a = [s for src, s in draws if src == "a"]
    b = [s for src, s in draws if src == "b"]
    assert set(a) == set(range(10)) and set(b) == set(range(20, 40))  # Crystal's data_subset 0.0-0.1
    assert m.epochs(400)["a"] == 200 / 10  # small subsets repeat, epochs counted over the subset
    full = Mixture({"a": 0.5, "b": 0.5}, {"a": 100, "b": 40}, seed=3, stage=2)
    assert [src for src, _ in draws] == [src for src, _ in (full(i) for i in range(400))]
