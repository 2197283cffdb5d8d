"""Building a source's packed shards: parallel, resumable, bounded in memory.

The source's input is split into units (files, or byte ranges of large JSONL files; see `readers`). A worker
process turns one unit into train and validation shards: read → normalise (ftfy + NFC, as Crystal) → tokenize
(long documents in ~2000-character pieces cut at spaces) → drop documents under the minimum length →
`<s> … </s>` → pack across document boundaries into `seq_len + 1` windows, the unit's last window padded
(Crystal packed per input file and padded its remainder). A finished unit is renamed into `units/` with its
counts and hashes, so an interrupted build redoes only unfinished units: no document is lost or repeated.
When every unit is done, `finalize` links the units' shards, in unit order, into the split folders, so the
result does not depend on the number of workers. The same `build_unit` runs on other engines (see
`crystal_lm.data.distributed`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crystal_lm.config import SourceConfig
from crystal_lm.data.documents import id_hash
from crystal_lm.data.fim import permute_segment
from crystal_lm.data.mixture import _rng
from crystal_lm.data.readers import Document, ReadStats, Unit, read_unit
from crystal_lm.data.shards import FORMAT_VERSION, ShardWriter, token_dtype
from crystal_lm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MIN_DOC_TOKENS = 10  # Crystal drops documents shorter than this (crystal-spec §3.2)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs to build one unit of a source (picklable)."""

    source: str
    domain: str
    src: SourceConfig
    fmt: str
    tokenizer_path: str
    seq_len: int
    vocab_size: int
    val_fraction: float
    normalize: str
    chunk_chars: int | None
    # The text budget left for this unit (sources capped with `max_bytes`: UTF-8 bytes of normalised text).
    max_bytes: int | None = None
    force_val: tuple[str, ...] = ()  # documents held out whatever their hash (see `ensure_validation`)
    seed: int = 1  # for per-document FIM draws


def normalize_text(text: str, mode: str) -> str:
    """Crystal's `ftfy.fix_text` with NFC (`ftfy`), NFC only (`nfc`) or nothing; newlines made Unix."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "ftfy":
        return ftfy_fix(text)
    if mode == "nfc":
        return unicodedata.normalize("NFC", text)
    return text


# What ftfy 6 can change in ASCII text: HTML entities (`&`), control characters it removes (all but \t \n \f
# \r) with terminal escapes (\x1b), carriage returns. Its other fixes act on non-ASCII characters only.
_FTFY_ASCII_TARGETS = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f\r]")


def ftfy_fix(text: str) -> str:
    """`ftfy.fix_text(text, normalization="NFC")`, without running ftfy on the lines it leaves alone.

    ftfy fixes a text line by line; the only state it carries from line to line is that HTML entities are
    no longer decoded once a line has held a "<". ASCII lines with none of `_FTFY_ASCII_TARGETS` come out
    unchanged (checked against ftfy in tests/data/test_build.py), so only the runs of other lines go to
    ftfy, each with the state the whole text would have given it. Code and English prose are mostly
    such lines: this makes Crystal's normalisation several times cheaper.
    """
    if text.isascii() and not _FTFY_ASCII_TARGETS.search(text):
        return text
    import ftfy

    out: list[str] = []
    run: list[str] = []  # consecutive lines ftfy must see
    html = True  # ftfy's unescape_html="auto" until a line with "<"
    run_html = True

    def flush() -> None:
        if run:
            out.append(
                ftfy.fix_text("".join(run), normalization="NFC", unescape_html="auto" if run_html else False)
            )
            run.clear()

    lines = text.split("\n")
    for i, line in enumerate(lines):
        segment = line + "\n" if i < len(lines) - 1 else line
        if not segment:
            continue
        if segment.isascii() and not _FTFY_ASCII_TARGETS.search(segment):
            flush()
            out.append(segment)
        else:
            if not run:
                run_html = html
            run.append(segment)
        html = html and "<" not in segment
    flush()
    return "".join(out)


def split_for_tokenizing(text: str, chunk_chars: int | None) -> list[str]:
    """Pieces of about `chunk_chars` characters, each cut before a space where there is one, so a long
    document is tokenized in bounded pieces (the space starts the next piece, as a word boundary)."""
    if not chunk_chars or len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = text.rfind(" ", start + chunk_chars // 2, start + chunk_chars)
        cut = cut if cut > start else start + chunk_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def is_validation(doc_id: str, fraction: float) -> bool:
    """Held out by a hash of the document id: independent of reading order, workers and tokenizer."""
    return fraction > 0 and id_hash(doc_id) < fraction


def _encode(tok: Tokenizer, docs: list[Document], chunk_chars: int | None) -> list[list[int]]:
    pieces, owner = [], []
    for i, d in enumerate(docs):
        for p in split_for_tokenizing(d.text, chunk_chars):
            pieces.append(p)
            owner.append(i)
    out: list[list[int]] = [[] for _ in docs]
    for i, ids in zip(owner, tok.encode_batch(pieces), strict=True):
        out[i].extend(ids)
    return out


def utf8_len(text: str) -> int:
    """UTF-8 bytes of a text (what `max_bytes` counts)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _normalized(
    spec: BuildSpec, docs: Iterator[Document], stats: ReadStats, reached: list[bool]
) -> Iterator[Document]:
    """Normalised non-empty documents; with a budget, the prefix that fits it: the first document that would
    exceed it ends the source (`reached` is set), as `documents.iter_source` ends it."""
    budget = spec.max_bytes
    for d in docs:
        text = normalize_text(d.text, spec.normalize)
        if not text.strip():
            stats.skipped["empty"] = stats.skipped.get("empty", 0) + 1
            continue
        if budget is not None:
            budget -= utf8_len(text)
            if budget < 0:
                reached.append(True)
                return
        yield Document(d.id, text)


def build_unit(spec: BuildSpec, unit: Unit, units_dir: Path) -> dict:
    """Build one unit into `units_dir/<unit key>/` (atomically); returns its record. Idempotent."""
    final = units_dir / unit.key
    if (final / "unit.json").is_file():
        return json.loads((final / "unit.json").read_text())
    tmp = units_dir / f".{unit.key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = Tokenizer(spec.tokenizer_path)
    writers = {
        s: ShardWriter(
            tmp / s, spec.seq_len, token_dtype(spec.vocab_size), tok.bos_id, tok.eos_id, tok.sha256
        )
        for s in SPLITS
    }
    stats = ReadStats()
    dropped = 0
    t0 = time.time()
    batch: list[Document] = []

    fim = spec.src.document_fim

    def flush() -> None:
        nonlocal dropped
        for doc, ids in zip(batch, _encode(tok, batch, spec.chunk_chars), strict=True):
            if len(ids) < MIN_DOC_TOKENS:
                dropped += 1
                continue
            held_out = is_validation(doc.id, spec.val_fraction) or doc.id in spec.force_val
            if fim is not None and not held_out:
                # StarCoder-style: the whole document, before packing; keyed by its id. Training documents
                # only: validation stays plain text, comparable across stages and sources.
                rng = _rng(spec.seed, spec.source, "document-fim", doc.id)
                ids = permute_segment(np.asarray(ids), tok, rng, fim.rate, fim.spm_rate)[0].tolist()
            writers["val" if held_out else "train"].add(doc.id, ids)
        batch.clear()

    pending = text_bytes = 0
    reached: list[bool] = []
    if spec.max_bytes is not None and spec.max_bytes < 0 and not unit.skip:
        docs: Iterator[Document] = iter(())  # a unit after the end of the source's `max_bytes` prefix
        reached.append(True)
    else:
        docs = _normalized(spec, read_unit(unit, spec.src, spec.fmt, stats), stats, reached)
    for doc in docs:
        batch.append(doc)
        pending += len(doc.text)
        text_bytes += utf8_len(doc.text) if spec.max_bytes is not None else len(doc.text)
        if len(batch) >= 256 or pending >= 2**20:  # bounded memory whatever the document sizes
            flush()
            pending = 0
    flush()
    meta = {"source": spec.source, "domain": spec.domain, "unit": asdict(unit) | {"key": unit.key}}
    splits = {
        s: json.loads((w.close(meta | {"split": s}) / "index.json").read_text()) for s, w in writers.items()
    }
    record = {
        "key": unit.key,
        "unit": asdict(unit),
        "documents_read": stats.documents,
        "skipped": dict(sorted(stats.skipped.items())),
        "skip_examples": stats.examples[:5],
        "filtered_by": stats.filtered_by,
        "dropped_short_documents": dropped,
        "text_bytes": text_bytes,  # UTF-8 bytes under `max_bytes` (characters otherwise)
        "max_bytes_reached": bool(reached),  # the source's `max_bytes` prefix ended in or before this unit
        "seconds": round(time.time() - t0, 3),
        "splits": {
            s: {
                "documents": idx["n_documents"],
                "tokens": idx["n_tokens"],
                "samples": idx["n_samples"],
                "shards": idx["shards"],
            }
            for s, idx in splits.items()
        },
    }
    (tmp / "unit.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return record


def _worker(args: tuple[BuildSpec, Unit, str]) -> dict:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker process: no oversubscription
    spec, unit, units_dir = args
    return build_unit(spec, unit, Path(units_dir))


def build_units(
    spec: BuildSpec,
    units: list[Unit],
    root: Path,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Build every unfinished unit of a source under `root/units` with `workers` processes."""
    units_dir = root / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    for stale in units_dir.glob(".*.tmp*"):  # left by a killed worker
        shutil.rmtree(stale, ignore_errors=True)
    todo = [u for u in units if not (units_dir / u.key / "unit.json").is_file()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if spec.max_bytes is not None:
        workers = 1  # a byte budget is spent in unit order
    done = len(units) - len(todo)
    if todo:
        log.info("%s: %d of %d units to build with %d worker(s)", spec.source, len(todo), len(units), workers)
    if workers == 1 or len(todo) <= 1:
        before: list[dict] = []
        for u in units:  # in unit order: a text budget is spent by the units before, built now or earlier
            path = units_dir / u.key / "unit.json"
            if path.is_file():
                record = json.loads(path.read_text())
            else:
                record = build_unit(_with_budget(spec, budget_left(spec.max_bytes, before)), u, units_dir)
                done += 1
                if progress:
                    progress(done, len(units))
            before.append(record)
    else:
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited threads or tokenizer state
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(_worker, [(spec, u, str(units_dir)) for u in todo]):
                done += 1
                if progress:
                    progress(done, len(units))
    return [json.loads((units_dir / u.key / "unit.json").read_text()) for u in units]


def budget_left(max_bytes: int | None, before: list[dict]) -> int | None:
    """The text budget of the unit after the `before` records: what they left, or -1 once the source's
    `max_bytes` prefix has ended (a later unit is not read, even where a smaller document would fit)."""
    if max_bytes is None:
        return None
    if any(r.get("max_bytes_reached") for r in before):
        return -1
    return max_bytes - sum(r["text_bytes"] for r in before)


def _with_budget(spec: BuildSpec, budget: int | None) -> BuildSpec:
    return spec if budget is None else BuildSpec(**{**spec.__dict__, "max_bytes": budget})


def ensure_validation(spec: BuildSpec, units: list[Unit], root: Path, records: list[dict]) -> list[dict]:
    """A small source whose ids all hash above the validation fraction still holds one document out: the
    one with the smallest id hash. Only its unit is rebuilt (units are independent)."""
    if spec.val_fraction <= 0 or any(r["splits"]["val"]["documents"] for r in records):
        return records
    candidates = []
    for k, r in enumerate(records):
        with open(root / "units" / r["key"] / "train" / "documents.jsonl") as f:
            candidates += [(id_hash(d["id"]), d["id"], k) for d in map(json.loads, f)]
    if len(candidates) < 2:
        return records
    # Holding out an id all the documents share would leave nothing to train on.
    shared = Counter(doc_id for _, doc_id, _ in candidates)
    candidates = [c for c in candidates if shared[c[1]] < len(candidates)]
    if not candidates:
        log.warning("%s: no validation documents: all documents share one id", spec.source)
        return records
    _, doc_id, k = min(candidates)
    shutil.rmtree(root / "units" / units[k].key)
    # The unit is rebuilt with the text budget it had (what the units before it left).
    forced = BuildSpec(
        **{**_with_budget(spec, budget_left(spec.max_bytes, records[:k])).__dict__, "force_val": (doc_id,)}
    )
    return [*records[:k], build_unit(forced, units[k], root / "units"), *records[k + 1 :]]


def finalize(
    root: Path, records: list[dict], seq_len: int, tokenizer_sha256: str, dtype: str, meta: dict
) -> None:
    """Link the units' shards, in unit order, into `root/train` and `root/val` with one index each.
    Document offsets are shifted so window i of the split covers stream positions [i·L, i·L + L + 1)."""
    for split in SPLITS:
        tmp = root / f".{split}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shards, rows = [], 0
        n_docs = n_tokens = 0
        with open(tmp / "documents.jsonl", "w") as docs_out:
            for u, rec in enumerate(records):
                unit_split = root / "units" / rec["key"] / split
                offset = rows * seq_len  # the unit's stream starts at its first window
                with open(unit_split / "documents.jsonl") as f:
                    for line in f:
                        d = json.loads(line)
                        d["start"] += offset
                        d["unit"] = u
                        docs_out.write(json.dumps(d) + "\n")
                for s in rec["splits"][split]["shards"]:
                    name = f"shard-{len(shards):05d}.bin"
                    os.link(unit_split / s["file"], tmp / name)
                    shards.append({**s, "file": name, "unit": rec["key"], "unit_index": u})
                    rows += s["n_samples"]
                n_docs += rec["splits"][split]["documents"]
                n_tokens += rec["splits"][split]["tokens"]
        index = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tokenizer_sha256,
            "seq_len": seq_len,
            "dtype": dtype,
            "n_samples": rows,
            "n_documents": n_docs,
            "n_tokens": n_tokens,
            "shards": shards,
            "split": split,
            **meta,
            "units": [
                {
                    "key": r["key"],
                    "unit": r["unit"],
                    "documents": r["splits"][split]["documents"],
                    "documents_read": r["documents_read"],
                    "skipped": r["skipped"],
                    "dropped_short_documents": r["dropped_short_documents"],
                }
                for r in records
            ],
            # The source's `max_bytes` prefix ended before its last document (the rest was not read).
            "max_bytes_reached": any(r.get("max_bytes_reached", False) for r in records),
            "skipped": total_counts(r["skipped"] for r in records),
            "skip_examples": [e for r in records for e in r["skip_examples"]][:10],
            "dropped_short_documents": sum(r["dropped_short_documents"] for r in records),
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        shutil.rmtree(root / split, ignore_errors=True)
        os.replace(tmp, root / split)


def total_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts per reason, summed over units."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))
