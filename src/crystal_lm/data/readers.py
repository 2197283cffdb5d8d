"""Streaming readers of real corpus formats, in units of work that worker processes read independently.

Formats: ``jsonl`` (one JSON object a line; plain, gzip or zstandard; SlimPajama), ``parquet`` (StarCoderData:
``<root>/<language>/*.parquet`` with a ``content`` column), ``files`` (a source tree) and ``hf_disk`` (a Hugging
Face ``save_to_disk`` folder of Arrow stream files).

Memory stays bounded whatever the input: JSONL lines are read with a length limit and a line far longer than
the source's ``max_doc_bytes`` is skipped in small chunks, never held whole; Parquet and Arrow are read batch by
batch. A plain JSONL file larger than ``unit_bytes`` is split into byte ranges: a range owns the lines that
*start* inside it, so each line belongs to exactly one range, and a document's id does not depend on how the
file was split.

Bad records (malformed JSON, bytes that are not UTF-8, a missing or non-string text field) raise a `DataError`
naming the file and line when the source's ``on_error`` is ``fail``; with ``skip`` they are counted per reason
in `ReadStats`. Empty documents (``empty``), documents over ``max_doc_bytes`` (``too_large``) and records left
out by ``where`` or ``languages`` (``filtered``) are always skipped and counted, never an error.

Every entry of a folder or glob is read or accounted for (see `list_units`): symlinked folders are followed,
each real folder and file once; a file the source cannot read is an error or, with ``skip``, counted.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from crystal_lm.config import SourceConfig
from crystal_lm.data.documents import DataError

__all__ = [
    "FORMATS",
    "LANGUAGE_OF_EXTENSION",
    "DataError",
    "Document",
    "ReadStats",
    "Unit",
    "detect_format",
    "list_units",
    "read_unit",
    "source_settings_error",
]

FORMATS = ("jsonl", "parquet", "files", "hf_disk")
DEFAULT_TEXT_FIELD = {"jsonl": "text", "hf_disk": "text", "parquet": "content"}

# Language of a source file by extension (names as in StarCoderData's folders where it has them).
LANGUAGE_OF_EXTENSION = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".scss": "scss",
    ".java": "java",
    ".c": "c",
    ".h": "c",
    ".cpp": "cpp",
    ".cc": "cpp",
    ".cxx": "cpp",
    ".hpp": "cpp",
    ".hh": "cpp",
    ".cs": "c-sharp",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".kt": "kotlin",
    ".scala": "scala",
    ".lua": "lua",
    ".pl": "perl",
    ".r": "r",
    ".jl": "julia",
    ".hs": "haskell",
    ".sh": "shell",
    ".bash": "shell",
    ".sql": "sql",
    ".md": "markdown",
    ".rst": "restructuredtext",
    ".tex": "tex",
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
}

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".zst")
# Any of these makes a folder JSONL data; bare .json files only when there is no source code next to them.
_STRONG_JSONL_SUFFIXES = tuple(s for s in _JSONL_SUFFIXES if s != ".json")
_HF_MARKERS = ("state.json", "dataset_info.json")
# Compressions JSONL files may not use, by suffix: named in the error rather than read as bad UTF-8.
_UNSUPPORTED_COMPRESSION = {
    ".bz2": "bzip2",
    ".xz": "xz",
    ".lzma": "lzma",
    ".lz4": "lz4",
    ".br": "brotli",
    ".snappy": "snappy",
    ".zip": "zip",
    ".7z": "7z",
    ".tar": "tar",
    ".tgz": "tar.gz",
}
# Documentation beside data (a dataset card, a licence): not data, counted as `not_data`, never an error.
_DOC_NAMES = ("readme", "license", "licence", "copying", "notice", "citation", "changelog")
# Files left out by design, counted but never an error.
_ROUTINE_FILE_SKIPS = frozenset({"not_data", "other_extension", "other_language"})
_SKIP_HINT = "or set the source's on_error: skip to count and skip such records"
_MAX_EXAMPLES = 5
_MAX_VALUES_SEEN = 12  # distinct values of a filtered field kept to show (SlimPajama has 7 set names)
_DISCARD_CHUNK = 64 * 1024
# A JSONL line may be this many times max_doc_bytes (plus the slack, for other fields) before it is skipped
# unread: a \u escape (6 bytes) stands for a character of 1 to 3 UTF-8 bytes (a surrogate pair 12 for 4),
# so a text within max_doc_bytes fits unless it is mostly escaped control characters.
_RAW_LINE_FACTOR = 4
_RAW_LINE_SLACK = 64 * 1024
_BATCH_ROWS = 1024
# Reasons that are listed in `ReadStats.examples` (the others, `empty` and `filtered`, are routine).
_EXAMPLE_REASONS = frozenset(
    {
        "malformed_json",
        "not_utf8",
        "missing_field",
        "too_large",
        "truncated_file",
        "corrupt_file",
        "unreadable",
        "unsupported_format",
        "not_regular_file",
    }
)


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Unit:
    """One piece of input read by one worker: a file, a byte range of a plain JSONL file, or a group of files.

    `path` is the file (for ``files``, the tree's root, with the group's files relative to it in `files`);
    `start` and `end` a byte range (``end=None``: to the end); `name` the file's name relative to the source,
    used in document ids. A unit with a `skip` reason stands for `files` that are not read, only counted.
    """

    path: str
    start: int = 0
    end: int | None = None
    name: str = ""
    files: tuple[str, ...] = ()
    skip: str = ""

    @property
    def key(self) -> str:
        """A stable short id of the unit (its path, range and files), used to name its output."""
        spec = json.dumps(
            [self.path, self.start, self.end, list(self.files)] + ([self.skip] if self.skip else [])
        )
        return hashlib.sha256(spec.encode()).hexdigest()[:16]


@dataclass
class ReadStats:
    """What a reader saw: documents yielded, and records skipped per reason with a few examples.

    `filtered_by` says why records were `filtered`: per `where` key (the first one a record failed) or
    ``languages``, how many records lacked the field (``absent``) and a few distinct values seen (``values``),
    so a filter that keeps nothing can name a misspelt key or the values there are.
    """

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    filtered_by: dict[str, dict[str, Any]] = field(default_factory=dict)

    def skip(self, reason: str, where: str | None = None, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if where is not None and reason in _EXAMPLE_REASONS and len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def filtered(self, key: str, value: Any) -> None:
        """A record left out by the filter on `key`, whose value there was `value` (`_MISSING`: absent)."""
        self.skipped["filtered"] = self.skipped.get("filtered", 0) + 1
        miss = self.filtered_by.get(key)
        if miss is None:
            miss = self.filtered_by[key] = {"absent": 0, "values": []}
        if value is _MISSING:
            miss["absent"] += 1
        elif len(miss["values"]) < _MAX_VALUES_SEEN:  # a small list: bounded work per record
            shown = (value if type(value) is str else json.dumps(value, default=str))[
                :80
            ]  # unit.json stays small
            if shown not in miss["values"]:
                miss["values"].append(shown)

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])
        self.filtered_by = merge_filtered_by([self.filtered_by, other.filtered_by])


def merge_filtered_by(parts: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """`ReadStats.filtered_by` of several units, summed (values: the first few distinct ones)."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for key, miss in part.items():
            mine = out.setdefault(key, {"absent": 0, "values": []})
            mine["absent"] += miss["absent"]
            for v in miss["values"]:
                if v not in mine["values"] and len(mine["values"]) < _MAX_VALUES_SEEN:
                    mine["values"].append(v)
    return out


def describe_filtered(src: SourceConfig, filtered_by: dict[str, dict[str, Any]]) -> str:
    """Why a source's filters kept nothing, for the error that says it has no usable documents: a `where`
    key absent from every record (misspelt?), or the values the records hold there."""
    notes = []
    for key, miss in sorted(filtered_by.items()):
        if key == "languages":
            what, wanted = "`languages`", sorted(src.languages or [])
        else:
            what, want = f"`where` {key}", (src.where or {}).get(key)
            wanted = want if isinstance(want, list) else [want]
        if not miss["values"]:
            notes.append(
                f"{what}: absent from all {miss['absent']} records filtered (check the key's spelling; a "
                "nested field is dotted, e.g. meta.redpajama_set_name)"
            )
            continue
        seen = ", ".join(repr(v) for v in miss["values"])
        more = ", …" if len(miss["values"]) >= _MAX_VALUES_SEEN else ""
        absent = f"; {miss['absent']} records lack the field" if miss["absent"] else ""
        notes.append(f"{what}: none of {wanted} found; values seen: {seen}{more}{absent}")
    return "; ".join(notes)


class _Bad(Exception):
    """A bad record or file: raised as a `DataError` in fail mode, counted in skip mode."""

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail


def _bad(src: SourceConfig, stats: ReadStats, where: str, exc: _Bad) -> None:
    if src.on_error == "fail":
        raise DataError(f"{where}: {exc.message}") from None
    stats.skip(exc.reason, where, exc.detail)


# ------------------------------------------------------------------------------------------ listing


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


# A file that is not a readable regular file: (path, reason, what is wrong with it).
_Odd = tuple[Path, str, str]


def _walk(root: Path, odd: list[_Odd]) -> list[Path]:
    """Files under `root` (hidden files and folders such as ``.git`` left out), following symlinked folders
    but entering each real folder once (`seen` holds their (device, inode)), so a symlink loop ends. Entries
    that are not regular files (dangling links, FIFOs, ...) and unreadable folders go to `odd`."""
    out = []
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}

    def on_error(exc: OSError) -> None:
        odd.append((Path(exc.filename or root), "unreadable", f"cannot list the folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError as exc:
                odd.append((Path(dirpath) / d, "unreadable", f"cannot open the folder ({exc.strerror})"))
                continue
            if (st.st_dev, st.st_ino) not in seen:  # else a symlink loop, or a second link to a folder
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirnames[:] = keep
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return out


def _file_kind(p: Path) -> tuple[str, str] | None:
    """None for a regular file (symlinks followed); else the skip reason and what the entry is."""
    try:
        st = os.stat(p)
    except OSError as exc:
        if os.path.islink(p) and not os.path.exists(p):
            return "unreadable", f"a symbolic link to {os.readlink(p)}, which does not exist"
        return "unreadable", f"cannot read ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
    )
    return "not_regular_file", f"{kind}, not a regular file; only regular files are read"


def _glob_match(pattern: list[str], parts: tuple[str, ...]) -> bool:
    """Whether relative path `parts` matches glob `pattern` (``**``: any number of folders)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:])


def _expand(path: Path) -> tuple[Path, list[Path], list[_Odd]]:
    """The folder names are relative to, the regular files under `path` (a file, a folder or a glob) sorted,
    each real file once (a second link to it left out), and the entries that are not readable files."""
    s = str(path)
    odd: list[_Odd] = []
    found: list[Path] = []
    if _has_magic(s):
        parts = path.parts
        n = next(i for i, p in enumerate(parts) if _has_magic(p))
        base = Path(*parts[:n]) if n else Path(".")
        pattern = list(parts[n:])
        if base.is_dir():
            # Walked (loop-safe) rather than globbed: a glob follows symlink loops until ELOOP.
            walked: list[_Odd] = []

            def matches(p: Path) -> bool:  # the file, or a folder above it, matches
                rel = p.relative_to(base).parts
                return any(_glob_match(pattern, rel[:k]) for k in range(1, len(rel) + 1))

            found = [p for p in _walk(base, walked) if matches(p)]
            odd = [o for o in walked if matches(o[0])]
        if not found and not odd:
            raise DataError(f"{path}: no files match this pattern (check the source's path)")
    elif path.is_dir():
        base, found = path, _walk(path, odd)
    elif os.path.lexists(path):
        problem = _file_kind(path)
        if problem is not None:
            raise DataError(f"{path}: {problem[1]} (check the source's path)")
        base, found = path.parent, [path]
    else:
        raise DataError(f"{path}: no such file or directory (check the source's path)")
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for p in sorted(set(found), key=lambda p: p.relative_to(base).as_posix()):
        problem = _file_kind(p)
        if problem is not None:
            odd.append((p, *problem))
            continue
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:  # the same real file reached by two paths is read once
            seen.add((st.st_dev, st.st_ino))
            files.append(p)
    return base, files, sorted(odd)


def _is_jsonl(p: Path, strong: bool = False) -> bool:
    return p.name.lower().endswith(_STRONG_JSONL_SUFFIXES if strong else _JSONL_SUFFIXES)


def _language(p: Path) -> str | None:
    return LANGUAGE_OF_EXTENSION.get(p.suffix.lower())


def _data_kind(p: Path) -> str | None:
    """The data format a file's name says, if any (a JSONL file in an unsupported compression counts)."""
    name = p.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "hf_disk"
    if p.suffix.lower() in _UNSUPPORTED_COMPRESSION:
        name = name[: -len(p.suffix)]
    return "jsonl" if name.endswith(_STRONG_JSONL_SUFFIXES) else None


def detect_format(path: Path) -> str:
    """The format of the data at `path` (a file, folder or glob), guessed from the files present."""
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or (any((path / m).is_file() for m in _HF_MARKERS) and any(path.glob("*.arrow")))
    ):
        return "hf_disk"
    _, files, odd = _expand(path)
    if not files:
        why = f" ({odd[0][0]}: {odd[0][2]})" if odd else ""
        raise DataError(f"{path}: no files to read{why} (check the source's path)")
    kinds: dict[str, list[Path]] = {}
    for p in files:
        kind = _data_kind(p)
        if kind is not None:
            kinds.setdefault(kind, []).append(p)
    if len(kinds) > 1:  # guessing would leave one format's files out
        listing = "; ".join(
            f"{k}: {', '.join(str(q) for q in ps[:3])}{', …' if len(ps) > 3 else ''}"
            for k, ps in sorted(kinds.items())
        )
        raise DataError(
            f"{path}: holds data files of more than one format ({listing}); set the source's `format` to "
            "read one of them (files of other formats are then errors, or skipped and counted with "
            "on_error: skip), or point its path at one format's files with a glob such as <folder>/*.jsonl"
        )
    if kinds:
        return next(iter(kinds))
    has_code = any(_language(p) not in (None, "json") for p in files)
    if not has_code and any(_is_jsonl(p) for p in files):
        return "jsonl"
    return "files"


def source_settings_error(src: SourceConfig, fmt: str) -> str | None:
    """What is wrong with a source's filter settings for data of format `fmt`, or None. Needs no data, so a
    recipe can be checked when it is loaded wherever the format is known (`format` given, or `embedded`)."""
    if fmt not in FORMATS:
        return f"unknown source format {fmt!r} (known: {', '.join(FORMATS)})"
    if src.where and fmt == "files":
        return "`where` filters records of jsonl, parquet or hf_disk sources, not files (use `languages` or `extensions`)"
    if src.languages and fmt == "jsonl":
        return "`languages` filters parquet, hf_disk or files sources; for JSONL use `where`"
    if src.extensions and fmt != "files":
        return f"`extensions` filters files sources, not {fmt}"
    if src.max_doc_bytes < 1:
        return f"max_doc_bytes must be positive, not {src.max_doc_bytes}"
    if fmt == "files" and src.languages and not src.extensions:
        unknown = _wanted_languages(src) - set(LANGUAGE_OF_EXTENSION.values())  # type: ignore[operator]
        if unknown:
            return (
                f"unknown language(s) {sorted(unknown)} for a files source (known: "
                f"{', '.join(sorted(set(LANGUAGE_OF_EXTENSION.values())))}); or set `extensions`"
            )
    return None


def _check(src: SourceConfig, fmt: str) -> None:
    error = source_settings_error(src, fmt)
    if error is not None:
        raise DataError(error)


def _wanted_languages(src: SourceConfig) -> set[str] | None:
    return {lang.lower() for lang in src.languages} if src.languages else None


def _extension_filter(src: SourceConfig) -> Callable[[Path], bool]:
    if src.extensions:
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in src.extensions)
        return lambda p: p.name.lower().endswith(exts)
    wanted = _wanted_languages(src)
    if wanted is not None:  # the names were checked by `_check`
        return lambda p: _language(p) in wanted
    return lambda p: _language(p) is not None


def _not_readable_as(p: Path, fmt: str, named: bool) -> tuple[str, str] | None:
    """Why file `p` of a `fmt` source is not read (skip reason, message), or None to read it. A file the
    source's path names is read whatever its name; in a folder or glob, the name must fit the format."""
    compression = _UNSUPPORTED_COMPRESSION.get(p.suffix.lower())
    if compression is not None:
        return "unsupported_format", (
            f"compressed with {compression}, which is not supported (JSONL files may be plain, .gz or .zst); "
            "decompress it, or recompress it with gzip or zstd"
        )
    if named or (_is_jsonl(p) if fmt == "jsonl" else p.suffix.lower() == ".parquet"):
        return None
    if p.name.lower().startswith(_DOC_NAMES):
        return "not_data", ""
    names = "Parquet (.parquet)" if fmt == "parquet" else "JSONL (.jsonl or .json; plain, .gz or .zst)"
    return "unsupported_format", (
        f"not a {names} file, so this {fmt} source cannot read it; move it out of the source's folder, "
        "point the source's path at the data files with a glob, or set the source's format (`files` "
        "reads a source tree)"
    )


def _not_read_summary(bad: list[_Odd]) -> str:
    counts: dict[str, int] = {}
    for _, reason, _ in bad:
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))


def list_units(src: SourceConfig, path: Path, unit_bytes: int) -> list[Unit]:
    """The units of work of a source read from `path`, sorted (the same list for the same files).

    JSONL: one unit per file, a plain file larger than `unit_bytes` split into byte ranges of that size.
    Parquet and hf_disk: one unit per file. Files: groups of about `unit_bytes` of files in path order.
    Every other entry of a folder or glob is accounted for: a file the source cannot read (another format,
    an unsupported compression, a dangling link, a FIFO) is a `DataError` naming it, or with ``on_error:
    skip`` a unit that counts it as skipped; documentation files (README, LICENSE) beside data and, in a
    source tree, files of other languages are always counted (``not_data``, ``other_extension``), as are
    Parquet files that `languages` leaves out by their folder (``other_language``).
    """
    if unit_bytes < 1:
        raise DataError(f"unit_bytes must be positive, not {unit_bytes}")
    fmt = src.format or detect_format(path)
    _check(src, fmt)
    bad: list[_Odd] = []  # entries not read: (path, skip reason, message)
    base = path
    if fmt == "hf_disk":
        units = _hf_units(path)
    else:
        base, files, odd = _expand(path)
        rel = {p: p.relative_to(base).as_posix() for p in files}
        if fmt in ("jsonl", "parquet"):
            named = path.is_file()
            readable = []
            for p in files:
                why = _not_readable_as(p, fmt, named)
                if why is None:
                    readable.append(p)
                else:
                    bad.append((p, *why))
            files = readable
            bad.extend(odd)
        if fmt == "jsonl":
            units = []
            for p in files:
                size = p.stat().st_size
                if _compression(p) is None and size > unit_bytes:
                    units.extend(
                        Unit(str(p), s, min(s + unit_bytes, size), rel[p]) for s in range(0, size, unit_bytes)
                    )
                else:
                    units.append(Unit(str(p), name=rel[p]))
        elif fmt == "parquet":
            units = [Unit(str(p), name=rel[p]) for p in files]
            wanted = _wanted_languages(src)
            if wanted is not None:  # leave out whole files of other languages when the folder tells
                keep = [u for u in units if Path(u.path).parent.name.lower() in wanted or _lang_column(u)]
                if not keep and units:
                    folders = sorted({Path(u.path).parent.name for u in units})
                    raise DataError(
                        f"{path}: `languages` {sorted(src.languages or [])} matches no file: the Parquet files "
                        "have no lang or language column, so a file's folder names its language, and the "
                        f"folders here are {', '.join(folders)}"
                    )
                bad.extend((Path(u.path), "other_language", "") for u in units if u not in keep)
                units = keep
        else:
            keep = _extension_filter(src)
            # A source tree holds READMEs, images, ...: files of other languages are left out, and counted.
            bad.extend((p, "other_extension", "") for p in files if not keep(p))
            bad.extend(o if keep(o[0]) else (o[0], "other_extension", "") for o in odd)
            units, group, size = [], [], 0
            for p in files:
                if keep(p):
                    group.append(rel[p])
                    size += p.stat().st_size
                    if size >= unit_bytes:
                        units.append(Unit(str(base), files=tuple(group)))
                        group, size = [], 0
            if group:
                units.append(Unit(str(base), files=tuple(group)))
    errors = [b for b in bad if b[1] not in _ROUTINE_FILE_SKIPS]
    if errors and src.on_error == "fail":
        p, _, message = errors[0]
        more = ""
        if len(errors) > 1:
            others = ", ".join(str(q) for q, _, _ in errors[1:4]) + (", …" if len(errors) > 4 else "")
            more = f" ({len(errors) - 1} more files not read: {others})"
        raise DataError(f"{p}: {message}{more}; or set the source's on_error: skip to count and skip them")
    if not units:
        what = {"jsonl": "JSONL", "parquet": "Parquet", "hf_disk": "Arrow", "files": "matching source"}[fmt]
        left = f"; not read: {_not_read_summary(bad)}" if bad else ""
        raise DataError(f"{path}: no {what} files to read (check the source's path and filters{left})")
    for reason in sorted({r for _, r, _ in bad}):  # counted as skipped when the units are read
        names = tuple(sorted(p.relative_to(base).as_posix() for p, r, _ in bad if r == reason))
        units.append(Unit(str(base), files=names, skip=reason))
    return sorted(units, key=lambda u: (u.path, u.start, u.files))


def _lang_column(unit: Unit) -> bool:
    try:
        names = pq.read_schema(unit.path).names
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{unit.path}: cannot read the Parquet schema ({exc})") from None
    return "lang" in names or "language" in names


def _hf_units(path: Path) -> list[Unit]:
    if path.is_file():
        return [Unit(str(path), name=path.name)]
    if (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        raise DataError(
            f"{path}: a DatasetDict with splits {splits}; point the source's path at one split's folder "
            f"(e.g. {path / (splits[0] if splits else 'train')})"
        )
    state = path / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{state}: not a `save_to_disk` state file (no _data_files: {exc})") from None
        for n in names:
            if not (path / n).is_file():
                raise DataError(f"{path / n}: listed in {state} but missing (copy the whole dataset folder)")
    else:
        names = sorted(p.name for p in path.glob("*.arrow"))
    return [Unit(str(path / n), name=n) for n in names]


# -------------------------------------------------------------------------------------------- reading


def read_unit(unit: Unit, src: SourceConfig, fmt: str, stats: ReadStats) -> Iterator[Document]:
    """The documents of one unit in file order; skips are counted in `stats` (``max_bytes`` is the caller's)."""
    _check(src, fmt)
    if unit.skip:  # files `list_units` found unreadable: only counted
        for rel in unit.files:
            where = str(Path(unit.path) / rel)
            if src.on_error == "fail" and unit.skip not in _ROUTINE_FILE_SKIPS:
                raise DataError(f"{where}: not readable by this source ({unit.skip}); " + _SKIP_HINT)
            stats.skip(unit.skip, where)
        return
    if fmt == "jsonl":
        docs = _read_jsonl(unit, src, stats)
    elif fmt == "files":
        docs = _read_files(unit, src, stats)
    else:
        docs = _read_columnar(unit, src, fmt, stats)
    for doc in docs:
        stats.documents += 1
        yield doc


# JSONL ---------------------------------------------------------------------------------------------


def _compression(p: Path) -> str | None:
    name = p.name.lower()
    return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else None


def _zstd_complete(path: Path) -> bool:
    """Whether a .zst file holds only whole frames (the decompressor ends silently at a cut-off frame)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(5)
            if len(head) < 5:
                return False
            magic = int.from_bytes(head[:4], "little")
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
                f.seek(pos + 4)
                pos += 8 + int.from_bytes(f.read(4), "little")
                continue
            if magic != 0xFD2FB528:
                return False
            fhd = head[4]
            single = (fhd >> 5) & 1
            pos += 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
            while True:
                f.seek(pos)
                b = f.read(3)
                if len(b) < 3:
                    return False
                block = int.from_bytes(b, "little")
                kind = (block >> 1) & 3
                if kind == 3:
                    return False
                pos += 3 + (1 if kind == 1 else block >> 3)
                if block & 1:
                    break
            if (fhd >> 2) & 1:
                pos += 4
        return pos == size


def _open_jsonl(path: Path) -> tuple[BinaryIO, Callable[[], None]]:
    """A binary stream of the (decompressed) file, and a check to run at its end (raises `_Bad`)."""
    kind = _compression(path)
    if kind == "gz":
        return gzip.open(path, "rb"), lambda: None  # gzip raises EOFError itself on a cut-off stream
    if kind == "zst":
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        raw = dctx.stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)

        def check() -> None:
            if not _zstd_complete(path):
                raise EOFError("the zstandard stream ends inside a frame")

        return io.BufferedReader(raw, buffer_size=2**20), check  # type: ignore[arg-type]
    return open(path, "rb"), lambda: None


def _discard_line(f: BinaryIO) -> int:
    """Skip the rest of the current line in bounded chunks; the number of bytes skipped."""
    n = 0
    while True:
        chunk = f.readline(_DISCARD_CHUNK)
        n += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return n


def _lines(
    f: BinaryIO, offset: int, limit: int, at_end: Callable[[], None]
) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line) for each line from `offset`; line is None when longer than `limit` (never held)."""
    checked = False
    while True:
        line = f.readline(limit + 1)
        if len(line) > limit and not line.endswith(b"\n"):
            n = len(line)
            del line
            yield offset, None
            offset += n + _discard_line(f)
            continue
        if not line.endswith(b"\n") and not checked:  # the end of the stream: is it complete?
            checked = True
            at_end()
        if not line:
            return
        yield offset, line
        offset += len(line)


def _newlines_before(path: Path, offset: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 2**20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            offset -= len(chunk)
    return n


_MISSING = object()


def _lookup(record: Any, dotted: str) -> Any:
    if isinstance(record, dict) and dotted in record:
        return record[dotted]
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return _MISSING
        record = record[part]
    return record


def _where_miss(record: Any, where: dict[str, Any]) -> tuple[str, Any] | None:
    """None when the record passes `where`; else the first key it fails and its value there (`_MISSING`)."""
    for key, want in where.items():
        value = _lookup(record, key)
        if value is _MISSING or value not in (want if isinstance(want, list) else [want]):
            return key, value
    return None


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_JSON_TYPES = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _json_type(value: Any) -> str:
    """A value's type as JSON names it (`null`, not `NoneType`)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _parse_line(
    line: bytes, first: bool, src: SourceConfig, text_field: str, stats: ReadStats
) -> tuple[str, Any] | None:
    """The text of one JSONL record and its id field, or None when `where` leaves it out (counted in
    `stats`); raises `_Bad`."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(
            "not_utf8",
            f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); re-encode the file as UTF-8, "
            + _SKIP_HINT,
            f"byte {exc.start}",
        ) from None
    if first and s.startswith("\ufeff"):
        s = s[1:]
    try:
        record = json.loads(s)
    except (ValueError, RecursionError) as exc:
        msg = getattr(exc, "msg", type(exc).__name__)
        raise _Bad(
            "malformed_json", f"malformed JSON ({exc}); fix or remove the line, " + _SKIP_HINT, msg
        ) from None
    if not isinstance(record, dict):
        raise _Bad(
            "malformed_json",
            f"a JSON {_json_type(record)}, not an object; each line must be one JSON object, " + _SKIP_HINT,
            "not an object",
        )
    if src.where:
        miss = _where_miss(record, src.where)
        if miss is not None:
            stats.filtered(*miss)
            return None
    text = _lookup(record, text_field)
    if not isinstance(text, str):
        got = "missing" if text is _MISSING else f"a JSON {_json_type(text)}"
        raise _Bad(
            "missing_field",
            f"no string field {text_field!r} ({got}; set the source's text_field to the field that holds the "
            "document, " + _SKIP_HINT + ")",
            f"{text_field!r} {got}",
        )
    doc_id = record.get("id")
    if b"\\ud" in line or b"\\uD" in line:  # only a \u escape can give a lone surrogate
        for what, value in (("text", text), ("id", doc_id)):
            if isinstance(value, str) and not _valid_utf8(value):
                raise _Bad(
                    "not_utf8",
                    f"the {what} has an unpaired surrogate escape (\\ud800-\\udfff); fix the line, "
                    + _SKIP_HINT,
                    f"{what} has a lone surrogate",
                )
    return text, doc_id


def _read_jsonl(unit: Unit, src: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    path = Path(unit.path)
    name = unit.name or path.name
    text_field = src.text_field or DEFAULT_TEXT_FIELD["jsonl"]
    limit = src.max_doc_bytes
    # max_doc_bytes counts the text's UTF-8 bytes (as for Parquet), measured once the line is parsed; a
    # longer raw line (escapes, other fields) is skipped unread, never held whole.
    line_limit = _RAW_LINE_FACTOR * limit + _RAW_LINE_SLACK
    compressed = _compression(path) is not None
    if compressed and (unit.start or unit.end is not None):
        raise DataError(f"{path}: a compressed file cannot be read in byte ranges")
    base: int | None = 0 if unit.start == 0 else None
    count = 0  # lines read in this unit before the current one

    def where() -> str:
        nonlocal base
        if base is None:
            base = _newlines_before(path, first_offset)
        return f"{path}:{base + count + 1}"

    try:
        empty = compressed and path.stat().st_size == 0
        f, at_end = _open_jsonl(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc})") from None
    if empty:  # gzip and zstd read 0 bytes as an empty stream; even an empty text compresses to a header
        f.close()
        _bad(src, stats, str(path), _truncated("the compressed file is empty (0 bytes)"))
        return
    with f:
        offset = 0
        if unit.start > 0:
            f.seek(unit.start - 1)
            offset = unit.start - 1 + _discard_line(f)
        first_offset = offset
        try:
            for line_offset, line in _lines(f, first_offset, line_limit, at_end):
                if unit.end is not None and line_offset >= unit.end:
                    break
                try:
                    if line is None:
                        stats.skip("too_large", where(), f"over max_doc_bytes={limit}")
                        continue
                    if not line.strip():
                        continue
                    parsed = _parse_line(line, line_offset == 0, src, text_field, stats)
                    if parsed is None:
                        continue
                    text, doc_id = parsed
                    if _utf8_over(text, limit):
                        stats.skip("too_large", where(), f"over max_doc_bytes={limit}")
                        continue
                    if not text.strip():
                        stats.skip("empty")
                        continue
                    yield Document(f"{name}@{line_offset}" if doc_id is None else str(doc_id), text)
                except _Bad as exc:
                    _bad(src, stats, where(), exc)
                finally:
                    count += 1
        except EOFError:
            _bad(src, stats, str(path), _truncated())
        except (OSError, zlib.error, zstandard.ZstdError) as exc:
            _bad(src, stats, str(path), _corrupt("JSONL", exc))


def _truncated(what: str = "the compressed file ends early") -> _Bad:
    return _Bad(
        "truncated_file",
        f"{what} (truncated download or still being written); download it again, "
        "or set the source's on_error: skip to keep the documents before the cut",
    )


def _corrupt(what: str, exc: BaseException) -> _Bad:
    return _Bad(
        "corrupt_file",
        f"cannot be read as {what} ({type(exc).__name__}: {exc}); replace the file, or set the source's "
        "on_error: skip to keep what can be read",
        type(exc).__name__,
    )


# Parquet and Arrow ------------------------------------------------------------------------------------


# The end-of-stream marker a complete Arrow IPC stream ends with (continuation token, then length 0).
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class _ArrowTruncated(EOFError):
    pass


def _stream_batches(reader: Any, path: Path) -> Iterator[pa.RecordBatch]:
    """The batches of an Arrow stream, then a check that it was complete: a stream cut at a batch boundary
    reads without error, only the end-of-stream marker tells it was cut."""
    yield from reader
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - len(_ARROW_EOS)))
        if f.read() != _ARROW_EOS:
            raise _ArrowTruncated


def _arrow_batches(path: Path) -> tuple[pa.Schema, Iterable[pa.RecordBatch], Any]:
    """Schema, batches and the open memory map of an Arrow stream file (as `save_to_disk` writes) or file."""
    source = pa.memory_map(str(path))
    try:
        try:
            reader: Any = pa.ipc.open_stream(source)
            return reader.schema, _stream_batches(reader, path), source
        except pa.ArrowInvalid:
            source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches)), source
    except BaseException:
        source.close()
        raise


def _is_bytes_like(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _utf8_over(text: str, limit: int) -> bool:
    if len(text) > limit:
        return True
    return 4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit


def _read_columnar(unit: Unit, src: SourceConfig, fmt: str, stats: ReadStats) -> Iterator[Document]:
    path = Path(unit.path)
    what = "Parquet" if fmt == "parquet" else "Arrow"
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(str(path))
            schema, batches, closer = pf.schema_arrow, None, pf
        else:
            schema, batches, closer = _arrow_batches(path)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: cannot open ({exc})") from None
    except (OSError, pa.ArrowException) as exc:
        _bad(src, stats, str(path), _corrupt(what, exc))
        return
    with closer:
        names = schema.names
        text_field = src.text_field or DEFAULT_TEXT_FIELD[fmt]
        text_col = text_field if text_field in names else text_field.split(".")[0]
        if text_col not in names:
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set the source's text_field"
            )
        where_cols = []
        for key in src.where or {}:
            col = key if key in names else key.split(".")[0]
            if col not in names:
                raise DataError(
                    f"{path}: `where` names {key!r}, but there is no such column ({', '.join(names)})"
                )
            where_cols.append(col)
        wanted = _wanted_languages(src)
        lang_col = next((c for c in ("lang", "language") if c in names), None)
        if wanted is not None and lang_col is None:
            if fmt == "hf_disk":
                raise DataError(
                    f"{path}: `languages` needs a `lang` or `language` column ({', '.join(names)})"
                )
            if path.parent.name.lower() not in wanted:  # StarCoderData: the folder is the language
                return
        cols = {text_col, *where_cols}
        if wanted is not None and lang_col is not None:
            cols.add(lang_col)
        if "id" in names:
            cols.add("id")
        if batches is None:
            batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=sorted(cols))
        row = 0
        try:
            for batch in batches:
                yield from _batch_documents(
                    batch, row, src, stats, text_field, text_col, where_cols, unit.name or path.name, path
                )
                row += batch.num_rows
        except _ArrowTruncated:
            _bad(src, stats, f"{path}: row {row}", _truncated("the Arrow stream ends without its end marker"))
        except (OSError, EOFError, pa.ArrowException) as exc:
            _bad(src, stats, f"{path}: row {row}", _corrupt(what, exc))


def _batch_documents(
    batch: pa.RecordBatch,
    row0: int,
    src: SourceConfig,
    stats: ReadStats,
    text_field: str,
    text_col: str,
    where_cols: list[str],
    name: str,
    path: Path,
) -> Iterator[Document]:
    names = batch.schema.names
    column = batch.column(names.index(text_col))
    limit = src.max_doc_bytes
    too_large: list[bool] | None = None
    if text_col == text_field and _is_bytes_like(column.type):
        # Measure before converting, so a huge cell is not copied into a Python string.
        big = pc.fill_null(pc.greater(pc.binary_length(column), limit), False)
        if pc.any(big).as_py():
            too_large = big.to_pylist()
            column = pc.if_else(big, pa.scalar(None, column.type), column)
    elif (
        text_col == text_field
        and pa.types.is_dictionary(column.type)
        and _is_bytes_like(column.type.value_type)
    ):
        # A dictionary-encoded column: measure (and blank) the dictionary's values, then map them to rows.
        values = column.dictionary
        big_values = pc.fill_null(pc.greater(pc.binary_length(values), limit), False)
        if pc.any(big_values).as_py():
            too_large = pc.fill_null(pc.take(big_values, column.indices), False).to_pylist()
            values = pc.if_else(big_values, pa.scalar(None, values.type), values)
            column = pa.DictionaryArray.from_arrays(column.indices, values)
    texts = column.to_pylist()
    del column
    if text_col != text_field:
        texts = [_lookup({text_col: t}, text_field) for t in texts]
    ids = batch.column(names.index("id")).to_pylist() if "id" in names else None
    wanted = _wanted_languages(src)
    lang_col = next((c for c in ("lang", "language") if c in names), None)
    langs = batch.column(names.index(lang_col)).to_pylist() if wanted and lang_col else None
    wheres = {c: batch.column(names.index(c)).to_pylist() for c in where_cols}
    for i, text in enumerate(texts):
        row = row0 + i
        if langs is not None and str(langs[i]).lower() not in (wanted or ()):
            stats.filtered("languages", langs[i])
            continue
        if src.where:
            miss = _where_miss({c: v[i] for c, v in wheres.items()}, src.where)
            if miss is not None:
                stats.filtered(*miss)
                continue
        where = f"{path}: row {row}"
        if too_large is not None and too_large[i]:
            stats.skip("too_large", where, f"over max_doc_bytes={limit}")
            continue
        try:
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _Bad(
                        "not_utf8",
                        f"column {text_field!r} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                        + _SKIP_HINT,
                    ) from None
            if not isinstance(text, str):
                got = "null" if text is None or text is _MISSING else type(text).__name__
                raise _Bad(
                    "missing_field",
                    f"no string in column {text_field!r} ({got}); set the source's text_field, " + _SKIP_HINT,
                    got,
                )
        except _Bad as exc:
            _bad(src, stats, where, exc)
            continue
        # A text nested in a struct column was not measured above.
        if text_col != text_field and _utf8_over(text, limit):
            stats.skip("too_large", where, f"over max_doc_bytes={limit}")
            continue
        if not text.strip():
            stats.skip("empty")
            continue
        doc_id = ids[i] if ids is not None else None
        yield Document(f"{name}#{row}" if doc_id is None else str(doc_id), text)


# Files ----------------------------------------------------------------------------------------------


def _read_files(unit: Unit, src: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    if unit.files:
        todo = [(Path(unit.path) / rel, rel) for rel in unit.files]
    else:  # a unit naming one file
        todo = [(Path(unit.path), unit.name or Path(unit.path).name)]
    for p, doc_id in todo:
        where = str(p)
        try:
            if p.stat().st_size > src.max_doc_bytes:
                stats.skip("too_large", where, f"over max_doc_bytes={src.max_doc_bytes}")
                continue
            data = p.read_bytes()
        except OSError as exc:
            _bad(
                src,
                stats,
                where,
                _Bad("unreadable", f"cannot read ({exc}); " + _SKIP_HINT, type(exc).__name__),
            )
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = _Bad(
                "not_utf8",
                f"not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode it as UTF-8, leave it out with "
                "`extensions`, " + _SKIP_HINT,
                f"byte {exc.start}",
            )
            _bad(src, stats, where, bad)
            continue
        del data
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            stats.skip("empty")
            continue
        yield Document(doc_id, text)
