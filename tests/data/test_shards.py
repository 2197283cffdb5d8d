"""Packing into memory-mapped shards: `<s> doc </s>` across document boundaries, 1-token overlap, index,
validation split, corruption and tokenizer-mismatch detection, bad JSONL input."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from crystal_lm.config import recipe_from_dict
from crystal_lm.data.build import split_for_tokenizing
from crystal_lm.data.documents import DataError, iter_source
from crystal_lm.data.prepare import prepare_data
from crystal_lm.data.shards import ShardError, ShardSet, ShardWriter


def test_windows_are_the_packed_document_stream(prepared):
    recipe, data = prepared
    tok = data.tokenizer
    shards = data.train["python"]
    L = recipe.data.seq_len
    docs = list(shards.documents())
    held_out = {d["id"] for d in data.val["python"].documents()}
    by_id = {d.id: d.text for d in iter_source(recipe, "python", data.corpus)}
    # Rebuild the stream from the documents and compare with the stored windows.
    stream = []
    for d in docs:
        # Tokenized in Crystal's ~2000-character pieces, cut at spaces.
        ids = [
            t
            for piece in split_for_tokenizing(by_id[d["id"]], recipe.data.chunk_chars)
            for t in tok.encode(piece)
        ]
        assert d["tokens"] == len(ids) + 2 and d["start"] == len(stream)
        stream += [tok.bos_id, *ids, tok.eos_id]
    for i in range(len(shards)):
        w = shards.window(i)
        expect = stream[i * L : i * L + L + 1]
        assert w.tokens[: len(expect)].tolist() == expect
        if i + 1 < len(shards):
            assert w.tokens[-1] == shards.window(i + 1).tokens[0]  # labels overlap inputs by one token
    assert shards.window(len(shards) - 1).valid == len(stream) - (len(shards) - 1) * L
    assert not held_out & {d["id"] for d in docs}  # no document is in both splits
    assert held_out, "every source has a validation split"


def test_every_source_has_train_and_validation_samples(prepared):
    _, data = prepared
    for name in ("prose", "technical", "python", "web"):
        assert len(data.train[name]) > 0 and len(data.val[name]) > 0, name


def test_prepare_twice_reuses_shards(prepared):
    recipe, data = prepared
    again = prepare_data(recipe)
    assert again.train["prose"].dir == data.train["prose"].dir
    assert again.tokenizer.sha256 == data.tokenizer.sha256


def test_writer_pads_the_last_window(tmp_path):
    w = ShardWriter(
        tmp_path / "s",
        seq_len=8,
        dtype=np.dtype("<u2"),
        bos_id=1,
        eos_id=2,
        tokenizer_sha256="x",
        rows_per_shard=2,
    )
    w.add("a", list(range(10, 20)))  # 12 tokens with BOS/EOS
    w.add("b", list(range(30, 34)))  # 6 tokens: 18 in all, two full windows and a padded one
    w.close()
    s = ShardSet(tmp_path / "s", expect_tokenizer="x")
    stream = [1, *range(10, 20), 2, 1, 30, 31, 32, 33, 2]
    assert len(s) == 3 and len(s.index["shards"]) == 2
    assert s.window(0).tokens.tolist() == stream[0:9]
    assert s.window(1).tokens.tolist() == stream[8:17]
    last = s.window(2)
    assert last.valid == 2 and last.tokens[:2].tolist() == stream[16:] and (last.tokens[2:] == 2).all()


def _copy_shards(data, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(data.train["web"].dir, target)
    return target


def test_corrupt_shard_is_detected(prepared, tmp_path):
    _, data = prepared
    target = _copy_shards(data, tmp_path)
    shard = target / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard-00000\.bin.*corrupt"):
        ShardSet(target)


def test_truncated_shard_is_detected(prepared, tmp_path):
    _, data = prepared
    target = _copy_shards(data, tmp_path)
    shard = target / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        ShardSet(target)


def test_shards_of_another_tokenizer_are_refused(prepared, tmp_path):
    _, data = prepared
    target = _copy_shards(data, tmp_path)
    with pytest.raises(ShardError, match=r"made with tokenizer .* this run uses tokenizer"):
        ShardSet(target, expect_tokenizer="0" * 64)


def test_unfinished_build_is_not_a_shard_set(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ShardError, match=r"no index\.json"):
        ShardSet(tmp_path / "half")


def _jsonl_recipe(recipe_dict, path):
    d = copy.deepcopy(recipe_dict)
    d["data"]["sources"] = {"mine": {"domain": "text", "path": str(path)}}
    for st in d["stages"]:
        st["mixture"] = {"mine": 1.0}
    return recipe_from_dict(d, "r.yaml")


def test_malformed_jsonl_names_file_and_line(recipe_dict, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    recipe = _jsonl_recipe(recipe_dict, path)
    with pytest.raises(DataError, match=r"docs\.jsonl:2: malformed JSON"):
        list(iter_source(recipe, "mine", None))


def test_missing_text_field_names_file_and_line(recipe_dict, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    recipe = _jsonl_recipe(recipe_dict, path)
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no string field 'text'"):
        list(iter_source(recipe, "mine", None))


def test_non_utf8_names_file_and_line(recipe_dict, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    recipe = _jsonl_recipe(recipe_dict, path)
    with pytest.raises(DataError, match=r"docs\.jsonl:2: not valid UTF-8"):
        list(iter_source(recipe, "mine", None))


def test_user_jsonl_source_is_prepared(recipe_dict, tmp_path, prepared):
    _, data = prepared
    path = tmp_path / "docs.jsonl"
    with open(data.corpus.part_path("technical")) as src, open(path, "w") as out:
        for line in src:  # real documents, in a user's file, with an extra field and empty documents
            doc = json.loads(line)
            out.write(json.dumps({"id": doc["id"], "text": doc["text"], "meta": {"x": 1}}) + "\n")
            out.write(json.dumps({"text": "   "}) + "\n")
    d = copy.deepcopy(recipe_dict)
    d["data"]["sources"] = {"mine": {"domain": "text", "path": str(path)}}
    d["data"]["tokenizer"] = {"path": str(data.tokenizer.path)}
    for st in d["stages"]:
        st["mixture"] = {"mine": 1.0}
        st.pop("fim", None)
    got = prepare_data(recipe_from_dict(d, "r.yaml"))
    assert got.train["mine"].n_tokens + got.val["mine"].n_tokens == (
        data.train["technical"].n_tokens + data.val["technical"].n_tokens
    )
