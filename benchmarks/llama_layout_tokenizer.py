"""A LLaMA-layout 32k `tokenizer.json` for benchmarks: the licence-clean stand-in for Crystal's tokenizer.

Crystal's tokenizer is LLaMA's SentencePiece BPE (32,000 pieces, byte fallback) in `tokenizers`' JSON with
Prepend("▁") + Replace(" ", "▁") normalizers and no pre-tokenizer (crystal-spec §2), plus 22 added tokens.
LLaMA's own file cannot be downloaded here; mistral-common (Apache-2.0, on PyPI) ships a SentencePiece model
of the same layout (`tokenizer.model.v1`: 32,000 pieces, byte fallback, unk/bos/eos 0/1/2). This script takes
that model from the pinned wheel, reads it with transformers' bundled protobuf schema (no sentencepiece),
writes it in Crystal's JSON layout, and adds Crystal's tokens. Merges are ordered as SentencePiece ranks
pieces (by id); this file is for measuring speed, not for matching SentencePiece's output token for token.

    .venv/bin/python benchmarks/llama_layout_tokenizer.py   # prints the path of the tokenizer.json
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".cache" / "crystal-lm" / "tokenizers" / "mistral-v1-llama-layout" / "tokenizer.json"
MODEL_MEMBER = "mistral_common/data/tokenizer.model.v1"


def build(out: Path = OUT) -> Path:
    if out.is_file():
        return out
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import import_protobuf

    from crystal_lm.data.corpus import PipArtifact, fetch_artifact
    from crystal_lm.data.tokenizer import CRYSTAL_ADDED_TOKENS

    wheel = PipArtifact(
        "mistral-common",
        "1.13.1",
        "mistral_common-1.13.1-py3-none-any.whl",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
        "Apache-2.0",
        binary=True,
    )
    downloads = Path(os.environ.get("CRYSTAL_DOWNLOADS", REPO / ".cache" / "crystal-lm" / "downloads"))
    with zipfile.ZipFile(fetch_artifact(wheel, downloads)) as z:
        raw = z.read(MODEL_MEMBER)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(raw)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = sorted(
        (vocab[piece], vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
        for piece in vocab
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    )
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for *_, a, b in merges],
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens(list(CRYSTAL_ADDED_TOKENS))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(build())
