"""Fill-in-the-middle as Crystal applied it (crystal-spec §3.3).

After packing, a sample's input tokens are split at every EOS into document segments. Each non-empty segment
is, with probability `rate`, decoded to text, cut at two uniformly drawn character positions into prefix /
middle / suffix, the pieces re-tokenized separately and joined as

    PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM:  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle      (with probability spm_rate)

EOS is put back after each segment (empty segments, i.e. consecutive EOS, lose theirs). The result is cut to
the sample length (overflow dropped) or right-padded with `<|fim_pad|>`, whose loss mask is 0. Labels are the
inputs shifted by one with EOS as the last label. The random draws come from a generator the caller seeds
per sample, so the transform is a deterministic function of the sample index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystal_lm.data.tokenizer import Tokenizer


@dataclass
class FimResult:
    input_ids: np.ndarray  # [L]
    labels: np.ndarray  # [L]
    loss_mask: np.ndarray  # [L]
    n_fim_segments: int


def permute_segment(
    segment: np.ndarray, tok: Tokenizer, rng: np.random.Generator, rate: float, spm_rate: float
) -> tuple[np.ndarray, bool]:
    if rng.random() >= rate:
        return segment, False
    text = tok.decode(segment.tolist())
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    prefix, middle, suffix = (
        np.asarray(tok.encode(piece), dtype=np.int64) for piece in (text[:lo], text[lo:hi], text[hi:])
    )
    pre, mid, suf = (
        np.asarray([t], dtype=np.int64) for t in (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id)
    )
    if rng.random() < spm_rate:
        parts = (pre, suf, suffix, mid, prefix, middle)
    else:
        parts = (pre, prefix, suf, suffix, mid, middle)
    return np.concatenate(parts), True


def apply_fim(
    input_ids: np.ndarray, tok: Tokenizer, rng: np.random.Generator, rate: float, spm_rate: float
) -> FimResult:
    L = len(input_ids)
    eos = tok.eos_id
    pieces: list[np.ndarray] = []
    n_fim = 0
    start = 0
    for end in [*np.flatnonzero(input_ids == eos).tolist(), None]:
        segment = input_ids[start:end]
        if len(segment):
            permuted, fimmed = permute_segment(segment, tok, rng, rate, spm_rate)
            n_fim += fimmed
            pieces.append(permuted)
            if end is not None:
                pieces.append(np.asarray([eos], dtype=np.int64))
        if end is None:
            break
        start = end + 1
    out = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    out = out[:L]
    if len(out) < L:
        out = np.concatenate([out, np.full(L - len(out), tok.fim_pad_id, dtype=np.int64)])
    labels = np.concatenate([out[1:], np.asarray([eos], dtype=np.int64)])
    mask = (out != tok.fim_pad_id).astype(np.float32)
    return FimResult(out, labels, mask, n_fim)
