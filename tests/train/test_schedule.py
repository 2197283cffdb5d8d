"""Crystal's LR shape: stage 1 stops mid-decay, stage 2 continues the line, stage 3 is fresh and lower."""

from __future__ import annotations

import pytest

from crystal_lm.config import load_recipe
from crystal_lm.train.schedule import LinearSchedule, stage_schedules

from ..conftest import REPO


def test_crystal_7b_schedules_match_the_released_configs():
    recipe = load_recipe(REPO / "recipes" / "crystal-7b.yaml")
    s1, s2, s3 = stage_schedules(recipe)
    assert s1.lr(0) == 0 and s1.lr(43) == pytest.approx(0.006) and s1.lr(86) == pytest.approx(0.012)
    assert s1.lr(79_721) == pytest.approx(0.0087869, abs=1e-7)  # where stage 1 stopped (derived in the spec)
    assert s2.lr(86) == pytest.approx(0.0087825) and s2.lr(214_387) == pytest.approx(0.00013679)
    slope1 = s1.lr(1000) - s1.lr(1001)
    slope2 = s2.lr(1000) - s2.lr(1001)
    assert slope2 == pytest.approx(slope1, rel=1e-3)  # the same decay line
    assert s3.lr(276) == pytest.approx(0.002) and s3.lr(27_728) == pytest.approx(0.0002)


def test_continue_previous_starts_where_the_previous_stage_stopped(small_recipe):
    s1, s2, _ = stage_schedules(small_recipe)
    steps1 = small_recipe.stage_steps(small_recipe.stages[0])
    assert s2.peak == pytest.approx(s1.lr(steps1))
    assert s2.end == s1.end
    # After its warmup, stage 2's LR is stage 1's line continued.
    w = s2.warmup_steps
    assert s2.lr(w + 3) == pytest.approx(s1.lr(steps1 + 3))


def test_linear_schedule_shape():
    s = LinearSchedule(warmup_steps=10, peak=1.0, end=0.1, decay_steps=90)
    assert [s.lr(i) for i in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert (
        s.lr(55) == pytest.approx(0.55)
        and s.lr(100) == pytest.approx(0.1)
        and s.lr(500) == pytest.approx(0.1)
    )
