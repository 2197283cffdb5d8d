"""The published data order: records agree with what StageData feeds the trainer, token for token."""

from __future__ import annotations

import copy
from collections import Counter, defaultdict

import numpy as np
import pytest

from crystal_lm.data import order
from crystal_lm.data.build import split_for_tokenizing
from crystal_lm.data.documents import iter_source
from crystal_lm.data.loader import StageData
from crystal_lm.data.order import order_fingerprint, order_records, sample_record, stage_stats


def _long(recipe, samples: int):
    """The recipe with every stage `samples` global samples long (same sources, so the same shards)."""
    r = copy.deepcopy(recipe)
    for stage in r.stages:
        stage.tokens = samples * r.data.seq_len
    return r


@pytest.fixture(scope="module")
def packed_docs(prepared):
    """Each training document's packed tokens `<s> ids </s>`, re-tokenized from the source text."""
    recipe, data = prepared
    tok = data.tokenizer
    cache: dict[tuple[str, str], list[int]] = {}
    texts = {n: {d.id: d.text for d in iter_source(recipe, n, data.corpus)} for n in recipe.data.sources}

    def get(source: str, doc_id: str) -> list[int]:
        if (source, doc_id) not in cache:
            pieces = split_for_tokenizing(texts[source][doc_id], recipe.data.chunk_chars)
            cache[source, doc_id] = [tok.bos_id, *(t for p in pieces for t in tok.encode(p)), tok.eos_id]
        return cache[source, doc_id]

    return get


def test_records_name_the_documents_the_trainer_read(prepared, packed_docs):
    recipe, data = prepared
    L = recipe.data.seq_len
    seen_fim = seen_plain = 0
    for si in range(len(recipe.stages)):
        sd = StageData(recipe, data, si)
        total = recipe.stage_steps(recipe.stages[si]) * recipe.train.batch_size
        records = order_records(recipe, data, si, 0, total)
        assert [r["index"] for r in records] == list(range(total))
        for r in records:
            assert r["step"] == r["index"] // recipe.train.batch_size and r["stage"] == si + 1  # as --stage
            assert (r["source"], r["sample"]) == sd.mixture(r["index"])
            assert r["fim"] == (r["source"] in sd.fim_sources) and r["document_fim"] is False
            stage_fim = recipe.stages[si].fim
            assert r["fim_rate"] == (
                stage_fim.rate if r["fim"] else 0.0
            )  # the small recipe: one rate a stage
            # The listed document spans, cut from the re-tokenized documents, are the window's tokens.
            spans = [packed_docs(r["source"], d["id"])[d["start"] : d["end"]] for d in r["documents"]]
            assert all(spans), r
            concat = np.concatenate(spans)
            window = data.train[r["source"]].window(r["sample"])
            assert len(concat) == (min(window.valid, L) if r["fim"] else window.valid)
            assert concat.tolist() == window.tokens[: len(concat)].tolist()
            inputs, labels, mask, source, _ = sd.sample(r["index"])
            assert source == r["source"]
            if r["fim"]:
                seen_fim += 1
            else:
                seen_plain += 1
                assert inputs.tolist() == concat[:L].tolist()
                assert labels[: len(concat) - 1].tolist() == concat[1:].tolist()
                assert mask.tolist() == [1.0] * (len(concat) - 1) + [0.0] * (L + 1 - len(concat))
    assert seen_fim and seen_plain


def test_document_spans_at_exact_boundaries():
    idx = order._DocumentIndex(["a", "b", "c"], np.array([0, 3, 8]), np.array([3, 8, 10]), np.zeros(3, int))
    assert idx.spans(0, 3, 0) == [{"id": "a", "start": 0, "end": 3}]
    assert idx.spans(3, 8, 0) == [{"id": "b", "start": 0, "end": 5}]  # no empty span for "a" or "c"
    assert idx.spans(2, 9, 0) == [
        {"id": "a", "start": 2, "end": 3},
        {"id": "b", "start": 0, "end": 5},
        {"id": "c", "start": 0, "end": 1},
    ]
    assert idx.spans(9, 10, 0) == [{"id": "c", "start": 1, "end": 2}]
    # A unit ending on a full window shares its last position with the next unit's first token.
    two = order._DocumentIndex(["a", "b"], np.array([0, 4]), np.array([5, 9]), np.array([0, 1]))
    assert two.spans(0, 5, 0) == [{"id": "a", "start": 0, "end": 5}]
    assert two.spans(4, 9, 1) == [{"id": "b", "start": 0, "end": 5}]


def test_records_cover_document_boundaries_and_the_padded_last_window(prepared, packed_docs):
    recipe, data = prepared
    L = recipe.data.seq_len
    long = _long(recipe, 20_000)
    sd = StageData(long, data, 0)  # stage 1: no FIM
    last = {n: len(data.train[n]) - 1 for n in sd.mixture.names}
    hits = [g for g in range(20_000) if sd.mixture(g)[1] == last[sd.mixture(g)[0]]][:3]
    assert hits, "a long stage draws every source's last window"
    multi = None
    for r in order_records(long, data, 0, 0, 400):
        if len(r["documents"]) > 1:
            multi = r
            break
    assert multi is not None, "some window spans a document boundary"
    first, second = multi["documents"][:2]
    assert first["end"] == len(packed_docs(multi["source"], first["id"])) and second["start"] == 0
    for g in hits:
        (r,) = order_records(long, data, 0, g, 1)
        valid = data.train[r["source"]].valid(r["sample"])
        assert sum(d["end"] - d["start"] for d in r["documents"]) == valid < L + 1
        tail = r["documents"][-1]
        assert tail["end"] == len(packed_docs(r["source"], tail["id"]))  # the stream's last document ends
        s = sample_record(long, data, 0, g)
        assert s["loss_mask"] == [1] * (valid - 1) + [0] * (L - valid + 1)  # EOS padding is not trained on


def test_epochs_count_passes_over_each_source(prepared):
    recipe, data = prepared
    long = _long(recipe, 6000)
    records = order_records(long, data, 2, 0, 6000)
    draws: Counter[str] = Counter()
    per_epoch: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in records:
        size = len(data.train[r["source"]])
        assert r["epoch"] == draws[r["source"]] // size
        draws[r["source"]] += 1
        per_epoch[r["source"], r["epoch"]].append(r["sample"])
    assert max(r["epoch"] for r in records) >= 1, "a source wraps into a second pass"
    for samples in per_epoch.values():
        assert len(samples) == len(set(samples))  # within a pass, no window repeats


def test_order_is_deterministic_and_any_range_can_be_computed_alone(prepared):
    recipe, data = prepared
    long = _long(recipe, 100)
    whole = order_records(long, data, 1, 0, 30)
    order._INDEXES.clear()  # a fresh lookup from documents.jsonl
    assert order_records(long, data, 1, 0, 30) == whole
    assert order_records(long, data, 1, 10, 10) == whole[10:20]
    assert order_records(long, data, 1, 29, 1) == whole[29:]
    assert order_records(long, data, 0, 0, 30) != whole  # another stage, another order
    assert order_records(long, data, 1, 0, 0) == []


def test_out_of_range_indices_name_the_stage(prepared):
    recipe, data = prepared
    total = recipe.stage_steps(recipe.stages[1]) * recipe.train.batch_size
    assert total == 24
    order_records(recipe, data, 1, total - 1, 1)  # the last sample is fine
    for start, count in ((total, 1), (-1, 1), (20, 5)):
        with pytest.raises(ValueError, match=r"stage 2 'stage2'.*\[0, 24\)"):  # counted from 1, as --stage
            order_records(recipe, data, 1, start, count)
    with pytest.raises(ValueError, match=r"stage 3 'stage3'.*\[0, 16\)"):
        sample_record(recipe, data, 2, 16)
    with pytest.raises(ValueError, match="stage 4 out of range: the recipe has stages 1-3"):
        order_records(recipe, data, 3, 0, 1)


def test_sample_record_is_the_trainers_sample_with_fim_padding_masked(prepared):
    recipe, data = prepared
    pad = data.tokenizer.fim_pad_id
    sd = StageData(recipe, data, 1)
    for g in range(0, 24, 5):
        s = sample_record(recipe, data, 1, g)
        inputs, labels, mask, source, n_fim = sd.sample(g)
        assert (s["index"], s["stage"], s["source"]) == (g, 2, source)
        assert s["sample"] == sd.mixture(g)[1]
        assert s["input_ids"] == inputs.tolist() and s["labels"] == labels.tolist()
        assert s["loss_mask"] == [int(m) for m in mask] and s["fim_segments"] == n_fim
    # A FIM source's padded last window: FIM drops the EOS padding and pads with <|fim_pad|>, masked out.
    long = _long(recipe, 20_000)
    sd = StageData(long, data, 1)
    # Draws of the FIM sources' last windows (each stream's padded end); one whose padding FIM kept.
    last_draws = (
        g
        for g in range(20_000)
        if sd.mixture(g)[0] in sd.fim_sources and sd.mixture(g)[1] == len(data.train[sd.mixture(g)[0]]) - 1
    )
    s = next(s for s in (sample_record(long, data, 1, g) for g in last_draws) if pad in s["input_ids"])
    assert s["loss_mask"] == [int(t != pad) for t in s["input_ids"]]
    assert 0 in s["loss_mask"] and set(s["loss_mask"]) == {0, 1}


def test_stage_stats_shares_epochs_and_fim(prepared):
    recipe, data = prepared
    padded = 0
    for r in (recipe, _long(recipe, 3000)):  # within the first mixture block, and across blocks
        rows = stage_stats(r, data)
        for si, stage in enumerate(r.stages):
            sd = StageData(r, data, si)
            total = r.stage_steps(stage) * r.train.batch_size
            mine = {row["source"]: row for row in rows if row["stage"] == si + 1}  # numbered as --stage
            assert set(mine) == set(sd.mixture.names)
            assert sum(row["share"] for row in mine.values()) == pytest.approx(1.0)
            assert sum(row["sample_share"] for row in mine.values()) == pytest.approx(1.0)
            drawn = Counter(sd.mixture(g)[0] for g in range(total))
            # The trainer's loss positions: padding of a unit's last window is not trained on.
            trained = Counter()
            for g in range(total):
                source, i = sd.mixture(g)
                trained[source] += data.train[source].valid(i) - 1
            padded += sum(drawn[n] * r.data.seq_len - trained[n] for n in drawn)
            planned = sd.mixture.epochs(total)
            for name, row in mine.items():
                size = len(data.train[name])
                assert row["samples"] == drawn[name] and row["tokens"] == trained[name]
                assert row["sample_share"] == pytest.approx(row["samples"] / total)
                assert row["share"] == pytest.approx(trained[name] / sum(trained.values()))
                assert row["epochs"] == pytest.approx(row["samples"] / size)
                assert row["source_samples"] == size
                assert row["source_tokens"] == data.train[name].n_tokens
                assert row["mixture_epochs"] == pytest.approx(planned[name])
                assert row["fim_rate"] == (stage.fim.rate if name in sd.fim_sources else 0.0)
    assert padded > 0  # padded last windows were drawn, and left out of the token counts
    by = {(row["stage"], row["source"]): row for row in stage_stats(recipe, data)}
    assert by[2, "python"]["fim_rate"] == 0.9 and by[2, "prose"]["fim_rate"] == 0.0
    assert by[3, "web"]["fim_rate"] == 0.3 and by[1, "python"]["fim_rate"] == 0.0


def test_fingerprint_recomputes_and_changes_with_the_order(prepared):
    recipe, data = prepared
    fp = order_fingerprint(recipe, data, 1)
    assert len(fp) == 64 and order_fingerprint(recipe, data, 1) == fp
    assert order_fingerprint(recipe, data, 0) != fp
    reseeded = copy.deepcopy(recipe)
    reseeded.seed = 2
    assert order_fingerprint(reseeded, data, 1) != fp
    assert order_fingerprint(_long(recipe, 5000), data, 1) != fp
    assert order.probe_indices(5000, 64)[:1] == [0] and order.probe_indices(5000, 64)[-1] == 4999
    assert len(order.probe_indices(5000, 64)) == 64 and order.probe_indices(3, 64) == [0, 1, 2]
    assert order_fingerprint(recipe, data, 1, probe=24) != order_fingerprint(recipe, data, 1, probe=2)


def test_order_fingerprints_hash_the_keys_releases_were_first_published_with(prepared):
    """A key added to order records later (`fim_rate`) must not change the fingerprint: releases made before
    would no longer verify."""
    recipe, data = prepared
    for record in order_records(recipe, data, 1, 0, 8):
        hashed = order._as_first_published(record)
        assert set(hashed) == {"index", "step", "stage", "source", "sample", "epoch", "documents", "fim"}
        assert hashed["stage"] == record["stage"] - 1
