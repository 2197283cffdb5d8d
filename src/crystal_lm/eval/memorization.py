"""Memorization across checkpoints (Biderman et al., 2023): does greedy decoding reproduce trained text?

Probes are samples the data order says a checkpoint was trained on: a fixed, evenly spread set of global
sample indices per stage, of which a checkpoint uses those its steps have covered. Each probe's first
`prompt` tokens (exactly as trained: FIM'd where FIM applied, positions from 0) are the prompt; the score is
the fraction of the next `continuation` greedy tokens equal to the trained ones, and `exact` the share of
probes reproduced in full. Held-out validation windows scored the same way are the control: the gap between
the two is memorization rather than ordinary prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crystal_lm.config import Recipe
from crystal_lm.data.loader import StageData
from crystal_lm.data.prepare import PreparedData
from crystal_lm.eval.generate import Sampling, generate_batch
from crystal_lm.model import CrystalModel


def probe_indices(recipe: Recipe, stage_index: int, per_stage: int) -> list[int]:
    """The fixed probe samples of a stage: `per_stage` global indices spread evenly over the stage."""
    total = recipe.stage_steps(recipe.stages[stage_index]) * recipe.train.batch_size
    return sorted({int(i) for i in np.linspace(0, total - 1, min(per_stage, total)).round()})


def _match(model: CrystalModel, sequences: list[np.ndarray], prompt: int, continuation: int) -> list[float]:
    greedy = Sampling(max_new_tokens=continuation, temperature=0.0)
    scores = []
    for start in range(0, len(sequences), 16):
        chunk = sequences[start : start + 16]
        out = generate_batch(model, [s[:prompt].tolist() for s in chunk], greedy, stop_ids=set())
        for seq, got in zip(chunk, out, strict=True):
            want = seq[prompt : prompt + continuation].tolist()
            scores.append(sum(a == b for a, b in zip(got, want, strict=False)) / len(want))
    return scores


def _summary(scores: list[float]) -> dict[str, float | int | None]:
    if not scores:
        return {"score": None, "exact": None, "n": 0}
    return {
        "score": float(np.mean(scores)),
        "exact": float(np.mean([s == 1.0 for s in scores])),
        "n": len(scores),
    }


def memorization(
    model: CrystalModel,
    recipe: Recipe,
    data: PreparedData,
    stage_index: int,
    step: int,
    per_stage: int = 32,
    prompt: int = 32,
    continuation: int = 32,
) -> dict[str, Any]:
    """Memorization of a checkpoint that finished `step` steps of stage `stage_index` (0-based)."""
    prompt = min(prompt, recipe.data.seq_len // 2)
    continuation = min(continuation, recipe.data.seq_len + 1 - prompt)
    B = recipe.train.batch_size
    per_stage_scores: dict[str, dict] = {}
    trained: list[float] = []
    for s in range(stage_index + 1):
        covered = (step if s == stage_index else recipe.stage_steps(recipe.stages[s])) * B
        stage_data = StageData(recipe, data, s)
        sequences = []
        for g in (i for i in probe_indices(recipe, s, per_stage) if i < covered):
            input_ids, labels, *_ = stage_data.sample(g)
            sequences.append(np.concatenate([input_ids, labels[-1:]]))
        scores = _match(model, sequences, prompt, continuation)
        per_stage_scores[recipe.stages[s].name] = _summary(scores)
        trained += scores
    heldout = []
    for name in sorted(data.val):
        shards = data.val[name]
        windows = (shards.window(i) for i in range(len(shards)))
        usable = [w.tokens for w in windows if w.valid >= prompt + continuation]
        heldout += usable[: max(1, per_stage // len(data.val))]
    control = _summary(_match(model, heldout, prompt, continuation))
    reason = {}
    if not trained:  # say why the score is empty rather than leave a bare null
        reason["reason"] = (
            f"no probe sample lies before this checkpoint (stage {stage_index + 1}, step {step}) in the "
            "data order: nothing known to be trained on yet"
        )
    return {
        **_summary(trained),
        **reason,
        "heldout_score": control["score"],
        "heldout_exact": control["exact"],
        "heldout_n": control["n"],
        "per_stage": per_stage_scores,
        "prompt_tokens": prompt,
        "continuation_tokens": continuation,
    }
