"""`crystal plan`: which layouts fit, and how memory and time scale."""

from __future__ import annotations

import pytest

from crystal_lm.config import load_recipe
from crystal_lm.train.plan import GIB, plan

from ..conftest import REPO


def test_crystal_7b_needs_sharding_on_80gb_gpus():
    recipe = load_recipe(str(REPO / "recipes" / "crystal-7b.yaml"))
    by_name = {lay.name: lay for lay in plan(recipe, gpus=8, gpu_memory_gib=80, micro_batch=2)}
    ddp, fsdp = by_name["DDP"], by_name["FSDP2"]
    assert ddp.states_gib == pytest.approx(16 * 6_575_278_720 / GIB)  # fp32 weights, grads, Adam moments
    assert not ddp.fits and fsdp.fits
    assert fsdp.states_gib < ddp.states_gib / 7
    ac = by_name["FSDP2 + activation checkpointing"]
    assert ac.activations_gib < fsdp.activations_gib / 5 and ac.step_s == pytest.approx(fsdp.step_s * 4 / 3)
    wider = {lay.name: lay for lay in plan(recipe, gpus=16, gpu_memory_gib=80, micro_batch=2)}
    assert wider["FSDP2"].step_s == pytest.approx(fsdp.step_s / 2)
    assert wider["FSDP2"].tokens_per_s_per_gpu == pytest.approx(fsdp.tokens_per_s_per_gpu)
