"""Crystal's loss, Σ mask·CE / (B·T), computed chunk by chunk so full logits never exist at once.

The LM head is the tied embedding with the muP logit multiplier. For each chunk of positions the logits are
formed, their log-sum-exp and the target logit give the loss, and, when gradients are needed, the softmax
gradient is turned straight into gradients for the hidden states and the head (then the chunk's logits are
freed). Peak memory is one chunk of logits instead of B·T·V floats, and on CPU the chunk stays in cache.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
        chunk: int,
        denom: int,
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax (fp64 when given fp64)
        total = hidden.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(hidden) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            m = mask[start : start + chunk].to(acc)
            logits = (h @ weight.t()).to(acc) * scale
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y[:, None]).squeeze(1)
            total += ((lse - target) * m).sum()
            if needs_grad:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs[torch.arange(len(y), device=y.device), y] -= 1.0  # a CPU index would sync
                probs.mul_((m * (scale / denom))[:, None])
                probs = probs.to(weight.dtype)
                grad_h[start : start + chunk] = probs @ weight
                # Under bf16 autocast the product is a bf16 GEMM, as any linear layer's weight gradient; it
                # is summed over chunks in fp32. (An in-place addmm_ would skip autocast: an fp32 GEMM.)
                grad_w += probs.t() @ h
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """Σ mask·CE(scale · hidden·Wᵀ, labels) / number of positions. hidden: [..., d]; labels, mask: [...]."""
    h = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(
        h, weight, labels.reshape(-1), mask.reshape(-1), scale, chunk, labels.numel()
    )
