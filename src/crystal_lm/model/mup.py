"""muP as Crystal used it (Cerebras Model Zoo muP, crystal-spec §1.3).

Width multiplier m_d = d_model / base_width. The forward multipliers (×α_in, ×α_out/m_d, q·kᵀ/d_head) are in
the model; this module holds the other two halves:

* initialisation: truncated normal cut at ±2σ; embedding σ_base; hidden matrices σ_base/√m_d; attention
  out-projection and MLP down-projection additionally /√(2·n_layers); biases 0; LayerNorm 1/0.
* optimizer groups: hidden matrices get LR/m_d (so their decoupled weight decay is scaled too), embeddings
  (= the tied head) the base LR with weight decay, biases and norms the base LR without weight decay. An
  untied head (`tie_embeddings: false`) is initialised and grouped as the tied one would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from crystal_lm.model.crystal import CrystalModel


@dataclass(frozen=True)
class InitStds:
    embedding: float
    hidden: float
    output: float


def init_stds(model: CrystalModel) -> InitStds:
    sigma = model.mup.init_std
    hidden = sigma / math.sqrt(model.width_multiplier)
    return InitStds(embedding=sigma, hidden=hidden, output=hidden / math.sqrt(2 * model.cfg.n_layers))


def _trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def init_weights(model: CrystalModel) -> None:
    stds = init_stds(model)
    _trunc_normal_(model.wte.weight, stds.embedding)
    if not model.cfg.tie_embeddings:  # the head the tied weight would be: its multiplier is in the forward
        _trunc_normal_(model.lm_head.weight, stds.embedding)
    for block in model.blocks:
        for layer in (block.attn.c_attn, block.mlp.c_fc, block.mlp.c_fc2):  # q, k, v, up, gate
            _trunc_normal_(layer.weight, stds.hidden)
        for layer in (block.attn.c_proj, block.mlp.c_proj):  # attention out-projection, MLP down
            _trunc_normal_(layer.weight, stds.output)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif ".ln_" in f".{name}" and name.endswith("weight"):
            p.fill_(1.0)


GROUPS = ("hidden", "embedding", "no_decay")


def param_groups(model: nn.Module, weight_decay: float, width_multiplier: float) -> list[dict]:
    """AdamW groups with an `lr_scale` the scheduler multiplies the base LR by."""
    buckets: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if p.ndim < 2:
            buckets["no_decay"].append(p)  # biases and LayerNorm weights
        elif name.endswith(("wte.weight", "lm_head.weight")):  # an untied head is grouped as the tied one
            buckets["embedding"].append(p)
        else:
            buckets["hidden"].append(p)
    return [
        {
            "name": "hidden",
            "params": buckets["hidden"],
            "lr_scale": 1.0 / width_multiplier,
            "weight_decay": weight_decay,
        },
        {"name": "embedding", "params": buckets["embedding"], "lr_scale": 1.0, "weight_decay": weight_decay},
        {"name": "no_decay", "params": buckets["no_decay"], "lr_scale": 1.0, "weight_decay": 0.0},
    ]
