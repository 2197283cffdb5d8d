"""A stage's data mixture as a pure function: (seed, stage, global sample index) → (source, sample).

Weights are normalised. The sample sequence is cut into blocks of `block` slots; each block holds a fixed
number of slots per source (largest-remainder rounding of weight × block) in an order shuffled by a
generator keyed on (seed, stage, block). The k-th slot of a source reads that source's samples in a
permutation keyed on (seed, stage, source, epoch), wrapping into a new epoch when the source runs out (small
sources repeat, as in Crystal's Model Zoo mixture). A source may be restricted to a range of its samples
(Crystal's `data_subset`, e.g. the first 10% of SlimPajama in stage 3). Nothing depends on what was drawn before, so any step's
batch can be recomputed, and resuming on another number of workers reads the same order.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def allocate(weights: list[float], block: int) -> np.ndarray:
    """Slots per source in one block: largest-remainder rounding of normalised weights × block."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


def subset_range(n: int, lo: float, hi: float) -> tuple[int, int]:
    """Samples [floor(lo·n), floor(hi·n)) of a source of n samples (at least one when n > 0)."""
    start, end = int(lo * n), int(hi * n)
    return start, max(end, min(start + 1, n))


class Mixture:
    def __init__(
        self,
        weights: dict[str, float],
        sizes: dict[str, int],
        seed: int,
        stage: int,
        block: int = 1024,
        subsets: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        active = [(n, w) for n, w in sorted(weights.items()) if w > 0]
        self.names = [n for n, _ in active]
        # Crystal's `data_subset: lo-hi`: the stage reads only samples [lo·n, hi·n) of such a source.
        subsets = subsets or {}
        ranges = [subset_range(sizes[n], *subsets.get(n, (0.0, 1.0))) for n in self.names]
        self.offsets = np.asarray([lo for lo, _ in ranges], dtype=np.int64)
        self.sizes = np.asarray([hi - lo for lo, hi in ranges], dtype=np.int64)
        if (self.sizes <= 0).any():
            empty = [n for n, s in zip(self.names, self.sizes, strict=True) if s <= 0]
            raise ValueError(f"mixture sources without samples: {', '.join(empty)}")
        self.seed, self.stage, self.block = seed, stage, block
        self.counts = allocate([w for _, w in active], block)
        self.shares = self.counts / block
        self._block = lru_cache(maxsize=8)(self._block_layout)
        self._perm = lru_cache(maxsize=64)(self._permutation)

    def _block_layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """For block b: the source of each slot and its rank among that source's slots in the block."""
        labels = np.repeat(np.arange(len(self.names)), self.counts)
        labels = labels[_rng(self.seed, self.stage, "block", b).permutation(self.block)]
        ranks = np.empty(self.block, dtype=np.int64)
        for s in range(len(self.names)):
            where = np.flatnonzero(labels == s)
            ranks[where] = np.arange(len(where))
        return labels, ranks

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        return _rng(self.seed, self.stage, self.names[source], epoch).permutation(int(self.sizes[source]))

    def __call__(self, index: int) -> tuple[str, int]:
        b, j = divmod(int(index), self.block)
        labels, ranks = self._block(b)
        s = int(labels[j])
        k = b * int(self.counts[s]) + int(ranks[j])  # this source's draw number within the stage
        epoch, pos = divmod(k, int(self.sizes[s]))
        return self.names[s], int(self.offsets[s]) + int(self._perm(s, epoch)[pos])

    def epochs(self, total_samples: int) -> dict[str, float]:
        """How many passes over each source `total_samples` draws make."""
        return {
            n: total_samples * float(sh) / int(sz)
            for n, sh, sz in zip(self.names, self.shares, self.sizes, strict=True)
        }
