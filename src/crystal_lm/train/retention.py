"""Which checkpoints a run keeps (`train.keep_last`, `keep_every`, every stage's end), and removing one so
that a kill half-way never leaves a checkpoint-named folder with part of its files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from crystal_lm.config import Recipe
from crystal_lm.train.checkpoint import checkpoint_position, list_checkpoints


def _position(checkpoint: Path, recipe: Recipe) -> tuple[int, int, int] | None:
    """(stage index, step in the stage, global step) of a checkpoint, from its name and the recipe: no file
    inside it is read, so a damaged folder (a kill in the middle of its removal) still has a position."""
    where = checkpoint_position(checkpoint)
    if where is None or not 1 <= where[0] <= len(recipe.stages):
        return None
    stage, step = where[0] - 1, where[1]
    return stage, step, sum(recipe.stage_steps(s) for s in recipe.stages[:stage]) + step


def is_permanent(checkpoint: Path, recipe: Recipe) -> bool:
    """Kept for good by the retention policy: every checkpoint when there is none, else stage ends and
    every `keep_every`-th global step."""
    t = recipe.train
    where = _position(checkpoint, recipe)
    if t.keep_last is None or where is None:
        return True
    stage, step, global_step = where
    stage_end = step == recipe.stage_steps(recipe.stages[stage])
    return stage_end or (t.keep_every is not None and global_step % t.keep_every == 0)


def remove_checkpoint(checkpoint: Path) -> None:
    """Rename out of the checkpoint namespace first (to a hidden `.NAME.tmp-removed` folder, which
    `clean_partial` also clears), then delete: a kill half-way never leaves a checkpoint-named folder with
    part of its files for a later run to trip over."""
    trash = checkpoint.with_name(f".{checkpoint.name}.tmp-removed")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: Path, recipe: Recipe) -> list[str]:
    """Apply the retention policy; returns the names removed. The newest `keep_last` checkpoints, each stage's
    end and every `keep_every`-th global step are kept; the others are removed (damaged ones too: what is
    permanent is decided by the name)."""
    t = recipe.train
    if t.keep_last is None:
        return []
    everything = list_checkpoints(root)
    doomed = [c for c in everything[: max(0, len(everything) - t.keep_last)] if not is_permanent(c, recipe)]
    for ckpt in doomed:
        remove_checkpoint(ckpt)
    return [c.name for c in doomed]
