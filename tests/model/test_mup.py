"""muP: Crystal's init standard deviations and truncation, multipliers, and optimizer groups (crystal-spec §1.3)."""

from __future__ import annotations

import pytest
import torch

from crystal_lm.config import ModelConfig, MupConfig, load_recipe
from crystal_lm.model import build_model, param_groups
from crystal_lm.model.mup import init_stds

from ..conftest import REPO


def test_crystal_7b_init_stds_and_multipliers():
    recipe = load_recipe(REPO / "recipes" / "crystal-7b.yaml")
    model = build_model(recipe.model, recipe.mup, device="meta")
    stds = init_stds(model)
    assert stds.embedding == pytest.approx(0.073)
    assert stds.hidden == pytest.approx(0.01825)
    assert stds.output == pytest.approx(0.00228125)
    assert model.logits_scale == pytest.approx(0.13875)
    assert model.embeddings_scale == 14.6
    groups = {g["name"]: g for g in param_groups(model, 0.1, model.width_multiplier)}
    assert groups["hidden"]["lr_scale"] == pytest.approx(0.0625)


def test_init_is_truncated_normal_with_crystal_stds():
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, max_seq_len=64)
    model = build_model(cfg, MupConfig(base_width=64), seed=0)
    stds = init_stds(model)  # m_d = 4: hidden 0.073/2, output 0.0365/sqrt(8)
    assert stds.hidden == pytest.approx(0.0365) and stds.output == pytest.approx(0.0365 / 8**0.5)
    # A normal cut at ±2σ has std 0.8796σ.
    for w, std in (
        (model.wte.weight, stds.embedding),
        (model.blocks[0].attn.c_attn.weight, stds.hidden),
        (model.blocks[1].mlp.c_fc2.weight, stds.hidden),
        (model.blocks[2].attn.c_proj.weight, stds.output),
        (model.blocks[2].mlp.c_proj.weight, stds.output),
    ):
        assert w.abs().max() <= 2 * std + 1e-7
        assert float(w.detach().std()) == pytest.approx(0.8796 * std, rel=0.05)
    assert float(model.blocks[0].mlp.c_fc.bias.detach().abs().max()) == 0.0
    assert float(model.blocks[0].mlp.c_fc2.bias.detach().abs().max()) == 0.0
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(256))


def test_param_groups_follow_crystal():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    model = build_model(cfg, MupConfig(base_width=8), seed=0)
    groups = {g["name"]: g for g in param_groups(model, 0.1, model.width_multiplier)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(model.named_parameters())
    assert id(named["transformer.wte.weight"]) in ids["embedding"]
    assert id(named["transformer.h.0.attn.c_attn.weight"]) in ids["hidden"]
    assert id(named["transformer.h.1.mlp.c_proj.weight"]) in ids["hidden"]
    assert id(named["transformer.h.0.attn.c_attn.bias"]) in ids["no_decay"]
    assert id(named["transformer.ln_f.weight"]) in ids["no_decay"]
    assert groups["hidden"]["lr_scale"] == 0.25 and groups["hidden"]["weight_decay"] == 0.1
    assert groups["embedding"]["lr_scale"] == 1.0 and groups["embedding"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert sum(len(v) for v in ids.values()) == len(named)


def test_width_scaling_at_init():
    """Under muP the embedding output per coordinate does not change with width, while the logits at init
    shrink like 1/sqrt(width) (hidden·E grows like sqrt(d), the multiplier falls like 1/d)."""
    emb, logit = [], []
    tokens = torch.randint(0, 512, (4, 32))
    for width in (64, 256):
        cfg = ModelConfig(vocab_size=512, d_model=width, n_layers=2, n_heads=4, max_seq_len=32)
        model = build_model(cfg, MupConfig(base_width=64), seed=0)
        with torch.no_grad():
            emb.append(float((model.wte(tokens) * model.embeddings_scale).std()))
            logit.append(float(model(tokens).std()))
    assert emb[1] == pytest.approx(emb[0], rel=0.05)
    assert logit[1] / logit[0] == pytest.approx(0.5, rel=0.25)


def test_an_untied_head_is_initialised_and_grouped_as_the_tied_one():
    """`tie_embeddings: false` trained a head left at PyTorch's default uniform init, in the hidden group
    (LR / m_d), unlike the tied head it stands for."""
    cfg = ModelConfig(
        vocab_size=2048, d_model=256, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=False
    )
    model = build_model(cfg, MupConfig(base_width=64), seed=0)
    head = dict(model.named_parameters())["lm_head.weight"]
    sigma = init_stds(model).embedding
    assert head.abs().max() <= 2 * sigma + 1e-7
    assert float(head.detach().std()) == pytest.approx(0.8796 * sigma, rel=0.05)
    groups = {
        g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1, model.width_multiplier)
    }
    assert id(head) in groups["embedding"]
