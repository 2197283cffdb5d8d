"""Memorization: probes are the trained samples; a model fitted to them reproduces them, held-out text not."""

from __future__ import annotations

import numpy as np
import torch

from crystal_lm.data.loader import StageData
from crystal_lm.eval.generate import load_checkpoint
from crystal_lm.eval.memorization import memorization, probe_indices


def test_probes_are_only_samples_the_checkpoint_trained_on(trained_run, prepared):
    recipe, run_dir, _ = trained_run
    _, data = prepared
    model, _ = load_checkpoint(run_dir / "checkpoints" / "phase2_checkpoint_000003")
    r = memorization(model, recipe, data, stage_index=1, step=3, per_stage=8)
    stage2_trained = [i for i in probe_indices(recipe, 1, 8) if i < 3 * recipe.train.batch_size]
    assert r["per_stage"]["stage1"]["n"] == len(probe_indices(recipe, 0, 8)) == 8
    assert r["per_stage"]["stage2"]["n"] == len(stage2_trained) and 0 < len(stage2_trained) < 8
    assert "stage3" not in r["per_stage"]
    assert 0.0 <= r["score"] <= 1.0 and r["heldout_n"] > 0
    assert r["prompt_tokens"] == 32 and r["continuation_tokens"] == 32


def test_a_model_fitted_to_the_probes_scores_high_and_heldout_stays_low(trained_run, prepared):
    recipe, run_dir, _ = trained_run
    _, data = prepared
    model, _ = load_checkpoint(run_dir)
    stage = StageData(recipe, data, 0)
    seqs = []
    for g in probe_indices(recipe, 0, 4):
        x, y, *_ = stage.sample(g)
        seqs.append(np.concatenate([x, y[-1:]]))
    batch = torch.from_numpy(np.stack(seqs).astype(np.int64))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # overfit the four probe sequences exactly as they were trained
        opt.zero_grad()
        logits = model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
    model.eval()
    r = memorization(model, recipe, data, stage_index=0, step=1_000_000, per_stage=4)
    assert r["score"] > 0.9 and r["exact"] >= 0.5
    assert r["heldout_score"] < 0.5
