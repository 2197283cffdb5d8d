"""Using a checkpoint: load it alone, sample text with a KV cache, fill in the middle through the FIM tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.model import CrystalModel, build_model
from crystal_lm.train.checkpoint import CheckpointError, load_model_weights, verify_checkpoint


def load_checkpoint(directory: str | Path) -> tuple[CrystalModel, Tokenizer]:
    """A checkpoint folder (or a run folder: its newest checkpoint) → model in eval mode + tokenizer."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        from crystal_lm.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(directory / "checkpoints")
        if found is None:
            raise CheckpointError(f"{directory}: no complete checkpoint under checkpoints/")
        directory = found
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint folder (no config.json)")
    verify_checkpoint(directory)
    config = json.loads((directory / "config.json").read_text())
    model = build_model(ModelConfig(**config["model"]), MupConfig(**config["mup"]), init=False)
    load_model_weights(directory, model)
    model.eval()
    return model, Tokenizer(directory / "tokenizer.json")


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int = 0


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate_ids(model: CrystalModel, prompt: list[int], sampling: Sampling, stop_ids: set[int]) -> list[int]:
    """Sample continuation ids after `prompt` (KV cache; stops at a stop id or the context length)."""
    gen = torch.Generator().manual_seed(sampling.seed)
    limit = model.cfg.max_seq_len
    prompt = prompt[-(limit - 1) :]
    logits, cache = model(torch.tensor([prompt]))
    out: list[int] = []
    for _ in range(min(sampling.max_new_tokens, limit - len(prompt))):
        nxt = _pick(logits[0, -1], sampling, gen)
        if nxt in stop_ids:
            break
        out.append(nxt)
        logits, cache = model(torch.tensor([[nxt]]), cache)
    return out


def generate(model: CrystalModel, tok: Tokenizer, prompt: str, sampling: Sampling) -> str:
    ids = generate_ids(model, [tok.bos_id, *tok.encode(prompt)], sampling, {tok.eos_id})
    return tok.decode(ids, skip_special_tokens=True)


def infill(
    model: CrystalModel, tok: Tokenizer, prefix: str, suffix: str, sampling: Sampling, mode: str = "psm"
) -> str:
    """The middle between `prefix` and `suffix`, prompted as in training (crystal-spec §7 item 9)."""
    pre, suf = [tok.bos_id, *tok.encode(prefix)], tok.encode(suffix)
    if mode == "psm":
        prompt = [tok.fim_prefix_id, *pre, tok.fim_suffix_id, *suf, tok.fim_middle_id]
    elif mode == "spm":
        prompt = [tok.fim_prefix_id, tok.fim_suffix_id, *suf, tok.fim_middle_id, *pre]
    else:
        raise ValueError(f"FIM mode must be 'psm' or 'spm', got {mode!r}")
    stops = {tok.eos_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id, tok.fim_pad_id}
    return tok.decode(generate_ids(model, prompt, sampling, stops), skip_special_tokens=True)
