"""muP coordinate check: flat under muP, growing under standard parametrisation."""

from __future__ import annotations

from crystal_lm.model.coord_check import ACTIVATIONS, CoordCheckConfig, coord_check


def test_mup_is_flat_and_standard_parametrisation_grows(tmp_path):
    cfg = CoordCheckConfig(widths=(64, 128, 256), steps=4)
    results = coord_check(tmp_path, cfg)
    growth = results["growth"]
    for act in ACTIVATIONS:
        assert abs(growth["mup"][act]) < 0.2, (act, growth)
    assert growth["sp"]["attention"] > 0.8 and growth["sp"]["mlp"] > 0.8 and growth["sp"]["logits"] > 0.3
    assert (tmp_path / "coord_check.png").stat().st_size > 20_000
