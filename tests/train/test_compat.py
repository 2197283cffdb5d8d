"""One check of a checkpoint against a recipe, for --init-from and for eval's data tasks."""

from __future__ import annotations

import logging

from crystal_lm.model import build_model
from crystal_lm.train.checkpoint import TrainState, load_tensors, save_checkpoint


def test_init_from_a_checkpoint_without_a_tokenizer_warns(trained_run, prepared, tmp_path, caplog):
    """Nothing shows its ids are the recipe's tokenizer's: training starts, but says so (it was silent)."""
    import json

    from crystal_lm.train.trainer import load_initial_weights

    recipe, run_dir, _ = trained_run
    _, data = prepared
    ckpt = run_dir / "checkpoints" / "phase1_checkpoint_000003"
    config = json.loads((ckpt / "config.json").read_text())
    bare = save_checkpoint(tmp_path / "bare", load_tensors(ckpt), None, TrainState(), config, None)
    with caplog.at_level(logging.WARNING):
        load_initial_weights(bare, build_model(recipe.model, recipe.mup), recipe, data.tokenizer.sha256)
    assert f"{bare}: no tokenizer.json" in caplog.text and data.tokenizer.sha256[:16] in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_initial_weights(ckpt, build_model(recipe.model, recipe.mup), recipe, data.tokenizer.sha256)
    assert "no tokenizer.json" not in caplog.text
