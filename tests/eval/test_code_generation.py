"""Code benchmarks end to end: completions from a checkpoint, Crystal's sampling settings, FIM prompts."""

from __future__ import annotations

import pytest

from crystal_lm.eval.code import CodeTask, load_benchmark
from crystal_lm.eval.code_generation import (
    CodeSettings,
    _finish_middle,
    _prompt,
    evaluate_code,
    generate_completions,
)
from crystal_lm.eval.generate import Sampling, generate, infill, load_checkpoint

from .test_generate import Scripted, make_spm_tok


@pytest.fixture(scope="module")
def final_model(trained_run):
    _, run_dir, _ = trained_run
    return load_checkpoint(run_dir)


def test_crystal_settings_are_the_papers():
    assert CodeSettings.named("crystal", "humaneval") == CodeSettings(temperature=0.2, n=20)
    assert CodeSettings.named("crystal", "mbpp") == CodeSettings(temperature=0.1, n=16)
    assert CodeSettings.named("crystal", "humaneval-infill-single") == CodeSettings()  # greedy
    assert CodeSettings.named("spm", "humaneval-infill-multi").fim_mode == "spm"
    with pytest.raises(ValueError, match="unknown code settings 'hot'"):
        CodeSettings.named("hot", "mbpp")


def test_sampled_completions_are_seeded_n_per_task_and_scored(final_model):
    model, tok = final_model
    settings = CodeSettings(temperature=0.8, n=3, max_new_tokens=12)
    a = generate_completions(model, tok, "mbpp", settings, limit=2, batch_size=4, seed=5)
    assert [t for t, _ in a] == ["MBPP/11"] * 3 + ["MBPP/12"] * 3
    assert a == generate_completions(model, tok, "mbpp", settings, limit=2, batch_size=4, seed=5)
    assert a != generate_completions(model, tok, "mbpp", settings, limit=2, batch_size=4, seed=6)
    result = evaluate_code((model, tok), "mbpp", settings, limit=2, seed=5)
    assert result["n"] == 2 and result["samples_per_task"] == 3 and "pass@1" in result
    assert "pass@10" not in result  # only k <= n is estimated
    assert result["settings"]["temperature"] == 0.8


def test_greedy_completion_equals_single_prompt_generation_cut_at_stop(final_model):
    """Batched benchmark generation (left padding, stop strings) gives what one prompt alone gives."""
    model, tok = final_model
    settings = CodeSettings(max_new_tokens=10)
    got = dict(generate_completions(model, tok, "humaneval", settings, limit=3, batch_size=3))
    from crystal_lm.eval.code import STOP_SEQUENCES

    for task in load_benchmark("humaneval")[:3]:
        alone = generate(
            model, tok, task.prompt, Sampling(max_new_tokens=10, temperature=0.0, stop=STOP_SEQUENCES)
        )
        assert got[task.task_id] == alone


def test_infill_prompts_match_the_cli_infill_and_middles_join_the_suffix(final_model):
    model, tok = final_model
    task = load_benchmark("humaneval-infill-single")[0]
    psm = _prompt(task, tok, infill=True, mode="psm")
    spm = _prompt(task, tok, infill=True, mode="spm")
    assert psm[0] == tok.fim_prefix_id and psm[-1] == tok.fim_middle_id
    assert spm[:2] == [tok.fim_prefix_id, tok.fim_suffix_id] and spm[-1] != tok.fim_middle_id
    assert sorted(psm) == sorted(spm)  # the same pieces, in the other order
    settings = CodeSettings(max_new_tokens=6)
    (_, middle), *_ = generate_completions(model, tok, "humaneval-infill-multi", settings, limit=1)
    multi = load_benchmark("humaneval-infill-multi")[0]
    alone = infill(model, tok, multi.prompt, multi.suffix, Sampling(max_new_tokens=6, temperature=0.0))
    assert middle == _finish_middle(alone, single_line=False)
    assert _finish_middle("a = 1\nb = 2", single_line=True) == "a = 1\n"
    assert _finish_middle("return x", single_line=False) == "return x\n"


def test_completion_keeps_its_indentation_with_a_sentencepiece_tokenizer(tmp_path, monkeypatch):
    """With Crystal's kind of tokenizer a completion decoded alone lost its first space: 3-space bodies."""
    import crystal_lm.eval.code_generation as cg

    tok = make_spm_tok(tmp_path)
    task = CodeTask("T/0", "def f(x):\n", "", "    return x\n", "assert f(1) == 1")
    monkeypatch.setattr(cg, "load_benchmark", lambda name: [task])
    body = "    return x\n"
    whole, head = tok.encode(task.prompt + body + "\ndef g(x):"), tok.encode(task.prompt)
    assert whole[: len(head)] == head
    model = Scripted(whole[len(head) :], tok.eos_id, tok.vocab_size, max_seq_len=256)
    assert generate_completions(model, tok, "humaneval", CodeSettings(max_new_tokens=40)) == [("T/0", body)]
    assert model.calls < 40  # the stop sequence ended it


def test_a_sample_does_not_depend_on_the_batch_size(final_model):
    model, tok = final_model
    settings = CodeSettings(temperature=0.8, n=3, max_new_tokens=8)
    a = generate_completions(model, tok, "mbpp", settings, limit=2, batch_size=4, seed=5)
    assert a == generate_completions(model, tok, "mbpp", settings, limit=2, batch_size=3, seed=5)
    assert len({text for _, text in a[:3]}) > 1  # the n samples of a problem differ
