"""Using checkpoints: loading one alone, sampling, infilling, validation loss."""

from __future__ import annotations

import pytest

from crystal_lm.eval.generate import Sampling, generate, generate_ids, infill, load_checkpoint
from crystal_lm.eval.validation import validation_indices, validation_loss
from crystal_lm.train.checkpoint import CheckpointError


def test_checkpoint_loads_alone_and_reproduces_its_validation_loss(trained_run, prepared):
    recipe, run_dir, summary = trained_run
    _, data = prepared
    model, tok = load_checkpoint(run_dir / "checkpoints" / "phase2_checkpoint_000006")
    assert tok.sha256 == data.tokenizer.sha256
    val = validation_loss(model, data.val, recipe)
    assert val == pytest.approx(summary["stages"][1]["val_loss"], rel=1e-6)
    newest, _ = load_checkpoint(run_dir)  # a run folder means its newest checkpoint
    assert validation_loss(newest, data.val, recipe) == pytest.approx(
        summary["stages"][2]["val_loss"], rel=1e-6
    )


def test_generation_is_seeded_and_stops_at_limits(trained_run):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    s = Sampling(max_new_tokens=12, temperature=0.9, seed=3)
    a, b = generate(model, tok, "def main(", s), generate(model, tok, "def main(", s)
    assert a == b and isinstance(a, str)
    ids = generate_ids(
        model, [tok.bos_id, *tok.encode("import os\n")], Sampling(max_new_tokens=5, temperature=0), set()
    )
    assert len(ids) == 5
    # Never past the context window.
    long_prompt = [tok.bos_id] * (model.cfg.max_seq_len - 2)
    assert len(generate_ids(model, long_prompt, Sampling(max_new_tokens=50, temperature=0), set())) <= 2


def test_infill_prompts_through_fim_tokens(trained_run, monkeypatch):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    seen = {}
    import crystal_lm.eval.generate as g

    real = g.generate_ids

    def spy(model, prompt, sampling, stop_ids):
        seen["prompt"], seen["stops"] = prompt, stop_ids
        return real(model, prompt, sampling, stop_ids)

    monkeypatch.setattr(g, "generate_ids", spy)
    middle = infill(model, tok, "def add(a, b):\n    ", "\n", Sampling(max_new_tokens=8, temperature=0))
    p = seen["prompt"]
    assert p[0] == tok.fim_prefix_id and p[1] == tok.bos_id and p[-1] == tok.fim_middle_id
    assert tok.fim_suffix_id in p and tok.eos_id in seen["stops"]
    assert isinstance(middle, str)
    infill(model, tok, "x = ", "\n", Sampling(max_new_tokens=4, temperature=0), mode="spm")
    assert seen["prompt"][:2] == [tok.fim_prefix_id, tok.fim_suffix_id]
    with pytest.raises(ValueError, match="psm"):
        infill(model, tok, "a", "b", Sampling(), mode="pms")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_validation_indices_are_fixed_and_spread():
    assert validation_indices(5, 8) == [0, 1, 2, 3, 4]
    idx = validation_indices(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
