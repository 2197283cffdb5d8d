"""`crystal plan`: memory per GPU and step time of a recipe for each parallel layout, before renting GPUs.

Memory per GPU at its peak, the start of backward, or the optimizer step if that is higher:
- model states: fp32 weights and AdamW's two fp32 moments (12 bytes per parameter) all the time, and fp32
  gradients (4) from backward to the optimizer step (all the time under DDP, whose all-reduce buckets hold
  them); whole on every GPU under DDP, divided by the number of GPUs under FSDP2, plus the gathered (bf16
  under autocast) block computing and the next one prefetched; one GPU is planned unsharded only;
- under bf16 autocast without sharding, the bf16 copies of the weights (2 bytes per parameter), which
  autograd keeps from forward to backward (with activation checkpointing, only the rebuilt block's and the
  head's); under FSDP2 the root's fp32 embedding (= head) while it computes, and the head's bf16 copy;
- activations: what autograd keeps per layer and token (bf16 autocast or fp32), measured on a block
  (`activation_bytes_per_token`; tests/train/test_plan.py checks both formulas against the saved tensors);
  with activation checkpointing only each block's fp32 input is kept, and one block is rebuilt at a time;
- the loss: one 1024-row chunk of fp32 logits and its gradient (the fused loss never holds B·T·V logits),
  and the head's fp32 gradient, which it forms during forward;
- 2 GiB for the CUDA context, allocator slack and communication buffers.
Step time = FLOPs per step / (GPUs × peak × assumed MFU), recomputation adding one forward pass (+1/3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crystal_lm.config import ModelConfig, Recipe
from crystal_lm.model import build_model
from crystal_lm.model.crystal import rotary_tables
from crystal_lm.train.parallel import flops_per_token, process_micro_batch

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


def layer_activation_bytes(d: int, d_ff: int, compiled: bool = False, bf16: bool = True) -> int:
    """Bytes one block keeps for backward per token. Under bf16 autocast, eager: both LayerNorm inputs in
    fp32 (2 · 4d) and the bf16 casts of their outputs (2 · 2d); the fp32 rotary pieces of q and k (2d: the
    first quarter of each head, two fp32 tensors each); the rotated q and k and a contiguous v (6d); the
    attention output and its [B, T, C] copy for the projection (4d); SwiGLU's up, gate, SiLU and product
    (4 · 2 · d_ff): 24d + 8 d_ff. In fp32: 36d + 16 d_ff. `torch.compile` per block recomputes some
    element-wise work in backward instead: 20d + 6 d_ff (bf16) and 36d + 12 d_ff (fp32). All four are
    counted on our block (tests/train/test_plan.py; PyTorch 2.13, inductor on CPU)."""
    if bf16:
        return 20 * d + 6 * d_ff if compiled else 24 * d + 8 * d_ff
    return 36 * d + (12 if compiled else 16) * d_ff


def measured_layer_activation_bytes(
    block: torch.nn.Module, cfg: ModelConfig, seq_len: int = 128, bf16: bool = True
) -> float:
    """What one block's forward (under bf16 autocast, or in fp32) really keeps for backward, per token, on
    CPU: the bytes of the tensors autograd saves at batch 4 minus those at batch 2, so the bf16 weight copies
    (per step, not per token) cancel. What `layer_activation_bytes` is checked against."""
    cos, sin = rotary_tables(cfg.rotary_dim, torch.arange(seq_len), cfg.rope_theta)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    totals = []
    for batch in (2, 4):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, storages=storages) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(batch, seq_len, cfg.d_model, requires_grad=True)  # the fp32 residual stream
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            block(x, (cos, sin))
        totals.append(sum(storages.values()))
    return (totals[1] - totals[0]) / (2 * seq_len)


def activation_bytes_per_token(
    d: int, d_ff: int, n_layers: int, checkpointing: bool, compiled: bool = False, bf16: bool = True
) -> int:
    per_layer = layer_activation_bytes(d, d_ff, compiled, bf16)
    tail = 8 * d  # the final LayerNorm's fp32 input and the loss's fp32 gradient for the hidden states
    if checkpointing:
        return n_layers * 4 * d + per_layer + tail  # block inputs, plus one block rebuilt at a time
    return n_layers * per_layer + tail


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
    # Raises ValueError, with the reason, for a layout training would refuse.
    micro = process_micro_batch(B, micro_batch or recipe.train.micro_batch_size, gpus)
    tokens_micro = micro * T
    # a chunk of fp32 logits and its softmax gradient; the head's fp32 gradient, formed during forward
    loss_bytes = 2 * 1024 * m.vocab_size * 4 + 4 * m.vocab_size * m.d_model
    flops_step = flops_per_token(n_params, m.n_layers, m.n_heads, m.head_dim, T) * B * T
    bf16 = recipe.train.precision == "bf16"
    head_params = m.vocab_size * m.d_model  # the head (the embedding too, when tied)
    root_params = n_params - m.n_layers * block_params  # embedding, final norm, an untied head
    out = []
    # One GPU trains unsharded whatever train.parallel says (parallelize leaves a single process alone).
    for sharded in (False, True) if gpus > 1 else (False,):
        for ckpt in (False, True):
            shards = gpus if sharded else 1
            states = 16 * n_params / shards
            held = 12 * n_params / shards  # weights and Adam moments
            grads = 4 * n_params / shards  # from backward to the optimizer step
            if not sharded and gpus > 1:  # DDP's all-reduce buckets hold the gradients all the time
                held, grads = held + grads, 0
            if sharded:
                # The block computing and the next (prefetched), gathered in bf16 (fp32 without autocast);
                # the root's fp32 weights (embedding, head) stay gathered through forward.
                held += 2 * (2 if bf16 else 4) * block_params + 4 * root_params
            # Autocast's bf16 weight copies, kept for backward: all of them unsharded; under checkpointing
            # only the block being rebuilt keeps its own; under FSDP2 the blocks' weights are bf16 already.
            # The head's copy is made outside the blocks in every layout.
            if not bf16:
                weight_copies = 0
            elif sharded:
                weight_copies = 2 * head_params
            elif ckpt:
                weight_copies = 2 * (block_params + head_params)
            else:
                weight_copies = 2 * n_params
            acts = (
                activation_bytes_per_token(m.d_model, m.ffn_dim, m.n_layers, ckpt, recipe.train.compile, bf16)
                * tokens_micro
            )
            total = held + max(acts + weight_copies, grads) + loss_bytes + OVERHEAD_BYTES
            step = flops_step * (4 / 3 if ckpt else 1) / (gpus * peak_tflops * 1e12 * mfu)
            out.append(
                Layout(
                    name=("FSDP2" if sharded else "DDP" if gpus > 1 else "one GPU")
                    + (" + activation checkpointing" if ckpt else ""),
                    memory_gib=total / GIB,
                    states_gib=states / GIB,
                    activations_gib=acts / GIB,
                    step_s=step,
                    tokens_per_s_per_gpu=B * T / step / gpus,
                    fits=total <= 0.95 * gpu_memory_gib * GIB,
                )
            )
    return out
