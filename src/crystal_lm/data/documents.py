"""Documents from a recipe's sources: the embedded corpus, JSONL files, or directories of source files.

Bad input is an error that names the file and line. The held-out validation split is chosen per source by a
hash of the document id, so it does not depend on reading order or on the tokenizer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crystal_lm.config import Recipe, SourceConfig
from crystal_lm.data.corpus import EmbeddedCorpus, normalise


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix == ".jsonl")
    elif any(c in str(path) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)))
    else:
        files = [path]
    if not files:
        raise DataError(f"{path}: no JSONL files found")
    return files


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    for file in _jsonl_files(path):
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{file}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(
                        f"{file}:{lineno}: no string field {text_field!r} (set the source's "
                        "text_field to the field that holds the document)"
                    )
                doc_id = str(record.get("id", f"{file.name}:{lineno}"))
                yield Document(doc_id, record[text_field])


def _iter_files(root: Path, extensions: list[str] | None) -> Iterator[Document]:
    exts = tuple(e if e.startswith(".") else f".{e}" for e in (extensions or [".py"]))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(exts):
                p = Path(dirpath) / name
                data = p.read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = data.decode("latin-1")
                yield Document(p.relative_to(root).as_posix(), text)


def iter_source(recipe: Recipe, name: str, corpus: EmbeddedCorpus | None) -> Iterator[Document]:
    """Documents of one source, normalised (NFC, Unix newlines), empty ones dropped, up to `max_bytes`."""
    src: SourceConfig = recipe.data.sources[name]
    if src.embedded is not None:
        assert corpus is not None
        raw = _iter_jsonl(corpus.part_path(src.embedded), "text")
    else:
        path = recipe.resolve_path(src.path or "")
        fmt = src.format or ("files" if path.is_dir() and not any(path.rglob("*.jsonl")) else "jsonl")
        raw = _iter_jsonl(path, src.text_field) if fmt == "jsonl" else _iter_files(path, src.extensions)
    total = 0
    for doc in raw:
        text = normalise(doc.text)
        if not text.strip():
            continue
        total += len(text)
        if src.max_bytes is not None and total > src.max_bytes:
            return
        yield Document(doc.id, text)


def source_fingerprint(recipe: Recipe, name: str, corpus: EmbeddedCorpus | None) -> str:
    """What identifies a source's content: the corpus hash, or user files' paths, sizes and mtimes."""
    src = recipe.data.sources[name]
    h = hashlib.sha256(
        json.dumps(
            {
                "max_bytes": src.max_bytes,
                "field": src.text_field,
                "ext": src.extensions,
                "format": src.format,
            },
            sort_keys=True,
        ).encode()
    )
    if src.embedded is not None:
        assert corpus is not None
        h.update(corpus.part_sha256(src.embedded).encode())
    else:
        path = recipe.resolve_path(src.path or "")
        files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else _jsonl_files(path)
        for p in files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def id_hash(doc_id: str) -> float:
    """A uniform number in [0, 1) from a document id (stable across machines and Python versions)."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def validation_ids(doc_ids: list[str], fraction: float) -> set[str]:
    """Documents held out: those whose id hash falls under `fraction`, and at least one when fraction > 0."""
    if fraction <= 0 or not doc_ids:
        return set()
    chosen = {d for d in doc_ids if id_hash(d) < fraction}
    if not chosen and len(doc_ids) > 1:
        chosen = {min(doc_ids, key=id_hash)}
    return chosen
