"""The fast encoders give exactly the ids of `tokenizers` itself, on real text and adversarial text."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from crystal_lm.data import fast_bpe
from crystal_lm.data.build import split_for_tokenizing
from crystal_lm.data.fast_bpe import ByteLevelEncoder, MetaspaceEncoder, fast_encoder
from crystal_lm.data.tokenizer import BASE_SPECIAL_TOKENS, CRYSTAL_ADDED_TOKENS, Tokenizer, train_bpe


def reference(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]


def corpus_pieces(data) -> list[str]:
    """Every embedded document (prose, technical, Python, web) in the builder's 2000-character pieces."""
    pieces = []
    for part in ("prose", "technical", "python", "web"):
        with open(data.corpus.part_path(part)) as f:
            for line in f:
                pieces += split_for_tokenizing(json.loads(line)["text"], 2000)
    return pieces


@pytest.fixture(scope="module")
def larger_tokenizer(prepared, tmp_path_factory) -> Tokenizer:
    """A 2,000-id byte-level BPE: longer merges than the session's 480-id one."""
    _, data = prepared
    texts = []
    for part in ("prose", "python", "web"):
        with open(data.corpus.part_path(part)) as f:
            texts += [json.loads(line)["text"] for line in f]
    return train_bpe(texts, 2000, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def sentencepiece_style(texts: list[str], path, legacy: bool) -> Tokenizer:
    """A LLaMA-layout BPE: "▁" for spaces and in front, byte fallback tokens <0x00>..<0xFF> in the model's
    vocabulary, Crystal's added tokens. `legacy`: LLaMA's and Crystal's normalizers (Prepend + Replace, no
    pre-tokenizer); otherwise a Metaspace pre-tokenizer with split=False, as newer transformers write it."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # words for training only
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=list(BASE_SPECIAL_TOKENS), show_progress=False
    )
    hf.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    if legacy:
        spec["pre_tokenizer"] = None
    else:
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "first",
            "split": False,
        }
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.add_special_tokens(list(CRYSTAL_ADDED_TOKENS))
    hf.save(str(path))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def llama_style(prepared, tmp_path_factory) -> list[Tokenizer]:
    _, data = prepared
    texts = []
    for part in ("prose", "python", "web"):
        with open(data.corpus.part_path(part)) as f:
            texts += [json.loads(line)["text"] for line in f]
    tmp = tmp_path_factory.mktemp("spm")
    return [
        sentencepiece_style(texts, tmp / f"{k}.json", legacy=k == "legacy") for k in ("legacy", "metaspace")
    ]


def test_same_ids_as_tokenizers_on_the_corpus(prepared, larger_tokenizer, llama_style):
    _, data = prepared
    pieces = corpus_pieces(data)
    assert any(not p.isascii() for p in pieces) and any(p.isascii() for p in pieces)
    assert isinstance(data.tokenizer.fast, ByteLevelEncoder)
    assert [type(t.fast) for t in llama_style] == [MetaspaceEncoder, MetaspaceEncoder]
    for tok in (data.tokenizer, larger_tokenizer, *llama_style):
        assert tok.fast.separator is not None  # a text's new words go to the BPE model in one call
        assert tok.encode_batch(pieces) == reference(tok, pieces)
        assert tok.encode_batch(pieces) == reference(tok, pieces)  # again, from a warm cache


def test_same_ids_on_adversarial_text(larger_tokenizer, llama_style):
    """Random strings over every ASCII character, Unicode letters, digits, spaces and punctuation, emoji,
    "▁", contractions and added tokens: where the patterns, cut points and prefix rules could go wrong."""
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + list("éüß’“”—…漢字😀\u00a0\u2028\u3000\u0085٣▁")
    alphabet += ["'s", "'ll", "'D", " ", "\n", "  ", "\t\n", "<s>", "</s>", "<|fim_prefix|>", "<|fim", "'"]
    alphabet += ["the", " def", "    return", "▁▁", "<0x41>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(4000)]
    texts += ["", " ", "\n\n", "a  b", "a \n b", "x'sy", "1 2  3", "ﬁ ligature", "tab\t\tend\t", "▁x", " ▁"]
    for tok in (larger_tokenizer, *llama_style):
        assert tok.encode_batch(texts) == reference(tok, texts)
        assert [tok.encode(t) for t in texts[:200]] == reference(tok, texts[:200])


def test_bounded_cache_keeps_ids_exact(prepared, monkeypatch):
    _, data = prepared
    monkeypatch.setattr(fast_bpe, "CACHE_ENTRIES", 50)
    tok = Tokenizer(data.tokenizer.path)
    pieces = corpus_pieces(data)[:300]
    assert tok.encode_batch(pieces) == reference(tok, pieces)
    assert 0 < len(tok.fast.cache) <= 50


def test_other_tokenizers_stay_on_tokenizers(prepared, tmp_path):
    _, data = prepared
    assert Tokenizer(data.tokenizer.path, fast=False).fast is None
    byte_level = HFTokenizer.from_file(str(data.tokenizer.path))
    assert fast_encoder(byte_level) is not None
    with_normalizer = HFTokenizer.from_file(str(data.tokenizer.path))
    with_normalizer.normalizer = normalizers.Lowercase()
    assert fast_encoder(with_normalizer) is None
    with_prefix = HFTokenizer.from_file(str(data.tokenizer.path))
    with_prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert fast_encoder(with_prefix) is None
    dropout = json.loads(byte_level.to_str())
    dropout["model"]["dropout"] = 0.1
    assert fast_encoder(HFTokenizer.from_str(json.dumps(dropout))) is None


def test_sentencepiece_style_needs_words_no_token_spans(llama_style):
    """A vocabulary token with "▁" after another character could merge across a word start: refused."""
    for tok in llama_style:
        spec = json.loads(tok.hf.to_str())
        assert fast_encoder(HFTokenizer.from_str(json.dumps(spec))) is not None
        spanning = json.loads(json.dumps(spec))
        spanning["model"]["vocab"]["e▁t"] = len(spanning["model"]["vocab"])
        assert fast_encoder(HFTokenizer.from_str(json.dumps(spanning))) is None
        splitting = json.loads(json.dumps(spec))
        if splitting["pre_tokenizer"] is not None:
            splitting["pre_tokenizer"]["split"] = True  # a pre-tokenizer this module does not reproduce
            assert fast_encoder(HFTokenizer.from_str(json.dumps(splitting))) is None


def test_added_tokens_are_found_where_tokenizers_finds_them(llama_style, tmp_path):
    """An added token with normalized=True matches the normalized text, where a space is "▁"."""
    hf = HFTokenizer.from_file(str(llama_style[0].path))
    hf.add_tokens([AddedToken("hi there", normalized=True), AddedToken("▁xyzzy", normalized=True)])
    hf.save(str(tmp_path / "added.json"))
    tok = Tokenizer(tmp_path / "added.json")
    assert tok.fast is not None
    texts = ["hi▁there", " xyzzy", "say hi there", "hi  there", "xyzzy", "▁xyzzy", "plain text"]
    assert tok.encode_batch(texts) == reference(tok, texts)


def test_a_tokenizer_changed_after_loading_is_followed(prepared):
    _, data = prepared
    tok = Tokenizer(data.tokenizer.path)
    tok.hf.add_special_tokens(["<foo>"])
    assert tok.encode_batch(["a<foo>b", "plain"]) == reference(tok, ["a<foo>b", "plain"])
    tok.hf.enable_truncation(3)
    assert (
        tok.encode("a longer text than three tokens")
        == reference(tok, ["a longer text than three tokens"])[0]
    )
    assert len(tok.encode("a longer text than three tokens")) == 3


def test_no_fast_path_when_unknown_characters_are_dropped(llama_style):
    """Without <unk> and without every byte token, `tokenizers` drops an unknown character and its
    neighbours may merge across it, so no cut is safe."""
    spec = json.loads(llama_style[0].hf.to_str())
    spec["model"]["unk_token"] = None
    assert fast_encoder(HFTokenizer.from_str(json.dumps(spec))) is not None  # every byte is encodable
    del spec["model"]["vocab"]["<0x09>"]
    assert fast_encoder(HFTokenizer.from_str(json.dumps(spec))) is None
