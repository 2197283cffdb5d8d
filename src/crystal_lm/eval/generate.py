"""Using a checkpoint: load it alone, sample text with a KV cache, fill in the middle through the FIM tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.model import CrystalModel, build_model
from crystal_lm.model.crystal import KVCache
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
    # Generation stops when the decoded text of a row contains one of these (it is cut before it).
    stop: tuple[str, ...] = ()


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """Next token per row of [B, V] logits: greedy at temperature 0, else top-k / top-p sampling."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_batch(
    model: CrystalModel,
    prompts: list[list[int]],
    sampling: Sampling,
    stop_ids: set[int],
    pad_id: int = 0,
    finished: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Continuations of several prompts at once. Prompts are left-padded; each row's positions start at 0
    at its first real token and padding is masked out, so a row's result does not depend on its neighbours
    (the original remote code shifted rotary positions by the padding). A row also ends when
    `finished(its ids so far)` is true (e.g. its text reached a stop string)."""
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    limit = model.cfg.max_seq_len
    prompts = [p[-(limit - 1) :] for p in prompts]
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    real = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = torch.tensor(p)
        real[i, P - len(p) :] = True
    tokens, real = tokens.to(device), real.to(device)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # Padded query rows see only themselves (a row with no visible key would be NaN).
    mask = (causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
    padded = not bool(real.all())
    cache = KVCache()
    logits = model(tokens, cache, positions=positions, mask=mask[:, None] if padded else None)[:, -1]
    next_pos = positions[:, -1] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(min(sampling.max_new_tokens, limit - P)):
        nxt = _pick(logits, sampling, gen)
        picked = nxt.tolist()
        for i in range(B):
            if done[i]:
                continue
            t = picked[i]
            if t in stop_ids:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = finished is not None and finished(out[i])
        if all(done):
            break
        real = torch.cat((real, torch.ones(B, 1, dtype=torch.bool, device=device)), dim=1)
        step_mask = real[:, None, None, :] if padded else None
        logits = model(nxt[:, None], cache, positions=next_pos[:, None], mask=step_mask)[:, -1]
        next_pos = next_pos + 1
    return out


def generate_ids(model: CrystalModel, prompt: list[int], sampling: Sampling, stop_ids: set[int]) -> list[int]:
    """Sample continuation ids after `prompt` (KV cache; stops at a stop id or the context length)."""
    return generate_batch(model, [prompt], sampling, stop_ids)[0]


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


def generate(
    model: CrystalModel, tok: Tokenizer, prompt: str | list[str], sampling: Sampling
) -> str | list[str]:
    """Text continuation(s) of a prompt or a batch of prompts (each starts with BOS, as in training)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    ids = generate_batch(
        model, [[tok.bos_id, *tok.encode(p)] for p in prompts], sampling, {tok.eos_id}, pad_id=tok.eos_id
    )
    texts = [cut_at_stop(tok.decode(row, skip_special_tokens=True), sampling.stop) for row in ids]
    return texts[0] if isinstance(prompt, str) else texts


def infill(
    model: CrystalModel, tok: Tokenizer, prefix: str, suffix: str, sampling: Sampling, mode: str = "psm"
) -> str:
    """The middle between `prefix` and `suffix`, prompted as in training (crystal-spec §7 item 9)."""
    ids = generate_ids(model, fim_prompt(tok, prefix, suffix, mode), sampling, fim_stop_ids(tok))
    return cut_at_stop(tok.decode(ids, skip_special_tokens=True), sampling.stop)


def fim_prompt(tok: Tokenizer, prefix: str, suffix: str, mode: str = "psm") -> list[int]:
    """The infilling prompt in training's layout: the document's `<s>` starts the prefix; PSM or SPM."""
    pre, suf = [tok.bos_id, *tok.encode(prefix)], tok.encode(suffix)
    if mode == "psm":
        return [tok.fim_prefix_id, *pre, tok.fim_suffix_id, *suf, tok.fim_middle_id]
    if mode == "spm":
        return [tok.fim_prefix_id, tok.fim_suffix_id, *suf, tok.fim_middle_id, *pre]
    raise ValueError(f"FIM mode must be 'psm' or 'spm', got {mode!r}")


def fim_stop_ids(tok: Tokenizer) -> set[int]:
    """A middle ends at EOS or at any FIM token."""
    return {tok.eos_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id, tok.fim_pad_id}
