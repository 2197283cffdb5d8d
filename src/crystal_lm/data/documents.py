"""Documents of a recipe's sources (read by `readers`), their fingerprints, and the validation split.

The held-out validation split is chosen per source by a hash of the document id, so it does not depend on
reading order, workers or the tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from crystal_lm.config import Recipe, SourceConfig
from crystal_lm.data.corpus import EmbeddedCorpus

if TYPE_CHECKING:
    from crystal_lm.data.readers import Document


class DataError(ValueError):
    pass


def iter_source(recipe: Recipe, name: str, corpus: EmbeddedCorpus | None) -> Iterator[Document]:
    """Documents of one source as the shard builder sees them (normalised, empty ones dropped; with
    `max_bytes`, the prefix ending before the first document that would take the UTF-8 bytes of text past
    it), read unit after unit in one process; for inspection and tokenizer training."""
    from crystal_lm.data.build import normalize_text, utf8_len
    from crystal_lm.data.prepare import source_units
    from crystal_lm.data.readers import Document, ReadStats, read_unit

    src: SourceConfig = recipe.data.sources[name]
    fmt, units = source_units(recipe, name, corpus)
    total = 0
    stats = ReadStats()
    for unit in units:
        for doc in read_unit(unit, src, fmt, stats):
            text = normalize_text(doc.text, recipe.data.normalize)
            if not text.strip():
                continue
            if src.max_bytes is not None:
                total += utf8_len(text)
                if total > src.max_bytes:
                    return
            yield Document(doc.id, text)


def source_fingerprint(recipe: Recipe, name: str, corpus: EmbeddedCorpus | None) -> str:
    """What identifies a source's content and its processing: the corpus hash or the user files' paths,
    sizes and mtimes, the source's settings, normalisation and tokenization chunking."""
    src = recipe.data.sources[name]
    settings = {
        **dataclasses.asdict(src),
        "normalize": recipe.data.normalize,
        "chunk_chars": recipe.data.chunk_chars,
        "seed": recipe.seed if src.document_fim is not None else None,  # the per-document FIM draws
    }
    # Shards built under earlier rules differ: max_bytes counted characters and read on past its cut;
    # document_fim also FIM'd validation documents.
    if src.max_bytes is not None:
        settings["max_bytes_rule"] = "utf8-prefix"
    if src.document_fim is not None:
        settings["document_fim_rule"] = "train-only"
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if src.embedded is not None:
        assert corpus is not None
        h.update(corpus.part_sha256(src.embedded).encode())
    else:
        from crystal_lm.data.readers import _expand

        _, files, odd = _expand(recipe.resolve_path(src.path or ""))  # what a folder or glob stands for
        for p in files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for p, reason, _ in odd:  # entries not read (a dangling link...): by name, they cannot be stat'ed
            h.update(f"{p}\0{reason}\n".encode())
    return h.hexdigest()[:16]


def id_hash(doc_id: str) -> float:
    """A uniform number in [0, 1) from a document id (stable across machines and Python versions)."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
