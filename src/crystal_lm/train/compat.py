"""Does a checkpoint fit a recipe? One check for `crystal train --init-from` and for `crystal eval`'s data tasks
(`val_loss`, `memorization`), which read the recipe's data through the checkpoint."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from crystal_lm.config import ModelConfig, MupConfig, Recipe
from crystal_lm.files import sha256_file

log = logging.getLogger(__name__)


def _effective(cfg: ModelConfig | MupConfig) -> dict:
    d = asdict(cfg)
    return d | {"d_ff": cfg.ffn_dim} if isinstance(cfg, ModelConfig) else d


def recipe_mismatch(
    source: Path,
    model_cfg: ModelConfig,
    mup: MupConfig,
    recipe: Recipe,
    tokenizer_sha256: str,
    *,
    whole_architecture: bool,
    tokenizer_size: int | None = None,
) -> str | None:
    """What keeps the checkpoint at `source` (its configs given) from meeting `recipe`, in words, or None.

    The tokenizer (`source/tokenizer.json`) must be the recipe's data tokenizer (sha256 `tokenizer_sha256`):
    otherwise token ids mean other things. With `whole_architecture` (training from it) every model and muP
    key must be the recipe's; without (evaluating it on the recipe's data) the model must read the recipe's
    windows: `max_seq_len` at least `data.seq_len`, and a vocabulary covering the tokenizer's
    `tokenizer_size` ids. A checkpoint without a tokenizer cannot be checked: a warning says so."""
    problems = []
    if whole_architecture:
        pairs = (("model", recipe.model, model_cfg), ("mup", recipe.mup, mup))
        for name, ours, theirs in ((n, _effective(a), _effective(b)) for n, a, b in pairs):
            diff = sorted(k for k in ours if k in theirs and ours[k] != theirs[k])
            if diff:
                problems.append(
                    f"{name}.{diff[0]} is {theirs[diff[0]]!r} there but {ours[diff[0]]!r} in the recipe "
                    f"({', '.join(diff)} differ); use the checkpoint's architecture"
                )
    else:
        if model_cfg.max_seq_len < recipe.data.seq_len:
            problems.append(
                f"model.max_seq_len is {model_cfg.max_seq_len} there but the recipe's windows are "
                f"data.seq_len {recipe.data.seq_len} tokens"
            )
        if tokenizer_size is not None and model_cfg.vocab_size < tokenizer_size:
            problems.append(
                f"model.vocab_size is {model_cfg.vocab_size} there, fewer than the recipe's tokenizer's "
                f"{tokenizer_size} ids (recipe model.vocab_size {recipe.model.vocab_size})"
            )
    tok = Path(source) / "tokenizer.json"
    if tok.is_file():
        sha = sha256_file(tok)
        if sha != tokenizer_sha256:
            problems.append(
                f"its tokenizer ({sha[:16]}…) is not this recipe's data tokenizer ({tokenizer_sha256[:16]}…); "
                "token ids would not mean the same thing"
            )
    else:
        log.warning(
            "%s: no tokenizer.json, so nothing shows that its token ids are those of the recipe's tokenizer "
            "(%s…); make sure it was trained with that tokenizer",
            source,
            tokenizer_sha256[:16],
        )
    return "; ".join(problems) or None


def weights_sha256(source: Path) -> dict[str, str]:
    """sha256 of each weight file of a checkpoint: `model.safetensors` of a crystal-lm checkpoint (from its
    checksums.json, verified on load), or the safetensors / .bin shards of a Hugging Face folder."""
    import json

    source = Path(source)
    sums = source / "checksums.json"
    if sums.is_file():
        recorded = json.loads(sums.read_text())
        return {k: v for k, v in recorded.items() if k == "model.safetensors"}
    from crystal_lm.interop.llm360 import _weight_files

    return {f.name: sha256_file(f) for f in _weight_files(source)}
