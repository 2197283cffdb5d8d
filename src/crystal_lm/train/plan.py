"""`crystal plan`: memory per GPU and step time of a recipe for each parallel layout, before renting GPUs.

Memory per GPU = model states + activations + a fixed overhead:
- model states: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per parameter, whole on
  every GPU under DDP, divided by the number of GPUs under FSDP2 (plus the bf16 copy of the largest
  unsharded block while it computes);
- activations, bf16 autocast with an fp32 residual stream and SDPA (no T² scores), per layer and token:
  residual and LayerNorm inputs/outputs (2 × (4 + 2) · d), q, k, v and the attention output (4 · 2 · d), the
  SwiGLU up, gate, SiLU and product (4 · 2 · d_ff); with activation checkpointing only each block's fp32 input
  is kept, and one block's activations are rebuilt at a time;
- the loss: one 1024-row chunk of fp32 logits and its gradient (the fused loss never holds B·T·V logits);
- 2 GiB for the CUDA context, allocator slack and communication buffers.
Step time = FLOPs per step / (GPUs × peak × assumed MFU), recomputation adding one forward pass (+1/3).
"""

from __future__ import annotations

from dataclasses import dataclass

from crystal_lm.config import Recipe
from crystal_lm.model import build_model
from crystal_lm.train.parallel import flops_per_token

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB


@dataclass
class Layout:
    name: str
    memory_gib: float
    states_gib: float
    activations_gib: float
    step_s: float
    tokens_per_s_per_gpu: float
    fits: bool


def activation_bytes_per_token(d: int, d_ff: int, n_layers: int, checkpointing: bool) -> float:
    per_layer = 2 * (4 + 2) * d + 4 * 2 * d + 4 * 2 * d_ff
    if checkpointing:
        return n_layers * 4 * d + per_layer  # block inputs, plus one block rebuilt at a time
    return n_layers * per_layer


def plan(
    recipe: Recipe,
    gpus: int,
    gpu_memory_gib: float,
    micro_batch: int | None = None,
    peak_tflops: float = 989.0,
    mfu: float = 0.45,
) -> list[Layout]:
    m = recipe.model
    model = build_model(m, recipe.mup, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    T = recipe.data.seq_len
    B = recipe.train.batch_size
    micro = micro_batch or recipe.train.micro_batch_size or max(1, B // gpus)
    tokens_micro = micro * T
    loss_bytes = 2 * 1024 * m.vocab_size * 4
    flops_step = flops_per_token(n_params, m.n_layers, m.n_heads, m.head_dim, T) * B * T
    out = []
    for sharded in (False, True):
        for ckpt in (False, True):
            states = 16 * n_params / (gpus if sharded else 1)
            if sharded:
                states += (
                    2 * 2 * block_params
                )  # bf16 gather of the block computing (and the next, prefetched)
            acts = activation_bytes_per_token(m.d_model, m.ffn_dim, m.n_layers, ckpt) * tokens_micro
            total = states + acts + loss_bytes + OVERHEAD_BYTES
            step = flops_step * (4 / 3 if ckpt else 1) / (gpus * peak_tflops * 1e12 * mfu)
            out.append(
                Layout(
                    name=("FSDP2" if sharded else "DDP") + (" + activation checkpointing" if ckpt else ""),
                    memory_gib=total / GIB,
                    states_gib=states / GIB,
                    activations_gib=acts / GIB,
                    step_s=step,
                    tokens_per_s_per_gpu=B * T / step / gpus,
                    fits=total <= 0.95 * gpu_memory_gib * GIB,
                )
            )
    return out
