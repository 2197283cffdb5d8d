"""Streaming readers of real corpus formats (JSONL plain/gz/zst, Parquet, files, save_to_disk), on small files."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from crystal_lm.config import SourceConfig
from crystal_lm.data.documents import DataError
from crystal_lm.data.readers import Document, ReadStats, Unit, detect_format, list_units, read_unit


def _src(path: Path, **kw) -> SourceConfig:
    return SourceConfig(domain="text", path=str(path), **kw)


def _read(path: Path, unit_bytes: int = 2**30, **kw) -> tuple[list[Document], ReadStats, list[Unit]]:
    src = _src(path, **kw)
    fmt = src.format or detect_format(path)
    units = list_units(src, path, unit_bytes)
    stats = ReadStats()
    docs = [d for u in units for d in read_unit(u, src, fmt, stats)]
    return docs, stats, units


SETS = ["RedPajamaArXiv", "RedPajamaGithub", "RedPajamaBook"]


def _slimpajama_records(n: int = 60) -> list[dict]:
    return [
        {"text": f"document {i} é " + "word " * (i % 13), "meta": {"redpajama_set_name": SETS[i % 3]}}
        for i in range(n)
    ]


def _jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _write_all(tmp_path: Path, data: bytes) -> dict[str, Path]:
    paths = {"plain": tmp_path / "p" / "a.jsonl", "gz": tmp_path / "g" / "a.jsonl.gz"}
    paths["zst"] = tmp_path / "z" / "a.jsonl.zst"
    for p in paths.values():
        p.parent.mkdir()
    paths["plain"].write_bytes(data)
    paths["gz"].write_bytes(gzip.compress(data))
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(data))
    return paths


def test_slimpajama_plain_gz_zst_give_the_same_documents(tmp_path):
    records = _slimpajama_records()
    paths = _write_all(tmp_path, _jsonl_bytes(records))
    results = {}
    for kind, p in paths.items():
        for target in (p, p.parent):  # the file itself, or the folder holding it
            assert detect_format(target) == "jsonl"
            docs, stats, units = _read(target)
            assert len(units) == 1 and stats.documents == len(records) and not stats.skipped
            results[kind, target.is_dir()] = [(d.id.split("@")[1], d.text) for d in docs]
            assert all(d.id.startswith("a.jsonl") for d in docs)
    expected = results["plain", False]
    assert [t for _, t in expected] == [r["text"] for r in records]
    assert all(v == expected for v in results.values())


def test_where_keeps_one_slimpajama_domain(tmp_path):
    records = _slimpajama_records()
    p = _write_all(tmp_path, _jsonl_bytes(records))["zst"]
    docs, stats, _ = _read(p, where={"meta.redpajama_set_name": "RedPajamaArXiv"})
    arxiv = [r["text"] for r in records if r["meta"]["redpajama_set_name"] == "RedPajamaArXiv"]
    assert [d.text for d in docs] == arxiv
    assert stats.skipped == {"filtered": len(records) - len(arxiv)}
    docs, _, _ = _read(p, where={"meta.redpajama_set_name": ["RedPajamaArXiv", "RedPajamaBook"]})
    assert len(docs) == 2 * len(arxiv)
    docs, stats, _ = _read(p, where={"meta.nope": "x"})
    assert docs == [] and stats.skipped == {"filtered": len(records)}


def test_byte_ranges_give_each_line_to_exactly_one_unit(tmp_path):
    records = []
    for i in range(80):
        r: dict = {"text": f"line {i} " + "xy" * (i * 7 % 41)}
        if i % 5 == 0:
            r["id"] = f"rec-{i}"
        records.append(r)
    data = _jsonl_bytes(records)
    data = data.replace(b"\n", b"\n\n", 3)  # a few blank lines as well
    p = tmp_path / "big.jsonl"
    p.write_bytes(data)
    whole, _, units = _read(p)
    assert len(units) == 1 and len(whole) == len(records)
    assert [d.text for d in whole] == [r["text"] for r in records]
    assert whole[0].id == "rec-0" and whole[1].id.startswith("big.jsonl@")
    assert len({d.id for d in whole}) == len(whole)
    for unit_bytes in (1, 7, 50, 97, 333, len(data) // 3, len(data) - 1):
        docs, _, units = _read(p, unit_bytes=unit_bytes)
        assert len(units) >= 2 and len({u.key for u in units}) == len(units)
        assert docs == whole, unit_bytes
    assert len(_read(p, unit_bytes=len(data) // 3)[2]) >= 3
    assert _read(p, unit_bytes=len(data))[2] == [Unit(str(p), name="big.jsonl")]


def test_error_line_numbers_are_right_in_a_later_byte_range(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(40)]
    lines[33] = '{"text": "oops"'
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{p}:34: malformed JSON"):
        _read(p, unit_bytes=60)
    docs, stats, _ = _read(p, unit_bytes=60, on_error="skip")
    assert len(docs) == 39 and stats.skipped == {"malformed_json": 1}
    assert stats.examples[0].startswith(f"{p}:34: malformed_json")


def _starcoder_tree(root: Path) -> dict[str, list[str]]:
    texts = {}
    for lang, ext in (("python", "py"), ("javascript", "js")):
        (root / lang).mkdir(parents=True)
        contents = [f"// {lang} file {i}\nx = {i}\n" for i in range(2500)]  # several 1024-row batches
        table = pa.table(
            {
                "max_stars_repo_path": [f"src/f{i}.{ext}" for i in range(len(contents))],
                "content": contents,
                "id": [f"{lang}-{i}" for i in range(len(contents))],
            }
        )
        pq.write_table(table, root / lang / "train-00000-of-00001.parquet", row_group_size=1000)
        texts[lang] = contents
    return texts


def test_starcoder_parquet_tree_and_languages_filter(tmp_path):
    root = tmp_path / "starcoderdata"
    texts = _starcoder_tree(root)
    assert detect_format(root) == "parquet"
    docs, stats, units = _read(root)
    assert [Path(u.path).parent.name for u in units] == ["javascript", "python"]
    assert [d.text for d in docs] == texts["javascript"] + texts["python"]
    assert docs[0].id == "javascript-0" and stats.documents == 5000
    docs, stats, units = _read(root, languages=["python"])
    assert [d.text for d in docs] == texts["python"]
    # The other language's file is not read, but counted (by folder: these files have no lang column).
    assert sorted(u.skip for u in units) == ["", "other_language"] and stats.skipped == {"other_language": 1}
    with pytest.raises(
        DataError, match=r"`languages` \['py'\] matches no file.*folders here are javascript, python"
    ):
        _read(root, languages=["py"])


def test_parquet_lang_column_row_ids_and_bad_cells(tmp_path):
    p = tmp_path / "mixed.parquet"
    table = pa.table(
        {
            "content": ["print(1)", None, "   ", "x" * 5000, "fn main() {}", "int main;"],
            "lang": ["Python", "python", "python", "python", "rust", "c"],
        }
    )
    pq.write_table(table, p)
    with pytest.raises(DataError, match=rf"{p}: row 1: no string in column 'content'"):
        _read(p, max_doc_bytes=4096)
    docs, stats, _ = _read(p, max_doc_bytes=4096, on_error="skip", languages=["python", "rust"])
    assert docs == [Document("mixed.parquet#0", "print(1)"), Document("mixed.parquet#4", "fn main() {}")]
    assert stats.skipped == {"missing_field": 1, "empty": 1, "too_large": 1, "filtered": 1}
    with pytest.raises(DataError, match="no column 'text'"):
        _read(p, text_field="text")


def test_hf_save_to_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"example {i} " * (1 + i % 4) for i in range(300)]
    ds = datasets.Dataset.from_dict({"text": texts, "source": ["a", "b"] * 150})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert detect_format(tmp_path / "ds") == "hf_disk"
    docs, stats, units = _read(tmp_path / "ds")
    assert len(units) == 3 and all(u.path.endswith(".arrow") for u in units)
    assert [d.text for d in docs] == texts and stats.documents == 300
    assert docs[0].id == f"{Path(units[0].path).name}#0"
    docs, stats, _ = _read(tmp_path / "ds", where={"source": "b"})
    assert [d.text for d in docs] == texts[1::2] and stats.skipped == {"filtered": 150}
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\]"):
        _read(tmp_path / "dd")
    docs, _, _ = _read(tmp_path / "dd" / "train")
    assert len(docs) == 300


def _source_tree(root: Path) -> None:
    (root / "pkg" / "web").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "hook.py").write_text("hidden = True\n")
    (root / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    (root / "pkg" / "web" / "index.html").write_text("<p>hi</p>\n")
    (root / "pkg" / "web" / "app.js").write_text("let x = 1;\n")
    (root / "pkg" / "notes.txt").write_text("not code\n")
    (root / "pkg" / "empty.py").write_text("\n\n")
    (root / "pkg" / "latin.py").write_bytes("s = 'café'\n".encode("latin-1"))


def test_files_tree_languages_grouping_and_non_utf8(tmp_path):
    root = tmp_path / "tree"
    _source_tree(root)
    assert detect_format(root) == "files"
    with pytest.raises(DataError, match=rf"{root / 'pkg' / 'latin.py'}: not valid UTF-8"):
        _read(root)
    docs, stats, units = _read(root, on_error="skip")
    assert [d.id for d in docs] == ["pkg/a.py", "pkg/b.py", "pkg/web/app.js", "pkg/web/index.html"]
    assert docs[0].text == "def a():\n    return 1\n"
    # notes.txt is not a source language: left out, but counted (in a unit that only counts).
    assert stats.skipped == {"not_utf8": 1, "empty": 1, "other_extension": 1}
    assert [u.skip for u in units] == ["", "other_extension"] and units[1].files == ("pkg/notes.txt",)
    grouped, _, units = _read(root, unit_bytes=15, on_error="skip")
    assert len(units) >= 3 and grouped == docs
    assert len({f for u in units for f in u.files}) == sum(len(u.files) for u in units)
    docs, _, _ = _read(root, languages=["javascript", "html"])
    assert [d.id for d in docs] == ["pkg/web/app.js", "pkg/web/index.html"]
    docs, _, _ = _read(root, extensions=["txt"])
    assert [d.id for d in docs] == ["pkg/notes.txt"]
    with pytest.raises(DataError, match="unknown language"):
        _read(root, languages=["pyton"])


BAD_LINES = {
    "malformed_json": (b'{"text": "unterminated\n', "malformed JSON"),
    "not_utf8": (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    "missing_field": (b'{"body": "no text field"}\n', "no string field 'text'"),
    "non_string": (b'{"text": 42}\n', "no string field 'text'"),
    "not_object": (b'["a", "list"]\n', "a JSON array, not an object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
@pytest.mark.parametrize("compression", ["plain", "gz"])
def test_bad_lines_fail_with_file_and_line_or_are_counted(tmp_path, kind, compression):
    line, message = BAD_LINES[kind]
    data = b'{"text": "good one"}\n{"text": "   "}\n' + line + b'{"text": "good two"}\n'
    p = tmp_path / ("x.jsonl" if compression == "plain" else "x.jsonl.gz")
    p.write_bytes(data if compression == "plain" else gzip.compress(data))
    with pytest.raises(DataError, match=rf"^{p}:3: {message}.*on_error: skip"):
        _read(p)
    docs, stats, _ = _read(p, on_error="skip")
    reason = {"non_string": "missing_field", "not_object": "malformed_json"}.get(kind, kind)
    assert [d.text for d in docs] == ["good one", "good two"]
    assert stats.skipped == {reason: 1, "empty": 1} and stats.documents == 2
    assert stats.examples == [f"{p}:3: {reason}" + stats.examples[0].split(reason, 1)[1]]


def test_huge_line_is_skipped_without_reading_it_whole(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"text": "before"}) + "\n")
        f.write(json.dumps({"text": "z" * (32 * 2**20)}) + "\n")
        f.write(json.dumps({"text": "after"}) + "\n")
    src = _src(p, max_doc_bytes=2**20)
    (unit,) = list_units(src, p, 2**30)
    stats = ReadStats()
    tracemalloc.start()
    try:
        docs = list(read_unit(unit, src, "jsonl", stats))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["before", "after"]
    assert stats.skipped == {"too_large": 1}
    assert stats.examples[0].startswith(f"{p}:2: too_large")
    # A line is read up to a few times max_doc_bytes (escapes take room), never whole.
    assert peak < 12 * 2**20, peak
    # Split into ranges that start inside the huge line: the line after it still belongs to one unit.
    docs, stats, units = _read(p, unit_bytes=2**20, max_doc_bytes=2**20)
    assert len(units) == 33 and [d.text for d in docs] == ["before", "after"]
    assert stats.skipped == {"too_large": 1}


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_file(tmp_path, suffix):
    data = _jsonl_bytes([{"text": f"document number {i} " * 20} for i in range(2000)])
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
    p = tmp_path / f"cut.jsonl{suffix}"
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=rf"^{p}: the compressed file ends early"):
        _read(p)
    docs, stats, _ = _read(p, on_error="skip")
    assert stats.skipped == {"truncated_file": 1}
    assert 0 < len(docs) < 2000 and docs[0].text == "document number 0 " * 20
    whole = tmp_path / f"whole.jsonl{suffix}"
    whole.write_bytes(packed)
    assert len(_read(whole)[0]) == 2000


def test_corrupt_gzip_is_a_data_error(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(b"this is not gzip at all\n")
    with pytest.raises(DataError, match=rf"^{p}: cannot be read as JSONL"):
        _read(p)
    assert _read(p, on_error="skip")[1].skipped == {"corrupt_file": 1}


def test_detection_and_configuration_errors(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'empty'}: no files"):
        detect_format(tmp_path / "empty")
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="unknown source format 'csv'"):
        list(read_unit(Unit(str(p)), _src(p), "csv", ReadStats()))
    with pytest.raises(DataError, match="unknown source format 'csv'"):
        list_units(_src(p, format="csv"), p, 100)  # type: ignore[arg-type]
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "data.json").write_text('{"text": "a json file"}\n')
    (meta / "package.json").write_text('{"name": "x"}\n')
    assert detect_format(meta) == "jsonl"
    (meta / "main.py").write_text("print(1)\n")
    assert detect_format(meta) == "files"  # a source tree that has a package.json


def test_unit_keys_are_stable_and_distinct():
    a = Unit("/data/a.jsonl", 0, 100)
    assert a.key == Unit("/data/a.jsonl", 0, 100).key and len(a.key) == 16
    assert len({a.key, Unit("/data/a.jsonl", 100, 200).key, Unit("/data/a.jsonl").key}) == 3
    assert Unit("/t", files=("x.py",)).key != Unit("/t", files=("y.py",)).key


def _lines_of(n: int, tag: str) -> str:
    return "".join(json.dumps({"text": f"{tag} document {i}"}) + "\n" for i in range(n))


def test_files_of_other_formats_in_a_folder_are_named_or_counted_never_dropped(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_lines_of(3, "a"))
    (folder / "b.jsonl.bz2").write_bytes(bz2.compress(_lines_of(4, "b").encode()))
    (folder / "c.jsonl.xz").write_bytes(lzma.compress(_lines_of(5, "c").encode()))
    (folder / "README.md").write_text("# a dataset card\n")
    assert detect_format(folder) == "jsonl"
    with pytest.raises(
        DataError, match=r"b\.jsonl\.bz2: compressed with bzip2.*1 more files not read: .*c\.jsonl\.xz"
    ):
        _read(folder)
    docs, stats, _ = _read(folder, on_error="skip")
    assert [d.text for d in docs] == [f"a document {i}" for i in range(3)]
    assert stats.skipped == {"unsupported_format": 2, "not_data": 1}
    assert stats.examples == [
        f"{folder / 'b.jsonl.bz2'}: unsupported_format",
        f"{folder / 'c.jsonl.xz'}: unsupported_format",
    ]
    # A lone .bz2 file: the message is about the compression, not about UTF-8.
    with pytest.raises(DataError, match=r"solo\.jsonl\.bz2: compressed with bzip2, which is not supported"):
        (tmp_path / "solo.jsonl.bz2").write_bytes((folder / "b.jsonl.bz2").read_bytes())
        _read(tmp_path / "solo.jsonl.bz2")


def test_a_folder_of_two_data_formats_is_an_error_naming_both(tmp_path):
    folder = tmp_path / "mixpq"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_lines_of(300, "jsonl"))
    pq.write_table(pa.table({"content": ["x = 1\n"]}), folder / "b.parquet")
    with pytest.raises(DataError, match=r"more than one format \(jsonl: .*a\.jsonl; parquet: .*b\.parquet\)"):
        detect_format(folder)
    # With the format set, the other format's file is an error, or counted with on_error: skip.
    with pytest.raises(DataError, match=r"b\.parquet: not a JSONL .* file"):
        _read(folder, format="jsonl")
    docs, stats, _ = _read(folder, format="jsonl", on_error="skip")
    assert len(docs) == 300 and stats.skipped == {"unsupported_format": 1}
    docs, stats, _ = _read(folder, format="parquet", on_error="skip", text_field="content")
    assert [d.text for d in docs] == ["x = 1\n"] and stats.skipped == {"unsupported_format": 1}


def _tree_with_links(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("a = 1\n")
    (root / "pkg" / "loop").symlink_to("..")  # a symlink loop
    (root / "pkg" / "alias.py").symlink_to("a.py")  # the same file under a second name
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "v.py").write_text("v = 2\n")
    (root / "pkg" / "vendored").symlink_to(ext)  # a symlinked folder outside the tree
    return root


@pytest.mark.parametrize("target", ["tree", "tree/**", "tree/pkg/*", "tree/**/*.py"])
def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path, target):
    root = _tree_with_links(tmp_path)
    path = tmp_path / target
    assert detect_format(path) == "files"
    docs, stats, _ = _read(path)
    texts = sorted(d.text for d in docs)
    assert texts == ["a = 1\n", "v = 2\n"], [d.id for d in docs]  # each real file read once
    assert not stats.skipped
    assert any(d.id.endswith("vendored/v.py") for d in docs)
    assert root.exists()


def test_source_fingerprint_survives_loops_and_dangling_links(tmp_path, recipe_dict):
    from crystal_lm.config import recipe_from_dict
    from crystal_lm.data.documents import source_fingerprint

    root = _tree_with_links(tmp_path)
    (root / "pkg" / "gone.py").symlink_to(tmp_path / "missing.py")
    d = recipe_dict
    d["data"]["sources"] = {"mine": {"domain": "code", "path": str(tmp_path / "tree" / "**")}}
    for st in d["stages"]:
        st["mixture"] = {"mine": 1.0}
        st.get("fim", {}).pop("sources", None)
    d["stages"][2].pop("subsets", None)
    recipe = recipe_from_dict(d, "r.yaml")
    first = source_fingerprint(recipe, "mine", None)
    (root / "pkg" / "a.py").write_text("a = 10\n")
    assert source_fingerprint(recipe, "mine", None) != first


def test_dangling_links_and_fifos_are_named_or_counted(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "m0.py").write_text("x = 0\n")
    (root / "gone.py").symlink_to(tmp_path / "nowhere.py")
    os.mkfifo(root / "pipe.py")  # reading it would block forever
    (root / "image.png").symlink_to(tmp_path / "nowhere.png")  # not code: only counted
    with pytest.raises(
        DataError,
        match=rf"^{root / 'gone.py'}: a symbolic link to .*nowhere\.py, which does not exist.*pipe\.py",
    ):
        _read(root)
    docs, stats, _ = _read(root, on_error="skip")
    assert [d.id for d in docs] == ["m0.py"]
    assert stats.skipped == {"unreadable": 1, "not_regular_file": 1, "other_extension": 1}
    jsonl = tmp_path / "j"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text(_lines_of(2, "a"))
    os.mkfifo(jsonl / "b.jsonl")
    with pytest.raises(DataError, match=r"b\.jsonl: a FIFO \(named pipe\), not a regular file"):
        _read(jsonl)
    assert _read(jsonl, on_error="skip")[1].skipped == {"not_regular_file": 1}
    with pytest.raises(DataError, match=r"gone\.py: a symbolic link to .*, which does not exist"):
        detect_format(root / "gone.py")


def test_arrow_stream_cut_at_a_batch_boundary_is_truncated(tmp_path):
    p = tmp_path / "data-00000-of-00001.arrow"
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for b in range(3):
            writer.write_batch(pa.record_batch([[f"row {b * 1000 + i}" for i in range(1000)]], schema=schema))
            if b == 0:
                cut = sink.tell()
    assert len(_read(p)[0]) == 3000
    p.write_bytes(p.read_bytes()[:cut])  # as a copy that stopped after the first batch
    with pytest.raises(DataError, match=rf"^{p}: row 1000: the Arrow stream ends without its end marker"):
        _read(p)
    docs, stats, _ = _read(p, on_error="skip")
    assert len(docs) == 1000 and stats.skipped == {"truncated_file": 1}


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_zero_byte_compressed_file_is_truncated(tmp_path, suffix):
    p = tmp_path / f"empty.jsonl{suffix}"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{p}: the compressed file is empty \(0 bytes\)"):
        _read(p)
    assert _read(p, on_error="skip")[1].skipped == {"truncated_file": 1}


def test_lone_surrogate_in_the_id_names_the_line_and_is_skippable(tmp_path):
    p = tmp_path / "ids.jsonl"
    p.write_text('{"id": "ok", "text": "first"}\n{"id": "bad\\ud800", "text": "second"}\n{"text": "third"}\n')
    with pytest.raises(DataError, match=rf"^{p}:2: the id has an unpaired surrogate escape"):
        _read(p)
    docs, stats, _ = _read(p, on_error="skip")
    assert [d.text for d in docs] == ["first", "third"] and stats.skipped == {"not_utf8": 1}


def test_max_doc_bytes_on_a_dictionary_encoded_parquet_column(tmp_path):
    p = tmp_path / "dict.parquet"
    big, small = "x" * 5000, "print(1)"
    column = pa.array([small, big, small, big]).dictionary_encode()
    pq.write_table(pa.table({"content": column}), p)
    assert pa.types.is_dictionary(pq.read_schema(p).field("content").type)
    docs, stats, _ = _read(p, max_doc_bytes=4096)
    assert [d.text for d in docs] == [small, small] and stats.skipped == {"too_large": 2}


def test_jsonl_max_doc_bytes_counts_the_texts_utf8_bytes_and_null_is_named(tmp_path):
    cjk = "漢字" * 500  # 3000 UTF-8 bytes, 6000 bytes as \u escapes
    p = tmp_path / "cjk.jsonl"
    p.write_text(json.dumps({"text": cjk}) + "\n" + json.dumps({"text": cjk + "漢字"}) + "\n")
    assert len(p.read_text().splitlines()[0]) > 6000
    docs, stats, _ = _read(p, max_doc_bytes=3000)
    assert [d.text for d in docs] == [cjk] and stats.skipped == {"too_large": 1}
    q = tmp_path / "null.jsonl"
    q.write_text('{"text": null}\n')
    with pytest.raises(DataError, match=r"no string field 'text' \(a JSON null;"):
        _read(q)
