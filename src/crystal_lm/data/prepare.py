"""Data preparation for a recipe: embedded corpus → tokenizer → packed train/validation shards per source.

Every product is cached under `data.cache_dir` by a key of what it was made from, so preparing the same
recipe twice does nothing the second time, and a changed source or tokenizer gives new shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from crystal_lm.config import Recipe, RecipeError, check_paths
from crystal_lm.data.corpus import EmbeddedCorpus, build_embedded_corpus
from crystal_lm.data.documents import iter_source, source_fingerprint, validation_ids
from crystal_lm.data.shards import ShardSet, ShardWriter, token_dtype
from crystal_lm.data.tokenizer import Tokenizer, padded_vocab_size, train_bpe

log = logging.getLogger(__name__)
SHARD_BUILD_VERSION = 1
MIN_DOC_TOKENS = 10  # Crystal drops documents shorter than this (crystal-spec §3.2)


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
                name: {"train": _shard_summary(self.train[name]), "val": _shard_summary(self.val[name])}
                for name in self.train
            },
        }


def _shard_summary(s: ShardSet) -> dict:
    return {
        "dir": str(s.dir),
        "samples": len(s),
        "tokens": s.n_tokens,
        "documents": s.index["n_documents"],
        "shards": [{"file": x["file"], "sha256": x["sha256"]} for x in s.index["shards"]],
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
        # An equal byte budget per source, from training documents only.
        for name in sorted(recipe.data.sources):
            docs = list(iter_source(recipe, name, corpus))
            held_out = validation_ids([d.id for d in docs], recipe.data.val_fraction)
            budget = tcfg.sample_bytes
            for d in docs:
                if d.id in held_out:
                    continue
                yield d.text[:budget]
                budget -= len(d.text)
                if budget <= 0:
                    break

    t0 = time.time()
    tok = train_bpe(sample_texts(), tcfg.vocab_size, path)
    log.info("trained a %d-token BPE in %.1fs: %s", tok.vocab_size, time.time() - t0, path)
    return tok


def _build_source(
    recipe: Recipe,
    name: str,
    corpus: EmbeddedCorpus | None,
    tok: Tokenizer,
    train_dir: Path,
    val_dir: Path,
    vocab: int,
) -> None:
    docs = list(iter_source(recipe, name, corpus))
    if not docs:
        raise RecipeError(f"{recipe.source_file}: data.sources.{name}: the source has no documents")
    held_out = validation_ids([d.id for d in docs], recipe.data.val_fraction)
    meta = {"source": name, "domain": recipe.data.sources[name].domain}
    writers = {
        split: ShardWriter(d, recipe.data.seq_len, token_dtype(vocab), tok.bos_id, tok.eos_id, tok.sha256)
        for split, d in (("train", train_dir), ("val", val_dir))
    }
    dropped = 0
    batch = 256
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        for doc, ids in zip(chunk, tok.encode_batch([d.text for d in chunk]), strict=True):
            if len(ids) < MIN_DOC_TOKENS:
                dropped += 1
                continue
            writers["val" if doc.id in held_out else "train"].add(doc.id, ids)
    for split, w in writers.items():
        w.close({**meta, "split": split, "dropped_short_documents": dropped})


def prepare_data(recipe: Recipe) -> PreparedData:
    """Build (or reuse) everything the recipe's stages read."""
    check_paths(recipe)
    cache = Path(recipe.data.cache_dir)
    corpus = _embedded_corpus(recipe, cache)
    fingerprints = {n: source_fingerprint(recipe, n, corpus) for n in recipe.data.sources}
    tok = _tokenizer(recipe, cache, corpus, fingerprints)
    vocab = recipe.model.vocab_size
    if tok.max_id >= vocab:
        raise RecipeError(
            f"{recipe.source_file}: model.vocab_size: {vocab} is too small for the tokenizer "
            f"{tok.path} (largest id {tok.max_id}); use at least {padded_vocab_size(tok)}"
        )
    train, val = {}, {}
    for name in sorted(recipe.data.sources):
        key = _key(
            SHARD_BUILD_VERSION,
            fingerprints[name],
            tok.sha256,
            recipe.data.seq_len,
            recipe.data.val_fraction,
            token_dtype(vocab).str,
        )
        root = cache / "shards" / f"{name}-{key}"
        train_dir, val_dir = root / "train", root / "val"
        if not ((train_dir / "index.json").is_file() and (val_dir / "index.json").is_file()):
            t0 = time.time()
            _build_source(recipe, name, corpus, tok, train_dir, val_dir, vocab)
            log.info("packed source %s in %.1fs", name, time.time() - t0)
        train[name] = ShardSet(train_dir, expect_tokenizer=tok.sha256)
        val[name] = ShardSet(val_dir, expect_tokenizer=tok.sha256)
        if len(train[name]) == 0:
            raise RecipeError(f"{recipe.source_file}: data.sources.{name}: no training samples after packing")
    return PreparedData(tok, train, val, corpus)
