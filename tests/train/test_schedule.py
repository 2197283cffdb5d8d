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


def test_a_warmup_longer_than_its_stage_is_named(recipe_dict, write_recipe, capsys):
    """A 200-step warmup on a 6-step stage peaked at 3% of the recipe's LR without a word."""
    from crystal_lm.cli import main
    from crystal_lm.config import recipe_from_dict
    from crystal_lm.train.schedule import schedule_warnings

    assert schedule_warnings(recipe_from_dict(recipe_dict)) == []
    recipe_dict["stages"][2]["lr"]["warmup_steps"] = 200
    (warning,) = schedule_warnings(recipe_from_dict(recipe_dict))
    assert warning == (
        "stage 'stage3': lr.warmup_steps 200 is not shorter than the stage (4 steps), so its LR rises only to "
        "3e-05, not 0.002"
    )
    assert main(["info", str(write_recipe(recipe_dict))]) == 0
    assert f"warning: {warning}" in capsys.readouterr().out
