"""Tokenizers: any Hugging Face `tokenizer.json`, or a byte-level BPE trained on the recipe's sources.

Crystal's vocabulary is LLaMA's 32,000 ids (`<unk>`, `<s>`, `</s>` at 0-2) followed by 22 added tokens in a
fixed order (four FIM tokens, fourteen StarCoder metadata tokens, four chat tokens) and 10 unused ids
(crystal-spec §2). A trained tokenizer keeps that layout at a small size. The loader finds the special tokens
by name, accepting the data-prep spelling without pipes (`<fim_prefix>`), so Crystal's own tokenizer works.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from crystal_lm.data.fast_bpe import fast_encoder

BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CRYSTAL_ADDED_TOKENS = (
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|filename|>",
    "<|gh_stars|>",
    "<|issue_start|>",
    "<|issue_comment|>",
    "<|issue_closed|>",
    "<|jupyter_start|>",
    "<|jupyter_text|>",
    "<|jupyter_code|>",
    "<|jupyter_output|>",
    "<|empty_output|>",
    "<|commit_before|>",
    "<|commit_msg|>",
    "<|commit_after|>",
    "<|reponame|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|sys_start|>",
    "<|sys_end|>",
)
UNUSED_IDS = 10  # Crystal pads 32,022 ids to 32,032


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A `tokenizer.json` plus the ids Crystal's pipeline needs. Encoding never adds specials by itself.

    Byte-level and SentencePiece-style BPE tokenizers encode through `fast_bpe` (the same ids, several
    times faster); `fast=False` keeps every call in `tokenizers`.
    """

    def __init__(self, path: str | Path, fast: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.hf = HFTokenizer.from_str(raw.decode())
        except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({exc})") from None
        self.bos_id = self._id("<s>")
        self.eos_id = self._id("</s>")
        # Only FIM needs these (a stage's fim, a source's document_fim, infilling): a recipe without FIM
        # may use a tokenizer that lacks them, and is told so only if it asks for FIM.
        self._fim_ids = {
            part: self._find(f"<|fim_{part}|>", f"<fim_{part}>")
            for part in ("prefix", "middle", "suffix", "pad")
        }
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.fast = fast_encoder(self.hf) if fast else None

    def _find(self, *names: str) -> int | None:
        return next((tid for tid in map(self.hf.token_to_id, names) if tid is not None), None)

    def _id(self, *names: str, needed_by: str = "Crystal's pipeline") -> int:
        tid = self._find(*names)
        if tid is None:
            raise TokenizerError(
                f"{self.path}: has no {' or '.join(names)} token; {needed_by} needs it (add it as a special token)"
            )
        return tid

    def _fim_id(self, part: str) -> int:
        if self._fim_ids[part] is None:
            self._id(
                f"<|fim_{part}|>", f"<fim_{part}>", needed_by="FIM (a stage's fim, document_fim, infilling)"
            )
        return self._fim_ids[part]

    @property
    def has_fim(self) -> bool:
        """Whether all four FIM tokens are there."""
        return all(tid is not None for tid in self._fim_ids.values())

    def require_fim(self) -> None:
        """Raise, naming the token, unless all four FIM tokens are there."""
        for part in self._fim_ids:
            self._fim_id(part)

    @property
    def fim_prefix_id(self) -> int:
        return self._fim_id("prefix")

    @property
    def fim_middle_id(self) -> int:
        return self._fim_id("middle")

    @property
    def fim_suffix_id(self) -> int:
        return self._fim_id("suffix")

    @property
    def fim_pad_id(self) -> int:
        return self._fim_id("pad")

    @property
    def max_id(self) -> int:
        return max(self.hf.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.fast is not None:
            return self.fast.encode_batch(texts)
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a byte-level BPE with Crystal's id layout and save it as `tokenizer.json` (atomically)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    hf.add_special_tokens(list(CRYSTAL_ADDED_TOKENS))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(f".tmp{os.getpid()}")
    hf.save(str(tmp))
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def padded_vocab_size(tokenizer: Tokenizer) -> int:
    """Model vocabulary for a tokenizer: its ids plus Crystal's 10 unused, rounded up to a multiple of 32."""
    n = tokenizer.max_id + 1 + UNUSED_IDS
    return (n + 31) // 32 * 32
