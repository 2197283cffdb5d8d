"""Shared fixtures: a small real corpus (the embedded sources, cut to a byte budget), its tokenizer and shards,
built once per test session, and a small three-stage recipe shaped like Crystal's."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# Pinned PyPI downloads are shared with `make demo` so neither fetches them twice.
os.environ.setdefault("CRYSTAL_DOWNLOADS", str(REPO / ".cache" / "crystal-lm" / "downloads"))

SMALL_RECIPE = {
    "name": "test-small",
    "seed": 1,
    "data": {
        "seq_len": 64,
        "val_fraction": 0.05,
        "val_max_samples": 8,
        "embedded_max_bytes": 250_000,
        "tokenizer": {"vocab_size": 480, "sample_bytes": 100_000},
        "sources": {
            "prose": {"domain": "text", "embedded": "prose"},
            "technical": {"domain": "text", "embedded": "technical"},
            "python": {"domain": "code", "embedded": "python"},
            "web": {"domain": "code", "embedded": "web"},
        },
    },
    "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "mup": {"base_width": 16},
    "train": {"batch_size": 4, "micro_batch_size": 2, "threads": 1},
    "stages": [
        {
            "name": "stage1",
            "tokens": 4 * 64 * 6,
            "checkpoint_every": 3,
            "mixture": {"prose": 0.5, "technical": 0.45, "python": 0.05},
            "lr": {"warmup_steps": 2, "peak": 0.01, "end": 0.0001, "decay_steps": 20},
        },
        {
            "name": "stage2",
            "tokens": 4 * 64 * 6,
            "checkpoint_every": 3,
            "mixture": {"prose": 0.2, "technical": 0.17, "python": 0.4, "web": 0.23},
            "fim": {"rate": 0.9},
            "lr": {"warmup_steps": 1, "continue_previous": True},
        },
        {
            "name": "stage3",
            "tokens": 4 * 64 * 4,
            "checkpoint_every": 2,
            "reset_optimizer": True,
            "mixture": {"python": 0.45, "web": 0.35, "prose": 0.1, "technical": 0.1},
            "fim": {"rate": 0.3},
            "lr": {"warmup_steps": 1, "peak": 0.002, "end": 0.0002},
        },
    ],
}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crystal-cache")


@pytest.fixture()
def recipe_dict(data_cache) -> dict:
    d = copy.deepcopy(SMALL_RECIPE)
    d["data"]["cache_dir"] = str(data_cache)
    return d


@pytest.fixture()
def small_recipe(recipe_dict):
    from crystal_lm.config import recipe_from_dict

    return recipe_from_dict(recipe_dict)


@pytest.fixture()
def write_recipe(tmp_path):
    """Write a recipe dict as YAML and return its path."""

    def write(d: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def prepared(data_cache):
    """The small recipe's data, prepared once: corpus, tokenizer, train/val shards."""
    from crystal_lm.config import recipe_from_dict
    from crystal_lm.data.prepare import prepare_data

    d = copy.deepcopy(SMALL_RECIPE)
    d["data"]["cache_dir"] = str(data_cache)
    recipe = recipe_from_dict(d)
    return recipe, prepare_data(recipe)


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory):
    """A complete three-stage run of the small recipe (shared by report, generation and CLI tests)."""
    from crystal_lm.train.trainer import train

    recipe, data = prepared
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(recipe, run_dir, data=data)
    return recipe, run_dir, summary
