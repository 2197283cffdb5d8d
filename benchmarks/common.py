"""What more than one benchmark uses: the model shapes, and the loader's test data (tiny recipe, stage 2)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crystal_lm.config import Recipe

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (d_model, n_layers, n_heads, d_ff, vocab, seq_len)
    "demo": (128, 4, 4, 341, 4096, 256),
    "1.3b": (2048, 24, 16, 5461, 32032, 2048),
}


def result_tag(device_name: str | None) -> str:
    """The results file's suffix: "cpu", or the GPU's model ("h100" for "NVIDIA H100 80GB HBM3", "h200")."""
    if device_name is None:
        return "cpu"
    words = [w.lower() for w in device_name.replace("-", " ").split() if w.upper() != "NVIDIA"]
    model = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
    return "".join(c for c in model if c.isalnum())


def tiny_recipe(edit: Callable[[dict], None]) -> Recipe:
    """recipes/tiny.yaml with `edit(raw)` applied to its raw dict before validation."""
    import yaml

    from crystal_lm.config import recipe_from_dict

    raw = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    edit(raw)
    return recipe_from_dict(raw, str(REPO / "recipes" / "tiny.yaml"))


def tiny_stage(seq_len: int, batch_size: int, stage_index: int = 1):  # -> StageData
    """Stage 2 of recipes/tiny.yaml (FIM 0.9 on 63 % code, the heaviest for the loader) at `seq_len` with
    `batch_size` rows a step, its data prepared (cached under the repository's .cache)."""
    from crystal_lm.data.loader import StageData
    from crystal_lm.data.prepare import prepare_data

    def edit(raw: dict) -> None:
        raw["data"]["seq_len"] = raw["model"]["max_seq_len"] = seq_len
        raw["train"]["batch_size"] = batch_size

    os.chdir(REPO)  # the recipe's cache_dir is relative to the repository
    recipe = tiny_recipe(edit)
    return StageData(recipe, prepare_data(recipe), stage_index)
