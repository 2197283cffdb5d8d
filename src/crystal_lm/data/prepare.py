"""Data preparation for a recipe: embedded corpus → tokenizer → packed train/validation shards per source.

Every product is cached under `data.cache_dir` by a key of what it was made from, so preparing the same
recipe twice does nothing the second time, and a changed source or tokenizer gives new shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from crystal_lm.config import Recipe, RecipeError, check_paths
from crystal_lm.data.build import (
    MIN_DOC_TOKENS,
    SPLITS,
    BuildSpec,
    build_units,
    ensure_validation,
    finalize,
    is_validation,
    total_counts,
)
from crystal_lm.data.corpus import EmbeddedCorpus, build_embedded_corpus
from crystal_lm.data.documents import DataError, iter_source, source_fingerprint
from crystal_lm.data.readers import (
    Unit,
    describe_filtered,
    detect_format,
    list_units,
    merge_filtered_by,
    source_settings_error,
)
from crystal_lm.data.shards import ShardError, ShardSet, token_dtype
from crystal_lm.data.tokenizer import Tokenizer, padded_vocab_size, train_bpe
from crystal_lm.train.metrics import count_progress

log = logging.getLogger(__name__)
SHARD_BUILD_VERSION = 4  # 4: readers account for every file, JSONL max_doc_bytes on text bytes


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: dict[str, ShardSet]
    val: dict[str, ShardSet]
    corpus: EmbeddedCorpus | None

    def manifest(self) -> dict:
        return {
            "tokenizer": {
                "path": str(self.tokenizer.path),
                "sha256": self.tokenizer.sha256,
                "vocab_size": self.tokenizer.vocab_size,
            },
            "corpus": self.corpus.manifest if self.corpus else None,
            "sources": {
                name: {
                    "train": _shard_summary(self.train[name]),
                    "val": _shard_summary(self.val[name]),
                    **_read_summary(self.train[name]),
                }
                for name in self.train
            },
        }


def _order_inputs(manifest: dict) -> dict[str, object]:
    return {"tokenizer": (manifest.get("tokenizer") or {}).get("sha256")} | {
        f"{name}/{split}": [shard["sha256"] for shard in summary[split]["shards"]]
        for name, summary in manifest.get("sources", {}).items()
        for split in ("train", "val")
    }


def manifest_differences(recorded: dict, current: dict) -> list[str]:
    """What the data order depends on that differs between two data manifests: `tokenizer`, and
    `SOURCE/SPLIT` for each source whose shard hashes differ (local paths do not count)."""
    a, b = _order_inputs(recorded), _order_inputs(current)
    return sorted(
        (k for k in a.keys() | b.keys() if a.get(k) != b.get(k)), key=lambda k: (k != "tokenizer", k)
    )


def _shard_summary(s: ShardSet) -> dict:
    return {
        "dir": str(s.dir),
        "samples": len(s),
        "tokens": s.n_tokens,
        "documents": s.index["n_documents"],
        "shards": [{"file": x["file"], "sha256": x["sha256"]} for x in s.index["shards"]],
    }


def _read_summary(s: ShardSet) -> dict:
    """What reading the source left out, per reason (the same in both splits' indexes), and whether its
    `max_bytes` prefix ended before the source did."""
    return {
        "skipped": s.index.get("skipped", {}),
        "dropped_short_documents": s.index.get("dropped_short_documents", 0),
        "skip_examples": s.index.get("skip_examples", [])[:5],
        **({"max_bytes_reached": True} if s.index.get("max_bytes_reached") else {}),
    }


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _embedded_corpus(recipe: Recipe, cache: Path) -> EmbeddedCorpus | None:
    if not any(s.embedded for s in recipe.data.sources.values()):
        return None
    return build_embedded_corpus(cache, recipe.data.embedded_max_bytes)


def _tokenizer(
    recipe: Recipe, cache: Path, corpus: EmbeddedCorpus | None, fingerprints: dict[str, str]
) -> Tokenizer:
    tcfg = recipe.data.tokenizer
    if tcfg.path is not None:
        return Tokenizer(recipe.resolve_path(tcfg.path))
    key = _key(
        "bpe", tcfg.vocab_size, tcfg.sample_bytes, recipe.data.val_fraction, sorted(fingerprints.items())
    )
    path = cache / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        return Tokenizer(path)

    def sample_texts():
        # An equal byte budget per source, from training documents only, read as a stream.
        for name in sorted(recipe.data.sources):
            budget = tcfg.sample_bytes
            for d in iter_source(recipe, name, corpus):
                if is_validation(d.id, recipe.data.val_fraction):
                    continue
                yield d.text[:budget]
                budget -= len(d.text)
                if budget <= 0:
                    break

    t0 = time.time()
    tok = train_bpe(sample_texts(), tcfg.vocab_size, path)
    log.info("trained a %d-token BPE in %.1fs: %s", tok.vocab_size, time.time() - t0, path)
    return tok


def _in_recipe(recipe: Recipe, name: str, exc: DataError) -> DataError:
    return DataError(f"{recipe.source_file or '<recipe>'}: data.sources.{name}: {exc}")


def check_sources(recipe: Recipe) -> None:
    """Check each source's filter settings (`where`, `languages`, `extensions`) against its format before
    any data work, naming the recipe and source. The format is the source's `format`, or detected from
    the files (only where a filter needs it)."""
    for name, src in sorted(recipe.data.sources.items()):
        if not (src.where or src.languages or src.extensions):
            continue
        try:
            if src.embedded is not None:
                fmt = "jsonl"
            else:
                fmt = src.format or detect_format(recipe.resolve_path(src.path or ""))
            error = source_settings_error(src, fmt)
        except DataError as exc:
            raise _in_recipe(recipe, name, exc) from None
        if error is not None:
            raise DataError(f"{recipe.source_file or '<recipe>'}: data.sources.{name}: {error}")


def source_units(recipe: Recipe, name: str, corpus: EmbeddedCorpus | None) -> tuple[str, list[Unit]]:
    """The format of a source and its units of work, in a fixed order. Errors name the recipe and source."""
    src = recipe.data.sources[name]
    try:
        if src.embedded is not None:
            assert corpus is not None
            path, fmt = corpus.part_path(src.embedded), "jsonl"
        else:
            path = recipe.resolve_path(src.path or "")
            fmt = src.format or detect_format(path)
        return fmt, list_units(src, path, recipe.data.unit_bytes)
    except DataError as exc:
        raise _in_recipe(recipe, name, exc) from None


@dataclass
class SourcePlan:
    """How one source is built: the worker spec, its units and the shard folder."""

    spec: BuildSpec
    units: list[Unit]
    root: Path

    @property
    def done(self) -> bool:
        return all((self.root / s / "index.json").is_file() for s in ("train", "val"))


@dataclass
class DataPlan:
    tokenizer: Tokenizer
    corpus: EmbeddedCorpus | None
    vocab_size: int
    sources: dict[str, SourcePlan]


def plan_data(recipe: Recipe) -> DataPlan:
    """Corpus and tokenizer (built here, once), then what every source's shard build consists of."""
    check_paths(recipe)
    check_sources(recipe)
    cache = Path(recipe.data.cache_dir)
    corpus = _embedded_corpus(recipe, cache)
    fingerprints = {n: source_fingerprint(recipe, n, corpus) for n in recipe.data.sources}
    tok = _tokenizer(recipe, cache, corpus, fingerprints)
    if uses_fim(recipe):  # before any shard is built, not at the first FIM sample of training
        tok.require_fim()
    vocab = recipe.model.vocab_size
    if tok.max_id >= vocab:
        raise RecipeError(
            f"{recipe.source_file}: model.vocab_size: {vocab} is too small for the tokenizer "
            f"{tok.path} (largest id {tok.max_id}); use at least {padded_vocab_size(tok)}"
        )
    plans = {}
    for name in sorted(recipe.data.sources):
        key = _key(
            SHARD_BUILD_VERSION,
            fingerprints[name],
            tok.sha256,
            recipe.data.seq_len,
            recipe.data.val_fraction,
            recipe.data.unit_bytes,  # each unit's stream is packed (and padded) on its own
            token_dtype(vocab).str,
        )
        src = recipe.data.sources[name]
        fmt, units = source_units(recipe, name, corpus)
        spec = BuildSpec(
            source=name,
            domain=src.domain,
            src=src,
            fmt=fmt,
            tokenizer_path=str(tok.path),
            seq_len=recipe.data.seq_len,
            vocab_size=vocab,
            val_fraction=recipe.data.val_fraction,
            normalize=recipe.data.normalize,
            chunk_chars=recipe.data.chunk_chars,
            max_bytes=src.max_bytes,
            seed=recipe.seed,
        )
        plans[name] = SourcePlan(spec, units, cache / "shards" / f"{name}-{key}")
    return DataPlan(tok, corpus, vocab, plans)


def build_source(recipe: Recipe, plan: SourcePlan, tok: Tokenizer, vocab: int) -> None:
    """Build a source's missing units (resuming an interrupted build), then merge them into its splits."""
    name, spec, units, root = plan.spec.source, plan.spec, plan.units, plan.root
    progress = count_progress(f"source {name}: units")
    records = ensure_validation(
        spec, units, root, build_units(spec, units, root, recipe.data.workers, progress)
    )
    where = f"{recipe.source_file}: data.sources.{name}"
    if not any(r["splits"][s]["documents"] for r in records for s in ("train", "val")):
        left_out = [f"{k} {v}" for k, v in total_counts(r["skipped"] for r in records).items()]
        short = sum(r["dropped_short_documents"] for r in records)
        if short:  # not a recipe key: Crystal's fixed rule
            left_out.append(
                f"{short} shorter than {MIN_DOC_TOKENS} tokens, always dropped (crystal_lm.data.build."
                "MIN_DOC_TOKENS); check that the source's text_field holds whole documents"
            )
        read = sum(r["documents_read"] for r in records)
        why = ""
        if not read:  # the filters kept nothing: say what the records hold
            why = describe_filtered(spec.src, merge_filtered_by(r.get("filtered_by", {}) for r in records))
        raise RecipeError(
            f"{where}: the source has no usable documents ({read} read; left out: "
            f"{'; '.join(left_out) or 'none'}){f'. {why}' if why else ''}"
        )
    if not any(r["splits"]["train"]["documents"] for r in records):
        ids = set()
        for r in records:
            with open(root / "units" / r["key"] / "val" / "documents.jsonl") as f:
                ids.update(json.loads(line)["id"] for line in f)
        n = sum(r["splits"]["val"]["documents"] for r in records)
        raise RecipeError(
            f"{where}: all {n} documents went to validation, none to training: the split is chosen by a hash "
            f"of each document's id, and they have {len(ids)} distinct id(s) (e.g. {min(ids)!r}); give each "
            "document its own `id` (or leave the field out: the file and position then name it), or lower "
            f"data.val_fraction ({recipe.data.val_fraction})"
        )
    meta = {"source": name, "domain": spec.domain, "format": spec.fmt}
    finalize(root, records, recipe.data.seq_len, tok.sha256, token_dtype(vocab).str, meta)
    shutil.rmtree(root / "units", ignore_errors=True)  # the split folders hold links to every shard


def _open_splits(sp: SourcePlan, tok: Tokenizer) -> tuple[ShardSet, ShardSet]:
    return tuple(ShardSet(sp.root / s, expect_tokenizer=tok.sha256) for s in SPLITS)  # type: ignore[return-value]


def uses_fim(recipe: Recipe) -> bool:
    """Whether a recipe FIMs anything: a stage's rate on some source, or a source's document_fim."""
    if any(src.document_fim is not None for src in recipe.data.sources.values()):
        return True
    return any(
        st.fim.rate_for(name, recipe.data.sources[name].domain) > 0
        for st in recipe.stages
        for name in st.mixture
    )


def prepare_data(recipe: Recipe) -> PreparedData:
    """Build (or reuse) everything the recipe's stages read. Units already built (by an interrupted run,
    or by another engine such as `crystal_lm.data.distributed`) are kept; only the rest is built."""
    plan = plan_data(recipe)
    tok = plan.tokenizer
    train, val = {}, {}
    for name, sp in plan.sources.items():
        if sp.done:
            try:  # sizes and hashes are checked: damaged shards (a cut copy, a bad disk) are rebuilt
                train[name], val[name] = _open_splits(sp, tok)
            except ShardError as exc:
                log.warning("source %s: %s; rebuilding %s", name, exc, sp.root)
                shutil.rmtree(
                    sp.root / "units", ignore_errors=True
                )  # unit shards are links to the same files
        if name not in train:
            t0 = time.time()
            build_source(recipe, sp, tok, plan.vocab_size)
            log.info("packed source %s in %.1fs", name, time.time() - t0)
            train[name], val[name] = _open_splits(sp, tok)
        if len(train[name]) == 0:
            raise RecipeError(f"{recipe.source_file}: data.sources.{name}: no training samples after packing")
    return PreparedData(tok, train, val, plan.corpus)
