"""Building shards on an existing distributed engine: datatrove's executors (local, Slurm, Ray).

The engine only builds units (the expensive part: read, normalise, tokenize, pack), each task taking every
`world_size`-th unit of every unfinished source (a source capped by `max_bytes` is built whole by one task,
in unit order, as its prefix is spent); the results land in the shared cache exactly where a local build
puts them. `prepare_data` then finds the units done and only merges them, so the result is the same
shards as a local build, and a task that failed is simply redone by running the engine (or
`prepare_data`) again.

    from datatrove.executor import SlurmPipelineExecutor
    steps = datatrove_steps("recipes/crystal-7b.yaml")       # trains the tokenizer first if needed
    SlurmPipelineExecutor(pipeline=steps, tasks=512, ...).run()
    prepare_data(load_recipe("recipes/crystal-7b.yaml"))     # merge
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from crystal_lm.config import load_recipe
from crystal_lm.data.build import build_unit, build_units
from crystal_lm.data.prepare import plan_data


class BuildShardUnits(PipelineStep):
    """A datatrove step that builds this task's share of a recipe's shard units."""

    name = "crystal-lm shard units"
    type = "✂️ - TOKENIZER"

    def __init__(self, recipe_path: str, cache_dir: str | None = None) -> None:
        super().__init__()
        self.recipe_path, self.cache_dir = recipe_path, cache_dir

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        recipe = load_recipe(self.recipe_path)
        if self.cache_dir:
            recipe.data.cache_dir = self.cache_dir
        plan = plan_data(recipe)  # the tokenizer already exists: `datatrove_steps` made it
        todo = [sp for sp in plan.sources.values() if not sp.done]
        work = [(sp, u) for sp in todo if sp.spec.max_bytes is None for u in sp.units]
        for sp, unit in work[rank::world_size]:
            record = build_unit(sp.spec, unit, sp.root / "units")
            self.stat_update("units")
            self.stat_update("documents", value=sum(s["documents"] for s in record["splits"].values()))
        for sp in todo[rank::world_size]:  # a `max_bytes` prefix is spent in unit order, by one task
            if sp.spec.max_bytes is not None:
                records = build_units(sp.spec, sp.units, sp.root, workers=1)
                self.stat_update("units", value=len(records))
        yield from data or ()


def datatrove_steps(recipe_path: str | Path, cache_dir: str | None = None) -> list[PipelineStep]:
    """The pipeline to give a datatrove executor. Runs the once-only part (corpus, tokenizer) here first,
    so the engine's tasks never race to train a tokenizer."""
    recipe = load_recipe(str(recipe_path))
    if cache_dir:
        recipe.data.cache_dir = cache_dir
    plan_data(recipe)
    return [BuildShardUnits(str(recipe_path), cache_dir)]
