"""Validation loss per source and per domain on the held-out split (no FIM, so stages are comparable)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from crystal_lm.config import Recipe
from crystal_lm.data.shards import ShardSet


def validation_indices(n: int, max_samples: int) -> list[int]:
    """Up to `max_samples` windows spread evenly over the split (a fixed set, the same at every checkpoint)."""
    if n <= max_samples:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, max_samples)})


@torch.no_grad()
def source_loss_sums(
    model: torch.nn.Module, shards: ShardSet, max_samples: int, micro_batch: int, precision: str = "fp32"
) -> tuple[float, int]:
    """Summed token cross-entropy and token count over a source's validation windows."""
    L = shards.seq_len
    device = next(model.parameters()).device
    total, count = 0.0, 0
    idx = validation_indices(len(shards), max_samples)
    for start in range(0, len(idx), micro_batch):
        windows = [shards.window(i) for i in idx[start : start + micro_batch]]
        tokens = torch.from_numpy(np.stack([w.tokens for w in windows])).to(device)
        mask = torch.zeros(len(windows), L, device=device)
        for r, w in enumerate(windows):
            mask[r, : w.valid - 1] = 1.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens[:, :L]).float()  # through forward: also right under DDP / FSDP2
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        )
        total += float((ce * mask.reshape(-1)).sum())
        count += int(mask.sum())
    return total, count


def validation_loss(model: torch.nn.Module, val: dict[str, ShardSet], recipe: Recipe) -> dict[str, float]:
    """Mean token loss per source and, pooled over its sources, per domain (e.g. `text`, `code`)."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    micro = recipe.train.micro_batch_size or recipe.train.batch_size
    for name in sorted(val):
        if len(val[name]) == 0:
            continue
        total, count = source_loss_sums(
            model, val[name], recipe.data.val_max_samples, micro, recipe.train.precision
        )
        for key in (name, recipe.data.sources[name].domain):
            sums[key][0] += total
            sums[key][1] += count
    model.train(was_training)
    return {k: s / c for k, (s, c) in sorted(sums.items()) if c}
