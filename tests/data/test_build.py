"""Parallel, resumable shard builds: units, workers, interruption, skipped input counted, normalisation."""

from __future__ import annotations

import copy
import json

import pytest

from crystal_lm.config import recipe_from_dict
from crystal_lm.data import build as build_mod
from crystal_lm.data.build import normalize_text, split_for_tokenizing
from crystal_lm.data.prepare import prepare_data


def test_long_documents_are_tokenized_in_pieces_cut_at_spaces():
    text = ("word " * 1000) + "x" * 5000
    pieces = split_for_tokenizing(text, 2000)
    assert "".join(pieces) == text and all(len(p) <= 2000 for p in pieces)
    assert all(p.startswith(" ") for p in pieces[1:3])  # cut before a space: words stay whole
    assert split_for_tokenizing("short text", 2000) == ["short text"]
    assert split_for_tokenizing(text, None) == [text]


def test_normalisation_is_crystals_ftfy_with_nfc():
    mojibake = "cafÃ©\r\nna\u0308ive"  # UTF-8 read as Latin-1, CRLF, a decomposed umlaut
    assert normalize_text(mojibake, "ftfy") == "café\nnäive"
    assert normalize_text(mojibake, "nfc") == "cafÃ©\nnäive"
    assert normalize_text(mojibake, "none") == "cafÃ©\nna\u0308ive"


def test_ftfy_on_changed_lines_only_equals_ftfy_on_everything(prepared):
    """`ftfy_fix` skips the ASCII lines ftfy leaves alone; the result must be ftfy's, character for character,
    on real documents and on lines built to hit each thing ftfy changes, in every order."""
    import random

    import ftfy

    def reference(text: str) -> str:
        return ftfy.fix_text(text, normalization="NFC")

    _, data = prepared
    for part in ("prose", "technical", "python", "web"):
        with open(data.corpus.part_path(part)) as f:
            for line in f:
                text = json.loads(line)["text"]
                assert build_mod.ftfy_fix(text) == reference(text)
    lines = [
        "plain ascii code(x) + 1",
        "a <b>tag</b> line",  # after a "<", ftfy stops decoding HTML entities for the rest of the text
        "fish &amp; chips &lt;3",
        "caf\u00c3\u00a9 mojibake",
        "\u201ccurly\u201d \ufb01ne \uff21",
        "bell\x07 and \x1b[31mred\x1b[0m",
        "form\x0cfeed and tab\t",
        "na\u0308ive",
        "",
        "\x0b vertical tab",
        "emoji \U0001f600 &eacute;",
    ]
    rng = random.Random(0)
    for _ in range(1500):
        text = "\n".join(rng.choice(lines) for _ in range(rng.randint(1, 8)))
        text += rng.choice(["", "\n", "\n\n"])
        assert build_mod.ftfy_fix(text) == reference(text), repr(text)
    assert build_mod.ftfy_fix("a <b>\nfish &amp; caf\u00c3\u00a9") == "a <b>\nfish &amp; café"
    printable = [chr(i) for i in range(32, 127)] + ["\t", "\n", "\x0c"]
    for _ in range(3000):
        text = "".join(rng.choice(printable) for _ in range(rng.randint(0, 60)))
        if "&" not in text:  # what `ftfy_fix` returns untouched must be what ftfy returns
            assert reference(text) == text, repr(text)


@pytest.fixture()
def jsonl_source(prepared, tmp_path):
    """Real documents in three user JSONL files, with malformed and empty lines mixed in."""
    _, data = prepared
    docs = []
    for part in ("technical", "python"):
        with open(data.corpus.part_path(part)) as f:
            docs += [json.loads(line) for line in f]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(3):
        with open(folder / f"part-{k}.jsonl", "w") as out:
            for i, d in enumerate(docs[k::3]):
                out.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
                if i % 10 == 0:
                    out.write('{"text": "broken\n')  # malformed: counted when skipping
                    out.write(json.dumps({"text": "  "}) + "\n")  # empty: always skipped and counted
    return folder, len(docs)


def _recipe(recipe_dict, folder, cache, **data):
    d = copy.deepcopy(recipe_dict)
    d["data"]["cache_dir"] = str(cache)
    d["data"]["sources"] = {"mine": {"domain": "text", "path": str(folder), "on_error": "skip"}}
    d["data"].update(data)
    for st in d["stages"]:
        st["mixture"] = {"mine": 1.0}
        st.get("fim", {}).pop("sources", None)
    d["stages"][2].pop("subsets", None)
    return recipe_from_dict(d, "r.yaml")


def _shard_contents(shards):
    return [s["sha256"] for s in shards.index["shards"]], list(shards.documents())


def test_workers_and_units_do_not_change_the_result_and_skips_are_counted(
    recipe_dict, prepared, jsonl_source, tmp_path
):
    _, data = prepared
    folder, n_docs = jsonl_source
    tok = {"path": str(data.tokenizer.path)}
    one = prepare_data(
        _recipe(recipe_dict, folder, tmp_path / "a", workers=1, unit_bytes=200_000, tokenizer=tok)
    )
    two = prepare_data(
        _recipe(recipe_dict, folder, tmp_path / "b", workers=2, unit_bytes=200_000, tokenizer=tok)
    )
    for split in ("train", "val"):
        a = one.train["mine"] if split == "train" else one.val["mine"]
        b = two.train["mine"] if split == "train" else two.val["mine"]
        assert _shard_contents(a) == _shard_contents(b)
    index = one.train["mine"].index
    assert len(index["units"]) > 3  # files split into byte ranges
    kept = index["n_documents"] + one.val["mine"].index["n_documents"]
    assert kept + index["dropped_short_documents"] == n_docs  # every real document accounted for
    broken = sum(1 for k in range(3) for i in range(len(range(k, n_docs, 3))) if i % 10 == 0)
    assert index["skipped"] == {"empty": broken, "malformed_json": broken}
    assert any("malformed" in e for e in index["skip_examples"])
    ids = [d["id"] for d in one.train["mine"].documents()] + [d["id"] for d in one.val["mine"].documents()]
    assert len(ids) == len(set(ids))


def test_an_interrupted_build_resumes_without_losing_or_repeating_documents(
    recipe_dict, prepared, jsonl_source, tmp_path, monkeypatch
):
    _, data = prepared
    folder, _ = jsonl_source
    tok = {"path": str(data.tokenizer.path)}
    clean = prepare_data(
        _recipe(recipe_dict, folder, tmp_path / "clean", workers=1, unit_bytes=150_000, tokenizer=tok)
    )
    real, calls = build_mod.build_unit, []

    def dies_on_third(spec, unit, units_dir):
        calls.append(unit.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while building the third unit
        return real(spec, unit, units_dir)

    monkeypatch.setattr(build_mod, "build_unit", dies_on_third)
    recipe = _recipe(recipe_dict, folder, tmp_path / "resumed", workers=1, unit_bytes=150_000, tokenizer=tok)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(recipe)
    monkeypatch.setattr(build_mod, "build_unit", lambda *a: (calls.append(a[1].key), real(*a))[1])
    resumed = prepare_data(recipe)
    units = [u["key"] for u in resumed.train["mine"].index["units"]]
    assert calls[3:] == units[2:]  # the two finished units were not built again
    assert _shard_contents(resumed.train["mine"]) == _shard_contents(clean.train["mine"])
    assert _shard_contents(resumed.val["mine"]) == _shard_contents(clean.val["mine"])


def test_fail_mode_names_the_file_and_line(recipe_dict, prepared, jsonl_source, tmp_path):
    from crystal_lm.data.documents import DataError

    _, data = prepared
    folder, _ = jsonl_source
    recipe = _recipe(
        recipe_dict, folder, tmp_path / "c", workers=1, tokenizer={"path": str(data.tokenizer.path)}
    )
    recipe.data.sources["mine"].on_error = "fail"
    with pytest.raises(DataError, match=r"part-0\.jsonl:2"):
        prepare_data(recipe)


def test_per_document_fim_before_packing(recipe_dict, prepared, jsonl_source, tmp_path):
    from crystal_lm.config import RecipeError
    from crystal_lm.data.order import order_records

    _, data = prepared
    tok = data.tokenizer
    folder, _ = jsonl_source
    recipe = _recipe(recipe_dict, folder, tmp_path / "f", workers=1, tokenizer={"path": str(tok.path)})
    from crystal_lm.config import DocumentFimConfig

    recipe.data.sources["mine"].document_fim = DocumentFimConfig(rate=1.0, spm_rate=0.5)
    built = prepare_data(recipe)
    shards = built.train["mine"]
    stream = [t for i in range(len(shards)) for t in shards.window(i).tokens[:-1].tolist()]
    spm = 0
    for d in list(shards.documents())[:40]:
        doc = stream[d["start"] : d["start"] + d["tokens"]]
        assert doc[0] == tok.bos_id and doc[1] == tok.fim_prefix_id and doc[-1] == tok.eos_id
        assert [doc.count(t) for t in (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id)] == [1, 1, 1]
        spm += doc[2] == tok.fim_suffix_id
    assert 0 < spm < 40  # both PSM and SPM layouts occur
    # Validation documents are split off first and stay plain: <s> tokens </s>, no sentinel.
    val = built.val["mine"]
    val_stream = [t for i in range(len(val)) for t in val.window(i).tokens[:-1].tolist()]
    texts = {}
    for part in folder.glob("*.jsonl"):
        for line in part.read_text().splitlines():
            if '"id"' in line:
                d = json.loads(line)
                texts[d["id"]] = normalize_text(d["text"], recipe.data.normalize)
    val_docs = list(val.documents())
    assert val_docs
    for d in val_docs:
        ids = [
            t for p in split_for_tokenizing(texts[d["id"]], recipe.data.chunk_chars) for t in tok.encode(p)
        ]
        assert val_stream[d["start"] : d["start"] + d["tokens"]] == [tok.bos_id, *ids, tok.eos_id]
    # Order records say the sample holds document-level FIM.
    records = order_records(recipe, built, 0, 0, 8)  # stage 1 has no FIM of its own
    assert all(r["document_fim"] and not r["fim"] for r in records)
    d = copy.deepcopy(recipe_dict)
    d["data"]["sources"]["python"]["document_fim"] = {"rate": 0.5}
    with pytest.raises(RecipeError, match=r"stages\[1\]\.fim: source 'python' is already FIM'd per document"):
        recipe_from_dict(d)


def test_data_order_of_a_multi_unit_source_names_exactly_the_window_tokens(
    recipe_dict, prepared, jsonl_source, tmp_path
):
    """Each unit's stream starts at a window boundary (its last window padded, or sharing one position with
    the next unit): order records still name exactly the tokens of each window."""
    from crystal_lm.data.loader import StageData
    from crystal_lm.data.order import order_records

    _, data = prepared
    tok = data.tokenizer
    folder, _ = jsonl_source
    recipe = _recipe(
        recipe_dict, folder, tmp_path / "o", workers=1, unit_bytes=120_000, tokenizer={"path": str(tok.path)}
    )
    built = prepare_data(recipe)
    shards = built.train["mine"]
    assert len(shards.index["units"]) > 3
    texts = {}
    for unit in range(3):
        with open(folder / f"part-{unit}.jsonl") as f:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if d.get("id"):
                    texts[d["id"]] = normalize_text(d["text"], recipe.data.normalize)
    total = recipe.stage_steps(recipe.stages[0]) * recipe.train.batch_size
    sd = StageData(recipe, built, 0)
    L = recipe.data.seq_len
    for r in order_records(recipe, built, 0, 0, total):
        packed = []
        for d in r["documents"]:
            ids = [
                t
                for p in split_for_tokenizing(texts[d["id"]], recipe.data.chunk_chars)
                for t in tok.encode(p)
            ]
            packed += [tok.bos_id, *ids, tok.eos_id][d["start"] : d["end"]]
        window = shards.window(r["sample"])
        assert packed == window.tokens[: window.valid].tolist()
        assert (r["source"], r["sample"]) == sd.mixture(r["index"]) and len(packed) <= L + 1


def test_a_text_budget_is_spent_in_unit_order_across_an_interruption(
    recipe_dict, prepared, jsonl_source, tmp_path, monkeypatch
):
    """`max_bytes`: a resumed build counts the text of the units finished before the interruption."""
    _, data = prepared
    folder, _ = jsonl_source
    tok = {"path": str(data.tokenizer.path)}

    def recipe(cache):
        r = _recipe(recipe_dict, folder, tmp_path / cache, workers=1, tokenizer=tok)
        r.data.sources["mine"].max_bytes = 250_000  # about half of the text
        return r

    clean = prepare_data(recipe("clean"))
    real, calls = build_mod.build_unit, []

    def dies_on_second(spec, unit, units_dir):
        calls.append(unit.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, unit, units_dir)

    monkeypatch.setattr(build_mod, "build_unit", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(recipe("resumed"))
    monkeypatch.undo()
    resumed = prepare_data(recipe("resumed"))
    for split in ("train", "val"):
        a, b = getattr(clean, split)["mine"], getattr(resumed, split)["mine"]
        assert [u["documents"] for u in a.index["units"]] == [u["documents"] for u in b.index["units"]]
        assert _shard_contents(a) == _shard_contents(b)
    kept = sum(u["documents_read"] for u in clean.train["mine"].index["units"])
    assert kept < jsonl_source[1]  # the budget ran out before the last unit's end


def test_max_bytes_is_a_utf8_prefix_the_same_for_shards_and_tokenizer_sampling(
    recipe_dict, prepared, tmp_path
):
    """`max_bytes` keeps the documents before the first one that would take the UTF-8 bytes of text past
    it, in unit order: no later (smaller) document is taken, whatever `unit_bytes`, and tokenizer sampling
    (`iter_source`) reads the same prefix."""
    from crystal_lm.data.documents import iter_source

    _, data = prepared
    folder = tmp_path / "src"
    folder.mkdir()
    word = "the quick brown fox jumps over a lazy dog "

    def doc(name: str, i: int, size: int) -> str:  # `size` characters, each "é" two UTF-8 bytes
        text = (f"{name}{i} " + word * 40)[: size - 50] + "é" * 50
        return json.dumps({"id": f"{name}{i}", "text": text}) + "\n"

    # a: ten documents of 300 characters (350 bytes), then one of 3000; b: ten more of 300 characters.
    (folder / "a.jsonl").write_text("".join(doc("a", i, 300) for i in range(10)) + doc("big", 0, 3000))
    (folder / "b.jsonl").write_text("".join(doc("b", i, 300) for i in range(10)))
    kept = {}
    for unit_bytes in (2**20, 1500):  # one unit per file, or byte ranges of a
        recipe = _recipe(
            recipe_dict,
            folder,
            tmp_path / f"c{unit_bytes}",
            workers=1,
            unit_bytes=unit_bytes,
            tokenizer={"path": str(data.tokenizer.path)},
        )
        recipe.data.sources["mine"].max_bytes = 3400  # 9 documents' bytes (10 documents' characters)
        built = prepare_data(recipe)
        ids = {d["id"] for split in (built.train, built.val) for d in split["mine"].documents()}
        assert ids == {d.id for d in iter_source(recipe, "mine", None)}
        assert built.manifest()["sources"]["mine"]["max_bytes_reached"] is True
        kept[unit_bytes] = ids
    assert kept[2**20] == kept[1500] == {f"a{i}" for i in range(9)}
