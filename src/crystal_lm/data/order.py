"""The published data order: for any stage and global sample index, what the trainer saw.

A stage trains on global samples [0, steps × batch_size); the batch of step t is [t·B, (t+1)·B). Sample g is
drawn by the stage's mixture (a pure function of seed, stage and g) from one source's packed training
windows, so the order can be recomputed for any index without replaying the run. An order record names the
source, the window, which pass over the source the draw belongs to, and the documents (with token offsets
inside each document's `<s> … </s>` form) whose tokens make up the window. Offsets come from the shards'
`documents.jsonl`, loaded once per shard set into arrays and searched by bisection.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from crystal_lm.config import Recipe
from crystal_lm.data.loader import StageData
from crystal_lm.data.mixture import Mixture
from crystal_lm.data.prepare import PreparedData
from crystal_lm.data.shards import ShardError, ShardSet


@dataclass
class _DocumentIndex:
    """A shard set's documents as arrays: id and [start, end) position in the packed token stream."""

    ids: list[str]
    starts: np.ndarray  # int64, ascending
    ends: np.ndarray  # int64, starts + tokens
    units: np.ndarray  # int64: which build unit (packed stream) each document belongs to

    def spans(self, lo: int, hi: int, unit: int) -> list[dict]:
        """The documents of `unit` overlapping stream positions [lo, hi), with offsets inside each document.
        (Each unit's stream starts at its first window: a unit ending on a full window shares that window's
        last position with the next unit's first token, hence the unit filter.)"""
        first = int(np.searchsorted(self.ends, lo, side="right"))  # first document ending after lo
        last = int(np.searchsorted(self.starts, hi, side="left"))  # documents starting before hi
        out = []
        for k in range(max(0, first - 1), last):
            s, e = int(self.starts[k]), int(self.ends[k])
            if self.units[k] != unit or e <= lo:
                continue
            out.append({"id": self.ids[k], "start": max(lo, s) - s, "end": min(hi, e) - s})
        return out


_INDEXES: weakref.WeakKeyDictionary[ShardSet, _DocumentIndex] = weakref.WeakKeyDictionary()


def _document_index(shards: ShardSet) -> _DocumentIndex:
    cached = _INDEXES.get(shards)
    if cached is not None:
        return cached
    ids: list[str] = []
    starts: list[int] = []
    lengths: list[int] = []
    units: list[int] = []
    for d in shards.documents():
        ids.append(d["id"])
        starts.append(d["start"])
        lengths.append(d["tokens"])
        units.append(d.get("unit", 0))
    start_arr = np.asarray(starts, dtype=np.int64)
    end_arr = start_arr + np.asarray(lengths, dtype=np.int64)
    unit_arr = np.asarray(units, dtype=np.int64)
    # Within a unit documents follow each other exactly; a new unit starts at its first window (at most one
    # token before the previous unit's end, see `spans`).
    same_unit = unit_arr[1:] == unit_arr[:-1]
    tiled = len(ids) == 0 or (
        np.array_equal(start_arr[1:][same_unit], end_arr[:-1][same_unit])
        and bool((start_arr[1:][~same_unit] >= end_arr[:-1][~same_unit] - 1).all())
    )
    total = int(end_arr.sum() - start_arr.sum())
    if not tiled or total != shards.n_tokens:
        raise ShardError(
            f"{shards.dir}/documents.jsonl: document offsets do not tile the packed stream "
            f"({total} tokens listed, index.json says {shards.n_tokens}); rebuild the shards"
        )
    index = _DocumentIndex(ids, start_arr, end_arr, unit_arr)
    _INDEXES[shards] = index
    return index


def stage_samples(recipe: Recipe, stage_index: int) -> int:
    """Global samples the trainer draws in a stage: its steps × batch size."""
    return recipe.stage_steps(recipe.stages[stage_index]) * recipe.train.batch_size


def _stage(recipe: Recipe, stage_index: int) -> None:
    if not 0 <= stage_index < len(recipe.stages):
        raise ValueError(
            f"stage {stage_index + 1} out of range: the recipe has stages 1-{len(recipe.stages)}"
        )


def _check_range(recipe: Recipe, stage_index: int, start: int, count: int) -> None:
    total = stage_samples(recipe, stage_index)
    if start < 0 or count < 0 or start + count > total:
        name = recipe.stages[stage_index].name
        asked = f"sample {start}" if count <= 1 else f"samples [{start}, {start + count})"
        raise ValueError(
            f"stage {stage_index + 1} '{name}': {asked} out of range; the stage has {total} samples, "
            f"valid indices are [0, {total})"
        )


def _draw(mixture: Mixture, index: int) -> tuple[str, int, int]:
    """(source, sample, epoch) of a global index; the epoch is the pass over the source this draw is in."""
    source, sample = mixture(index)
    b, j = divmod(int(index), mixture.block)
    labels, ranks = mixture._block(b)
    s = int(labels[j])
    draw = b * int(mixture.counts[s]) + int(ranks[j])  # the same draw number Mixture.__call__ uses
    return source, sample, draw // int(mixture.sizes[s])


def order_records(recipe: Recipe, data: PreparedData, stage_index: int, start: int, count: int) -> list[dict]:
    """Order records of global samples [start, start + count) of a stage.

    Each record: index, step, stage (numbered from 1, as `--stage` and checkpoint names), source, sample
    (window index in the source's train shards), epoch, documents (id and [start, end) token offsets inside
    `<s> doc </s>` of every document in the window), fim (whether the sample goes through the stage's FIM),
    fim_rate (the probability with which each of its documents is then rearranged: which ones are is drawn
    per sample, and `data sample` reports how many, `fim_segments`) and document_fim (whether the source's
    documents were FIM'd one by one before packing; the offsets then count the FIM'd documents' tokens). The
    window is the one the sample was built from: seq_len + 1 tokens (inputs and the shifted label), or its
    real tokens for the padded last window; under FIM only the first seq_len tokens are rearranged into the
    sample (the last label is EOS).
    """
    _stage(recipe, stage_index)
    _check_range(recipe, stage_index, start, count)
    return _records(StageData(recipe, data, stage_index), range(start, start + count))


def _records(sd: StageData, indices: Iterable[int]) -> list[dict]:
    L, B = sd.recipe.data.seq_len, sd.recipe.train.batch_size
    records = []
    for g in indices:
        source, sample, epoch = _draw(sd.mixture, g)
        shards = sd.data.train[source]
        fim = source in sd.fim_sources
        valid = shards.valid(sample)
        if fim:
            valid = min(valid, L)
        lo = sample * L
        shard = int(np.searchsorted(shards.offsets, sample, side="right")) - 1
        unit = shards.index["shards"][shard].get("unit_index", 0)
        records.append(
            {
                "index": g,
                "step": g // B,
                "stage": sd.stage_index + 1,
                "source": source,
                "sample": sample,
                "epoch": epoch,
                "documents": _document_index(shards).spans(lo, lo + valid, unit),
                "fim": fim,
                "fim_rate": sd.stage.fim.rate_for(source, sd.recipe.data.sources[source].domain)
                if fim
                else 0.0,
                "document_fim": sd.recipe.data.sources[source].document_fim is not None,
            }
        )
    return records


def _as_first_published(record: dict) -> dict:
    """A record as order fingerprints have hashed it since releases were first made (stage from 0, no
    `document_fim` key unless true, no `fim_rate`), so a release made before stays verifiable."""
    out = {**record, "stage": record["stage"] - 1}
    out.pop("fim_rate", None)
    if not out["document_fim"]:
        del out["document_fim"]
    return out


def sample_record(recipe: Recipe, data: PreparedData, stage_index: int, index: int) -> dict:
    """The sample the trainer built for a global index: StageData(recipe, data, stage).sample(index)."""
    _stage(recipe, stage_index)
    _check_range(recipe, stage_index, index, 1)
    sd = StageData(recipe, data, stage_index)
    source, sample = sd.mixture(index)
    input_ids, labels, loss_mask, source_seen, n_fim = sd.sample(index)
    assert source_seen == source
    return {
        "index": index,
        "stage": stage_index + 1,
        "source": source,
        "sample": sample,
        "input_ids": [int(t) for t in input_ids],
        "labels": [int(t) for t in labels],
        "loss_mask": [int(m) for m in np.asarray(loss_mask) > 0],
        "fim_segments": int(n_fim),
    }


def _draw_counts(mixture: Mixture, total: int) -> np.ndarray:
    """Exact draws per source (in mixture.names order) among the first `total` global samples."""
    full, rem = divmod(total, mixture.block)
    counts = mixture.counts * full
    if rem:
        labels, _ = mixture._block(full)
        counts = counts + np.bincount(labels[:rem], minlength=len(mixture.names))
    return counts


def _padding_drawn(shards: ShardSet, mixture: Mixture, k: int, draws: int) -> int:
    """Padding tokens among the label positions of the first `draws` draws of mixture source k: each unit's
    last window is padded (its `valid` real tokens, then EOS), and draw d takes sample `perm(epoch)[pos]`."""
    L = shards.seq_len
    lo, size = int(mixture.offsets[k]), int(mixture.sizes[k])
    short = {}  # subset position of a padded window -> its padding
    for s, last_valid in enumerate(shards.last_valid):
        i = shards.offsets[s + 1] - 1
        if shards.offsets[s + 1] > shards.offsets[s] and last_valid < L + 1 and lo <= i < lo + size:
            short[i - lo] = L + 1 - last_valid
    if not short:
        return 0
    full, rem = divmod(draws, size)
    padding = full * sum(short.values())
    if rem:
        inverse = np.empty(size, dtype=np.int64)
        inverse[mixture._perm(k, full)] = np.arange(size)
        padding += sum(pad for pos, pad in short.items() if inverse[pos] < rem)
    return padding


def stage_stats(recipe: Recipe, data: PreparedData) -> list[dict]:
    """One row per stage and source drawn from: draws, real tokens, shares, passes over the source, FIM rate.

    `stage` counts from 1. `samples` are the windows drawn and `sample_share` their share of the stage's
    (what the mixture weights set); `tokens` are the real tokens trained on (label positions that are not
    the padding of a unit's last window: `valid - 1` per window, `seq_len` for a full one) and `share` their
    share of the stage's real tokens. `epochs` is exact (samples drawn / the source's samples, or its
    `subsets` range), so 39.0 means each window is seen 39 times; `mixture_epochs` is Mixture.epochs, the
    same from the mixture's block shares, which differs from it by the rounding of the stage's last block.
    """
    L = recipe.data.seq_len
    rows = []
    for si, stage in enumerate(recipe.stages):
        sd = StageData(recipe, data, si)
        total = stage_samples(recipe, si)
        drawn = _draw_counts(sd.mixture, total)
        planned = sd.mixture.epochs(total)
        names = sd.mixture.names
        tokens = [
            int(n) * L - _padding_drawn(data.train[name], sd.mixture, k, int(n))
            for k, (name, n) in enumerate(zip(names, drawn.tolist(), strict=True))
        ]
        real = sum(tokens)
        for k, (name, n) in enumerate(zip(names, drawn.tolist(), strict=True)):
            shards = data.train[name]
            readable = int(sd.mixture.sizes[k])  # the stage's subset of the source (all of it by default)
            rows.append(
                {
                    "stage": si + 1,
                    "stage_name": stage.name,
                    "source": name,
                    "samples": int(n),
                    "sample_share": int(n) / total,
                    "tokens": tokens[k],
                    "share": tokens[k] / real if real else 0.0,
                    "epochs": int(n) / readable,
                    "mixture_epochs": planned[name],
                    "fim_rate": stage.fim.rate_for(name, recipe.data.sources[name].domain),
                    "source_samples": len(shards),
                    "subset_samples": readable,
                    "source_tokens": shards.n_tokens,
                }
            )
    return rows


def probe_indices(total: int, probe: int) -> list[int]:
    """A deterministic spread of up to `probe` indices in [0, total): first, last and evenly spaced."""
    if probe < 1:
        raise ValueError(f"probe must be at least 1, got {probe}")
    return sorted({int(i) for i in np.linspace(0, total - 1, num=min(probe, total)).round()})


def order_fingerprint(recipe: Recipe, data: PreparedData, stage_index: int, probe: int = 64) -> str:
    """sha256 of the order records of a spread of probe indices of a stage (to check an order recomputes)."""
    _stage(recipe, stage_index)
    total = stage_samples(recipe, stage_index)
    records = [
        _as_first_published(r)
        for r in _records(StageData(recipe, data, stage_index), probe_indices(total, probe))
    ]
    blob = json.dumps(
        {"stage": stage_index, "samples": total, "records": records}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(blob.encode()).hexdigest()
