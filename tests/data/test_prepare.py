"""`prepare_data` on small user sources: damaged shards are rebuilt, skip counts reach the manifest, and a source
that yields no training data says why."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from crystal_lm.config import RecipeError, recipe_from_dict
from crystal_lm.data.documents import DataError, id_hash
from crystal_lm.data.prepare import prepare_data
from crystal_lm.data.shards import ShardError, ShardSet

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def _text(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40)) + f" number {i}."


def _recipe(recipe_dict: dict, prepared, path: Path, cache: Path, **src) -> object:
    _, data = prepared
    d = copy.deepcopy(recipe_dict)
    d["data"]["cache_dir"] = str(cache)
    d["data"]["workers"] = 1
    d["data"]["tokenizer"] = {"path": str(data.tokenizer.path)}
    d["data"]["sources"] = {"mine": {"domain": "text", "path": str(path), **src}}
    for st in d["stages"]:
        st["mixture"] = {"mine": 1.0}
        st.pop("fim", None)
    d["stages"][2].pop("subsets", None)
    return recipe_from_dict(d, "r.yaml")


def _write(path: Path, records: list[dict], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
    return path


def _contents(s: ShardSet) -> tuple[list[str], list[dict]]:
    return [x["sha256"] for x in s.index["shards"]], list(s.documents())


def test_damaged_shards_are_rebuilt_by_prepare(recipe_dict, prepared, tmp_path):
    path = _write(tmp_path / "docs.jsonl", [{"text": _text(i)} for i in range(200)])
    recipe = _recipe(recipe_dict, prepared, path, tmp_path / "cache")
    first = prepare_data(recipe)
    clean = _contents(first.train["mine"]), _contents(first.val["mine"])
    shard = first.train["mine"].dir / "shard-00000.bin"
    index = first.train["mine"].dir / "index.json"
    for damage in ("truncated shard", "truncated index", "index without shards"):
        if damage == "truncated shard":
            shard.write_bytes(shard.read_bytes()[:-10])
            message = (
                r"shard-00000\.bin: missing or truncated .* delete .*train and run `crystal data prepare`"
            )
        elif damage == "truncated index":
            index.write_text(index.read_text()[:100])
            message = r"index\.json: unreadable shard index"
        else:
            d = json.loads(index.read_text())
            del d["shards"]
            index.write_text(json.dumps(d))
            message = r"index\.json: not a complete shard index \(no shards\)"
        with pytest.raises(ShardError, match=message):
            ShardSet(first.train["mine"].dir)
        again = prepare_data(recipe)  # rebuilt, to the same shards
        assert (_contents(again.train["mine"]), _contents(again.val["mine"])) == clean, damage


def test_skip_counts_reach_the_manifest_and_the_prepare_output(recipe_dict, prepared, tmp_path, capsys):
    import yaml

    from crystal_lm.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.jsonl", [{"text": _text(i)} for i in range(100)], extra='{"text": "broken\n')
    (folder / "b.jsonl.bz2").write_bytes(b"BZh9")
    recipe = _recipe(recipe_dict, prepared, folder, tmp_path / "cache", on_error="skip")
    got = prepare_data(recipe).manifest()["sources"]["mine"]
    assert got["skipped"] == {"malformed_json": 1, "unsupported_format": 1}
    assert any("b.jsonl.bz2" in e for e in got["skip_examples"])
    d = recipe.to_dict()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    assert main(["data", "prepare", str(tmp_path / "r.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out.split("\ntokenizer:")[0])
    assert printed["mine"]["skipped"] == {"malformed_json": 1, "unsupported_format": 1}


def _id_with_hash(below: bool, fraction: float) -> str:
    return next(f"id-{i}" for i in range(10_000) if (id_hash(f"id-{i}") < fraction) == below)


def test_documents_sharing_one_id_never_empty_the_training_split(recipe_dict, prepared, tmp_path):
    fraction = recipe_dict["data"]["val_fraction"]
    same = _id_with_hash(below=False, fraction=fraction)  # would be forced into validation, all of it
    path = _write(tmp_path / "same.jsonl", [{"id": same, "text": _text(i)} for i in range(50)])
    data = prepare_data(_recipe(recipe_dict, prepared, path, tmp_path / "a"))
    assert data.train["mine"].index["n_documents"] == 50 and len(data.val["mine"]) == 0
    low = _id_with_hash(below=True, fraction=fraction)  # every document hashes into validation
    path = _write(tmp_path / "low.jsonl", [{"id": low, "text": _text(i)} for i in range(50)])
    with pytest.raises(RecipeError, match=rf"all 50 documents went to validation.*1 distinct id.*{low}"):
        prepare_data(_recipe(recipe_dict, prepared, path, tmp_path / "b"))


def test_a_source_of_too_short_documents_says_so(recipe_dict, prepared, tmp_path):
    path = _write(tmp_path / "short.jsonl", [{"text": f"hi {i}"} for i in range(30)])
    with pytest.raises(
        RecipeError, match=r"no usable documents \(30 read; left out: 30 shorter than 10 tokens"
    ):
        prepare_data(_recipe(recipe_dict, prepared, path, tmp_path / "c"))


def _sets(n: int = 40) -> list[dict]:
    names = ["RedPajamaArXiv", "RedPajamaGithub", "RedPajamaBook"]
    return [{"text": _text(i), "meta": {"redpajama_set_name": names[i % 3]}} for i in range(n)]


def test_a_where_that_keeps_nothing_names_the_absent_field_or_the_values_seen(
    recipe_dict, prepared, tmp_path
):
    path = _write(tmp_path / "sp.jsonl", _sets())
    typo = {"meta.redpajama_setname": "RedPajamaArXiv"}  # a misspelt key: absent from every record
    with pytest.raises(
        RecipeError,
        match=r"r\.yaml: data\.sources\.mine: the source has no usable documents \(0 read; left out: filtered "
        r"40\)\. `where` meta\.redpajama_setname: absent from all 40 records",
    ):
        prepare_data(_recipe(recipe_dict, prepared, path, tmp_path / "a", where=typo))
    wrong = {"meta.redpajama_set_name": "RedPajamaArxiv"}  # a wrong value: the values there are listed
    with pytest.raises(
        RecipeError,
        match=r"`where` meta\.redpajama_set_name: none of \['RedPajamaArxiv'\] found; values seen: "
        r"'RedPajamaArXiv', 'RedPajamaGithub', 'RedPajamaBook'$",
    ):
        prepare_data(_recipe(recipe_dict, prepared, path, tmp_path / "b", where=wrong))


def test_a_languages_typo_on_parquet_names_the_languages_present(recipe_dict, prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "starcoderdata"
    for lang in ("python", "css"):
        (folder / lang).mkdir(parents=True)
        rows = [_text(i) for i in range(20)]
        pq.write_table(pa.table({"content": rows, "lang": [lang] * 20}), folder / lang / "train.parquet")
    with pytest.raises(
        RecipeError,
        match=r"filtered 40\)\. `languages`: none of \['py'\] found; values seen: 'css', 'python'$",
    ):
        prepare_data(
            _recipe(recipe_dict, prepared, folder, tmp_path / "c", format="parquet", languages=["py"])
        )


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"languages": ["python"]}, r"`languages` filters parquet, hf_disk or files sources; for JSONL use"),
        ({"format": "files", "where": {"a": 1}}, r"`where` filters records of jsonl, parquet or hf_disk"),
        ({"format": "parquet", "extensions": [".py"]}, r"`extensions` filters files sources, not parquet"),
        ({"format": "files", "languages": ["py"]}, r"unknown language\(s\) \['py'\] for a files source"),
    ],
)
def test_filters_that_do_not_fit_the_format_name_the_recipe_and_source(
    recipe_dict, prepared, tmp_path, setting, message
):
    path = _write(tmp_path / "docs.jsonl", [{"text": _text(i)} for i in range(5)])
    recipe = _recipe(recipe_dict, prepared, path, tmp_path / "d", **setting)
    with pytest.raises(DataError, match=r"^r\.yaml: data\.sources\.mine: " + message):
        prepare_data(recipe)
    assert not (tmp_path / "d").exists()  # checked before any data work
