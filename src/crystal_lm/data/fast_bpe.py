"""Exact, faster encoding for BPE tokenizers: words cut out in Python, each word's BPE cached.

Hugging Face `tokenizers` spends most of an `encode_batch` around the BPE rather than in it (normalized strings
with alignments, offsets, `Encoding` objects), and a SentencePiece-style tokenizer such as LLaMA's, which
Crystal uses, has no pre-tokenizer at all: its BPE runs over each whole piece of text, and its word cache
never hits. Yet BPE merges never cross a point that no vocabulary token spans, so the ids of a text are the
ids of its words, one after another. We cut the words where the tokenizer would (or where no token can
cross), look each up in a cache, and ask the tokenizer's own BPE model (`model.tokenize`) for a word not seen
yet. Two kinds are reproduced:

- byte-level BPE (GPT-2 pre-tokenization, as `train_bpe` makes): on ASCII text the pre-tokenizer's
  expression has plain ASCII classes, so Python's `re` splits exactly as it does. Other text is cut at points
  no match can span (before a space or newline that follows a visible ASCII character); its non-ASCII pieces
  go to the tokenizer itself.
- SentencePiece-style BPE (LLaMA, Mistral, Crystal: "▁" for spaces and in front, byte fallback): a word is
  a run of "▁" and what follows up to the next "▁". Taken only when no vocabulary token holds a "▁" after
  another character, which is checked when the encoder is made.

Text holding an added token (`<s>`, `<|fim_prefix|>`, ...) goes to the tokenizer whole. The ids equal
`tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)` exactly (tests/data/test_fast_bpe.py
compares them on the corpus and on adversarial text). Any other tokenizer, or one with dropout or truncation,
stays on `tokenizers`: `fast_encoder` returns None for it.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import chain

from tokenizers import Tokenizer as HFTokenizer

SPACE = "▁"  # SentencePiece's visible space
MAX_CACHED_WORD = 64  # longer words (base64, minified code) are rare and would only bloat the cache
CACHE_ENTRIES = 1 << 16  # bounds memory (~10 MB); cleared when full, refilled by the frequent words at once


class WordCacheEncoder(ABC):
    """What both kinds share: the word cache, one call to the BPE model for a text's words not in it, and
    added tokens sent to the tokenizer whole. A subclass cuts a text into a plan: words, and the index of
    each piece the tokenizer must encode itself (in `slow`)."""

    def __init__(self, hf: HFTokenizer, spec: dict) -> None:
        self.hf = hf
        self.cache: dict[str, tuple[int, ...]] = {}
        self.n_ids = hf.get_vocab_size(with_added_tokens=True)
        # `tokenizers` finds an added token in the raw text, or (normalized=True) in the normalized text,
        # where spaces are "▁": searching with every "▁" read as a space finds all of those (and a few more,
        # which only cost speed).
        added = [t.content.replace(SPACE, " ") for t in hf.get_added_tokens_decoder().values()]
        self.added = re.compile("|".join(map(re.escape, added))) if added else None
        self.model = hf.model  # its `tokenize` is BPE on one word, nothing around it
        self.separator, self.separator_id = _separator(spec["model"])

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._changed():
            return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        slow: list[str] = []  # pieces the tokenizer itself encodes, in one batch at the end
        holes: list[tuple[list, int, int]] = []  # (a text's ids, position, index in `slow`)
        get = self.cache.get
        out: list[list] = []
        added = self.added
        for text in texts:
            if added is not None and added.search(text.replace(SPACE, " ") if SPACE in text else text):
                slow.append(text)
                plan: list = [len(slow) - 1]
            else:
                plan = self._plan(text, slow)
            ids = list(map(get, plan))
            if None in ids:
                self._fill(plan, ids, holes)
            out.append(ids)
        if slow:
            slow_ids = [e.ids for e in self.hf.encode_batch(slow, add_special_tokens=False)]
            for ids, j, k in holes:
                ids[j] = slow_ids[k]
        return [list(chain.from_iterable(ids)) for ids in out]

    def _changed(self) -> bool:
        """The tokenizer changed since this encoder was made: tokens added, truncation or padding set."""
        hf = self.hf
        return bool(hf.get_vocab_size(with_added_tokens=True) != self.n_ids or hf.truncation or hf.padding)

    def _fill(self, plan: list, ids: list, holes: list) -> None:
        """Fill in the words missing from the cache; note the slow pieces in `holes`."""
        positions, j = [], ids.index(None)
        while True:  # list.index scans in C: Python work only per hole
            positions.append(j)
            try:
                j = ids.index(None, j + 1)
            except ValueError:
                break
        found = self._encode_words(list(dict.fromkeys(plan[j] for j in positions if type(plan[j]) is str)))
        for j in positions:
            w = plan[j]
            if type(w) is str:
                ids[j] = found[w]
            else:
                holes.append((ids, j, w))

    @abstractmethod
    def _plan(self, text: str, slow: list[str]) -> list:
        """The words of `text` in order; a piece only the tokenizer can encode is appended to `slow` and
        stands in the plan as its index there."""

    def _encode_words(self, words: list[str]) -> dict[str, tuple[int, ...]]:
        inputs = [self._bpe_input(w) for w in words]
        found = None
        if self.separator is not None and len(inputs) > 1:
            # One call for all: a separator no merge touches gives its own token between the words' ids.
            joined = self.separator.join(inputs)
            if joined.count(self.separator) == len(inputs) - 1:
                pieces = _split(self.model.tokenize(joined), self.separator_id)
                found = dict(zip(words, pieces, strict=True)) if len(pieces) == len(words) else None
        if found is None:
            found = {
                w: tuple(t.id for t in self.model.tokenize(x)) for w, x in zip(words, inputs, strict=True)
            }
        for w, ids in found.items():
            if len(w) <= MAX_CACHED_WORD:
                if len(self.cache) >= CACHE_ENTRIES:
                    self.cache.clear()
                self.cache[w] = ids
        return found

    def _bpe_input(self, word: str) -> str:
        return word


def _separator(model: dict) -> tuple[str | None, int | None]:
    """A character that is a token of its own and part of no longer token, so no merge touches it; None
    when there is none, or when a BPE option (whole-word lookup, affixes) makes joined words differ."""
    if (
        model.get("ignore_merges")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return None, None
    vocab = model["vocab"]
    in_longer = _chars_in_longer_tokens(vocab)
    lone = sorted(t for t in vocab if len(t) == 1 and t not in in_longer)
    return (lone[0], vocab[lone[0]]) if lone else (None, None)


def _chars_in_longer_tokens(vocab: dict) -> set[str]:
    return {c for t in vocab if len(t) > 1 for c in t}


def _every_byte_encodable(model: dict) -> bool:
    """Byte fallback with all 256 byte tokens: no character is ever unknown."""
    vocab = model.get("vocab", {})
    return bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))


def _split(tokens: list, separator_id: int) -> list[tuple[int, ...]]:
    ids = [t.id for t in tokens]
    pieces, start = [], 0
    while True:
        try:
            end = ids.index(separator_id, start)  # scans in C
        except ValueError:
            pieces.append(tuple(ids[start:]))
            return pieces
        pieces.append(tuple(ids[start:end]))
        start = end + 1


# GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` with its
# classes restricted to ASCII: letters A-Za-z, digits 0-9, whitespace \t \n \v \f \r and space (Unicode's
# White_Space in ASCII; not Python's `\s`, which adds \x1c-\x1f).
_WS = r"\t\n\x0b\x0c\r "
ASCII_WORDS = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# A space or newline after a visible ASCII character starts a new match whatever follows, and no match that
# ends there looked past it: the pieces on either side split exactly as the whole does.
SAFE_CUT = re.compile(r"(?<=[!-~])(?=[ \n])")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, for the ASCII bytes (what `ByteLevel` feeds BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shifted = iter(range(256, 512))
    table = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    return {b: table[b] for b in range(128)}


class ByteLevelEncoder(WordCacheEncoder):
    """Byte-level BPE with GPT-2 pre-tokenization and no normalizer."""

    def __init__(self, hf: HFTokenizer, spec: dict) -> None:
        super().__init__(hf, spec)
        self.alphabet = _byte_level_alphabet()

    @staticmethod
    def supports(spec: dict) -> bool:
        pre = spec.get("pre_tokenizer") or {}
        return (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
        )

    def _plan(self, text: str, slow: list[str]) -> list:
        if text.isascii():
            return ASCII_WORDS.findall(text)
        plan: list = []
        ascii_run: list[str] = []  # consecutive ASCII pieces are split as one
        for piece in SAFE_CUT.split(text):
            if piece.isascii():
                ascii_run.append(piece)
                continue
            if ascii_run:
                plan += ASCII_WORDS.findall("".join(ascii_run))
                ascii_run = []
            slow.append(piece)
            plan.append(len(slow) - 1)
        if ascii_run:
            plan += ASCII_WORDS.findall("".join(ascii_run))
        return plan

    def _bpe_input(self, word: str) -> str:
        return word.translate(self.alphabet)


BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


class MetaspaceEncoder(WordCacheEncoder):
    """SentencePiece-style BPE as `tokenizers` writes it: either the normalizers Prepend("▁") + Replace(" ",
    "▁") and no pre-tokenizer (LLaMA's and Crystal's files), or a Metaspace pre-tokenizer with split=False.

    `tokenizers` runs BPE over the whole text. A merge joins two neighbours only into a vocabulary token, so
    the text can be cut wherever no token holds the two characters on either side: before a "▁" that follows
    another character (checked to hold for the vocabulary), and around a character no longer token contains
    (a newline, a tab, a digit in LLaMA's vocabulary). A word is then a run of "▁" with the characters that
    follow it, or one such lone character.
    """

    def __init__(self, hf: HFTokenizer, spec: dict, always_prepend: bool, prepend_unless_there: bool) -> None:
        super().__init__(hf, spec)
        self.always_prepend = always_prepend  # Prepend normalizer: "▁" in front of any non-empty text
        self.prepend_unless_there = prepend_unless_there  # Metaspace: in front unless the text starts so
        model = spec["model"]
        vocab = model["vocab"]
        # Cut only where merges act on characters: an unknown character next to another becomes one <unk>
        # with fuse_unk, and a merge of byte-fallback tokens joins characters no vocabulary string shows.
        all_bytes = _every_byte_encodable(model)
        merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges", [])]
        byte_merges = any(BYTE_TOKEN.fullmatch(a) or BYTE_TOKEN.fullmatch(b) for a, b in merges)
        if (model.get("fuse_unk") and not all_bytes) or byte_merges:
            self.words = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
        else:
            in_longer = _chars_in_longer_tokens(vocab) - {SPACE}
            joined = "".join(map(re.escape, sorted(in_longer)))
            self.words = re.compile(f"{SPACE}*[{joined}]+|{SPACE}+|[^{joined}{SPACE}]")

    @staticmethod
    def layout(spec: dict) -> tuple[bool, bool] | None:
        """(always_prepend, prepend_unless_there) for a supported file, else None."""
        norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer"), spec["model"]
        # Options that act on the whole BPE input; with words cut out they would act on each word.
        if (
            model.get("ignore_merges")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
        ):
            return None
        legacy = [{"type": "Prepend", "prepend": SPACE}, {"type": "Replace", "content": SPACE}]
        if norm is not None and pre is None and norm.get("type") == "Sequence":
            steps = norm.get("normalizers", [])
            got = [{k: s.get(k) for k in want} for s, want in zip(steps, legacy, strict=False)]
            replaces_space = len(steps) == 2 and steps[1].get("pattern") == {"String": " "}
            return (True, False) if got == legacy and replaces_space else None
        if norm is None and pre is not None and pre.get("type") == "Metaspace":
            scheme = pre.get("prepend_scheme", "always")
            if (
                pre.get("replacement") == SPACE
                and pre.get("split") is False
                and scheme in ("always", "first")
            ):
                return (False, True)
        return None

    @staticmethod
    def no_token_spans_a_word_start(spec: dict) -> bool:
        """True when no vocabulary token (nor merge) has "▁" after another character."""
        model = spec["model"]
        spans = re.compile(f"[^{SPACE}]{SPACE}")
        merges = model.get("merges", [])
        joined = ("".join(m) if isinstance(m, list) else m.replace(" ", "", 1) for m in merges)
        return SPACE in model.get("vocab", {}) and not any(
            spans.search(t) for t in chain(model.get("vocab", {}), joined)
        )

    @staticmethod
    def unknowns_kept(spec: dict) -> bool:
        """With no <unk> token, `tokenizers` drops a character it cannot encode, and its neighbours (a "▁"
        and the "▁" after it, say) become adjacent and may merge: no cut is safe then. Byte fallback with
        all 256 byte tokens encodes every character."""
        model = spec["model"]
        return _every_byte_encodable(model) or model.get("unk_token") is not None

    def _plan(self, text: str, slow: list[str]) -> list:
        if not text:
            return []
        text = text.replace(" ", SPACE)
        if self.always_prepend or (self.prepend_unless_there and not text.startswith(SPACE)):
            text = SPACE + text
        return self.words.findall(text)


def fast_encoder(hf: HFTokenizer) -> WordCacheEncoder | None:
    """The exact fast encoder for `hf`, or None when it is not a kind this module reproduces."""
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        return None
    if model.get("type") != "BPE" or model.get("dropout"):
        return None
    if ByteLevelEncoder.supports(spec):
        return ByteLevelEncoder(hf, spec)
    layout = MetaspaceEncoder.layout(spec)
    if (
        layout is not None
        and MetaspaceEncoder.no_token_spans_a_word_start(spec)
        and MetaspaceEncoder.unknowns_kept(spec)
    ):
        return MetaspaceEncoder(hf, spec, *layout)
    return None
