"""What more than one benchmark uses: the model shapes, and the loader's test data (tiny recipe, stage 2)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (d_model, n_layers, n_heads, d_ff, vocab, seq_len)
    "demo": (128, 4, 4, 341, 4096, 256),
    "1.3b": (2048, 24, 16, 5461, 32032, 2048),
}


def tiny_stage(seq_len: int, batch_size: int, stage_index: int = 1):  # -> StageData
    """Stage 2 of recipes/tiny.yaml (FIM 0.9 on 63 % code, the heaviest for the loader) at `seq_len` with
    `batch_size` rows a step, its data prepared (cached under the repository's .cache)."""
    import yaml

    from crystal_lm.config import recipe_from_dict
    from crystal_lm.data.loader import StageData
    from crystal_lm.data.prepare import prepare_data

    os.chdir(REPO)  # the recipe's cache_dir is relative to the repository
    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    raw["data"]["seq_len"] = raw["model"]["max_seq_len"] = seq_len
    raw["train"]["batch_size"] = batch_size
    recipe = recipe_from_dict(raw, str(REPO / "recipes" / "tiny.yaml"))
    return StageData(recipe, prepare_data(recipe), stage_index)
