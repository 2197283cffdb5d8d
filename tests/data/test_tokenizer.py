"""Tokenizer: Crystal's special-token layout, hash, and loading any tokenizer.json (a LLaMA-sized one too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from crystal_lm.data.tokenizer import (
    CRYSTAL_ADDED_TOKENS,
    Tokenizer,
    TokenizerError,
    padded_vocab_size,
    train_bpe,
)


def test_trained_tokenizer_has_crystal_layout(prepared):
    recipe, data = prepared
    tok = data.tokenizer
    base = recipe.data.tokenizer.vocab_size
    assert (tok.hf.token_to_id("<unk>"), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.hf.token_to_id(t) for t in CRYSTAL_ADDED_TOKENS] == list(range(base, base + 22))
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (
        base,
        base + 1,
        base + 2,
        base + 3,
    )
    assert padded_vocab_size(tok) == recipe.model.vocab_size  # 480 + 22 + 10 unused = 512
    assert len(tok.sha256) == 64


def test_round_trip_on_real_code_and_prose(prepared):
    _, data = prepared
    tok = data.tokenizer
    for text in (
        "def f(x):\n    return x ** 2  # square\n",
        "To be, or not to be, that is the question:",
        "<div class=\"nav\">\n  <a href='#'>é ü ß 漢字</a>\n</div>",
    ):
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id not in tok.encode("hello")  # encoding never adds specials by itself


def test_training_is_deterministic(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n" * 20, "The quick brown fox jumps over the lazy dog. " * 40]
    a = train_bpe(texts, 300, tmp_path / "a" / "tokenizer.json")
    b = train_bpe(texts, 300, tmp_path / "b" / "tokenizer.json")
    assert a.sha256 == b.sha256


def _llama_like_tokenizer(path, pipes=True):
    """A SentencePiece-style tokenizer.json with 32,000 base ids and Crystal's added tokens at 32000+."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < 32000:
        vocab[f"▁tok{len(vocab)}"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    added = CRYSTAL_ADDED_TOKENS if pipes else [t.replace("|", "") for t in CRYSTAL_ADDED_TOKENS[:18]]
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.add_special_tokens(list(added))
    hf.save(str(path))
    return path


@pytest.mark.parametrize("pipes", [True, False])
def test_loader_accepts_a_llama_sized_tokenizer(tmp_path, pipes):
    tok = Tokenizer(_llama_like_tokenizer(tmp_path / "tokenizer.json", pipes))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (
        32000,
        32001,
        32002,
        32003,
    )
    assert padded_vocab_size(tok) == 32032
    assert tok.decode(tok.encode("abc")) == "abc"


def test_missing_special_token_is_named(tmp_path):
    hf = HFTokenizer(
        models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, merges=[], unk_token="<unk>")
    )
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = Tokenizer(path)  # no FIM tokens: fine until FIM is asked for
    with pytest.raises(TokenizerError, match=r"no <\|fim_prefix\|> or <fim_prefix> token; FIM"):
        tok.require_fim()
    with pytest.raises(TokenizerError, match=r"fim_pad"):
        _ = tok.fim_pad_id
    bare = HFTokenizer(models.BPE(vocab={"<unk>": 0, "</s>": 1, "a": 2}, merges=[], unk_token="<unk>"))
    bare.save(str(path))
    with pytest.raises(TokenizerError, match=r"has no <s> token"):
        Tokenizer(path)


def test_a_recipe_without_fim_takes_a_tokenizer_without_fim_tokens(recipe_dict, tmp_path):
    """A user's own tokenizer without FIM tokens was refused even for a recipe that FIMs nothing; a recipe that
    does FIM is refused before any shard is built, naming the token."""
    import json

    from tokenizers import pre_tokenizers, trainers

    from crystal_lm.config import recipe_from_dict
    from crystal_lm.data.prepare import prepare_data

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    stdlib = Path(json.__file__).parent.parent  # real Python and prose to learn merges from
    hf.train_from_iterator((p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    recipe_dict["data"]["tokenizer"] = {"path": str(tmp_path / "tokenizer.json")}
    for stage in recipe_dict["stages"]:
        stage["fim"] = {"rate": 0.0}
    data = prepare_data(recipe_from_dict(recipe_dict))
    assert len(data.train["python"]) > 0
    recipe_dict["stages"][1]["fim"] = {"rate": 0.9}
    with pytest.raises(TokenizerError, match=r"fim_prefix.*FIM"):
        prepare_data(recipe_from_dict(recipe_dict))


def test_not_a_tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match=r"not a Hugging Face tokenizer\.json"):
        Tokenizer(path)
