"""Using checkpoints: loading one alone, sampling, infilling, validation loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.eval.generate import (
    Sampling,
    generate,
    generate_batch,
    generate_ids,
    infill,
    load_checkpoint,
)
from crystal_lm.eval.validation import validation_indices, validation_loss
from crystal_lm.train.checkpoint import CheckpointError


def test_checkpoint_loads_alone_and_reproduces_its_validation_loss(trained_run, prepared):
    recipe, run_dir, summary = trained_run
    _, data = prepared
    model, tok = load_checkpoint(run_dir / "checkpoints" / "phase2_checkpoint_000006")
    assert tok.sha256 == data.tokenizer.sha256
    val = validation_loss(model, data.val, recipe)
    assert val == pytest.approx(summary["stages"][1]["val_loss"], rel=1e-6)
    newest, _ = load_checkpoint(run_dir)  # a run folder means its newest checkpoint
    assert validation_loss(newest, data.val, recipe) == pytest.approx(
        summary["stages"][2]["val_loss"], rel=1e-6
    )


def test_generation_is_seeded_and_stops_at_limits(trained_run):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    s = Sampling(max_new_tokens=12, temperature=0.9, seed=3)
    a, b = generate(model, tok, "def main(", s), generate(model, tok, "def main(", s)
    assert a == b and isinstance(a, str)
    ids = generate_ids(
        model, [tok.bos_id, *tok.encode("import os\n")], Sampling(max_new_tokens=5, temperature=0), set()
    )
    assert len(ids) == 5
    # Never past the context window.
    long_prompt = [tok.bos_id] * (model.cfg.max_seq_len - 2)
    assert len(generate_ids(model, long_prompt, Sampling(max_new_tokens=50, temperature=0), set())) <= 2


def test_infill_prompts_through_fim_tokens(trained_run, monkeypatch):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    seen = {}
    import crystal_lm.eval.generate as g

    real = g.generate_batch

    def spy(model, prompts, sampling, stop_ids, **kw):
        seen["prompt"], seen["stops"] = prompts[0], stop_ids
        return real(model, prompts, sampling, stop_ids, **kw)

    monkeypatch.setattr(g, "generate_batch", spy)
    middle = infill(model, tok, "def add(a, b):\n    ", "\n", Sampling(max_new_tokens=8, temperature=0))
    p = seen["prompt"]
    assert p[0] == tok.fim_prefix_id and p[1] == tok.bos_id and p[-1] == tok.fim_middle_id
    assert tok.fim_suffix_id in p and tok.eos_id in seen["stops"]
    assert isinstance(middle, str)
    infill(model, tok, "x = ", "\n", Sampling(max_new_tokens=4, temperature=0), mode="spm")
    assert seen["prompt"][:2] == [tok.fim_prefix_id, tok.fim_suffix_id]
    with pytest.raises(ValueError, match="psm"):
        infill(model, tok, "a", "b", Sampling(), mode="pms")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_validation_indices_are_fixed_and_spread():
    assert validation_indices(5, 8) == [0, 1, 2, 3, 4]
    idx = validation_indices(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy choice is `script[k]` at its k-th call, then `after` (for tests of
    the text around the ids, independent of what a trained model says)."""

    def __init__(self, script: list[int], after: int, vocab: int, max_seq_len: int = 64) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(1, 1)
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.script, self.after, self.vocab, self.calls = script, after, vocab, 0

    def forward(self, tokens, cache=None, positions=None, mask=None):
        t = self.script[self.calls] if self.calls < len(self.script) else self.after
        self.calls += 1
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        logits[..., t] = 1.0
        return logits


def make_spm_tok(folder) -> Tokenizer:
    """A SentencePiece-style tokenizer (LLaMA's and Crystal's kind: its decoder strips one leading space)."""
    from ..data.test_tokenizer import _llama_like_tokenizer

    return Tokenizer(_llama_like_tokenizer(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory) -> Tokenizer:
    return make_spm_tok(tmp_path_factory.mktemp("spm"))


def test_continuation_keeps_its_leading_space_with_a_sentencepiece_tokenizer(spm_tok):
    tok = spm_tok
    whole, head = tok.encode("ab cd"), tok.encode("ab")
    assert whole[: len(head)] == head
    greedy = Sampling(max_new_tokens=10, temperature=0)
    model = Scripted(whole[len(head) :], tok.eos_id, tok.vocab_size)
    assert generate(model, tok, "ab", greedy) == " cd"
    # A stop string is matched in the text as printed (with the space).
    model = Scripted(whole[len(head) :], tok.eos_id, tok.vocab_size)
    assert generate(model, tok, "ab", Sampling(max_new_tokens=10, temperature=0, stop=(" c",))) == ""
    # A middle was encoded alone in training (data/fim.py), dummy "▁" included: it decodes alone.
    model = Scripted(tok.encode(" cd"), tok.eos_id, tok.vocab_size)
    assert infill(model, tok, "ab", "\n", greedy) == " cd"


def test_stop_string_ends_generation_early(spm_tok):
    tok = spm_tok
    script = tok.encode("x ab\n\ncd ef gh")[len(tok.encode("x")) :]
    model = Scripted(script, tok.eos_id, tok.vocab_size)
    s = Sampling(max_new_tokens=30, temperature=0, stop=("\n\n",))
    assert generate(model, tok, "x", s) == " ab"
    assert model.calls <= len(tok.encode("x ab\n\n")) + 1  # not all 30 steps
    model = Scripted(tok.encode("ab\n\ncd ef gh"), tok.eos_id, tok.vocab_size)
    assert infill(model, tok, "x", "y", s) == "ab" and model.calls <= len(tok.encode("ab\n\n")) + 1


def test_sampled_row_is_the_same_alone_and_in_any_batch(trained_run):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("def main(", "import os\n", "The ")]
    s = Sampling(max_new_tokens=10, temperature=1.0, top_k=None, top_p=None, seed=7)
    batch = generate_batch(model, prompts, s, set(), pad_id=tok.eos_id)
    alone = [generate_batch(model, [p], s, set())[0] for p in prompts]
    assert batch == alone
    assert generate(model, tok, ["def main(", "The "], s)[1] == generate(model, tok, "The ", s)
    # Own seeds per row: the same prompt twice in a batch gives two samples.
    twice = generate_batch(model, prompts[:1] * 2, s, set(), seeds=[1, 2])
    assert twice[0] != twice[1]


def test_each_row_gets_its_room_next_to_a_long_prompt(trained_run):
    _, run_dir, _ = trained_run
    model, tok = load_checkpoint(run_dir)
    limit = model.cfg.max_seq_len
    long_prompt, short = [tok.bos_id] * (limit - 4), [tok.bos_id, *tok.encode("import os\n")]
    greedy = Sampling(max_new_tokens=10, temperature=0)
    out = generate_batch(model, [long_prompt, short], greedy, set(), pad_id=tok.eos_id)
    assert [len(o) for o in out] == [4, 10]
    assert out[1] == generate_batch(model, [short], greedy, set())[0]
    with pytest.raises(ValueError, match=f"prompt 2 is .* context is {limit}"):
        generate(model, tok, ["x", "y " * limit], greedy, strict=True)


def test_bad_sampling_settings_are_named():
    for kw, name in (
        (dict(top_k=-5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1), "temperature"),
    ):
        with pytest.raises(ValueError, match=name):
            Sampling(**kw)


def test_a_hugging_face_or_release_folder_is_named_with_the_import_command(trained_run, tmp_path, capsys):
    """Every command that takes a checkpoint says what the folder is and how to import it (not that it has no
    COMPLETE marker or no checkpoints/), the same way, with a command that runs as printed."""
    import shutil

    from crystal_lm.cli import main
    from crystal_lm.interop.llm360 import export_hf
    from crystal_lm.release.bundle import write_manifest

    _, run_dir, _ = trained_run
    hf = export_hf(run_dir / "checkpoints" / "phase3_checkpoint_000004", tmp_path / "hf")
    release = tmp_path / "release"
    shutil.copytree(hf, release)
    shutil.copytree(hf, release / "checkpoints" / "small_phase3_checkpoint_000004")
    write_manifest(release)
    for folder, expected in (
        (
            hf,
            f"a Hugging Face model folder (LLM360 layout), not a crystal-lm checkpoint; run `crystal import {hf} --out OUT` first",
        ),
        (
            release,
            f"a release folder (Hugging Face layout), not a crystal-lm checkpoint; run `crystal import {release} --out OUT`",
        ),
    ):
        out = str(tmp_path / "o")
        for args in (
            ["generate", str(folder), "--prompt", "x", "--max-new-tokens", "1"],
            ["infill", str(folder), "--prefix", "a", "--suffix", "b", "--max-new-tokens", "1"],
            ["export", str(folder), "--out", out],
            ["eval-lm", str(folder), "--tasks", "arc_easy", "--limit", "1", "--out", out],
            ["eval-code", "humaneval", "--checkpoint", str(folder), "--limit", "1", "--out", out],
            ["eval", str(folder), "--tasks", "arc_easy", "--store", out],
        ):
            assert main(args) == 2, args
            err = capsys.readouterr().err
            assert expected in err and "COMPLETE" not in err, (args, err)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
