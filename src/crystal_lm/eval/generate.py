"""Using a checkpoint: load it alone, sample text with a KV cache, fill in the middle through the FIM tokens."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.model import CrystalModel, build_model
from crystal_lm.model.crystal import KVCache
from crystal_lm.train.checkpoint import CheckpointError, load_model_weights, verify_checkpoint

log = logging.getLogger(__name__)


def check_target(t: Path) -> None:
    """A release folder or a Hugging Face (LLM360) model folder is not used directly: say how to import it
    (rather than that it lacks a COMPLETE marker or checkpoints/). Every command that takes a checkpoint asks
    this first (through `resolve_checkpoint`, and `crystal eval` for each target)."""
    t = Path(t)
    if (t / "MANIFEST").is_file():
        raise CheckpointError(
            f"{t}: a release folder (Hugging Face layout), not a crystal-lm checkpoint; run "
            f"`crystal import {t} --out OUT` for its final model (or `crystal import {t}/checkpoints/NAME "
            "--out OUT` for one of its checkpoints) first, then use OUT"
        )
    config = t / "config.json"
    if config.is_file() and not (t / "checkpoints").is_dir():
        try:
            ours = json.loads(config.read_text()).get("format") == "crystal-lm"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ours = True  # not readable as a Hugging Face config either: the checkpoint checks name it
        if not ours:
            raise CheckpointError(
                f"{t}: a Hugging Face model folder (LLM360 layout), not a crystal-lm checkpoint; run "
                f"`crystal import {t} --out OUT` first, then use OUT"
            )


def resolve_checkpoint(directory: str | Path) -> Path:
    """A checkpoint folder, or a run folder's newest complete checkpoint; verified (checksums)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: does not exist (give a checkpoint folder or a run folder)")
    check_target(directory)
    if (directory / "checkpoints").is_dir():
        from crystal_lm.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(directory / "checkpoints")
        if found is None:
            raise CheckpointError(f"{directory}: no complete checkpoint under checkpoints/")
        directory = found
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint folder (no config.json)")
    verify_checkpoint(directory)
    return directory


def checkpoint_configs(directory: Path) -> tuple[ModelConfig, MupConfig]:
    """The model and muP configs a checkpoint's config.json holds."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
        return ModelConfig(**config["model"]), MupConfig(**config["mup"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        # A hand-edited or foreign file: say which and why rather than a bare KeyError / TypeError.
        raise CheckpointError(
            f"{path}: not a crystal-lm checkpoint config ({type(exc).__name__}: {exc})"
        ) from None


def load_model(directory: str | Path) -> CrystalModel:
    """A checkpoint folder (or a run folder: its newest checkpoint) → model in eval mode. Tasks that read a
    recipe's token ids (validation loss, memorization) need no tokenizer of the checkpoint's own."""
    return _model_of(resolve_checkpoint(directory))


def _model_of(directory: Path) -> CrystalModel:
    """The model of a resolved (already verified) checkpoint folder."""
    model = build_model(*checkpoint_configs(directory), init=False)
    load_model_weights(directory, model)
    return model.eval()


def checkpoint_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer a (resolved) checkpoint folder holds, which generation and the benchmarks need."""
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{directory}: no tokenizer.json (imported from a folder without one?); import it again with "
            "`crystal import HF_DIR --out OUT --tokenizer PATH`"
        )
    return Tokenizer(directory / "tokenizer.json")


def load_checkpoint(directory: str | Path) -> tuple[CrystalModel, Tokenizer]:
    """A checkpoint folder (or a run folder: its newest checkpoint) → model in eval mode + tokenizer."""
    directory = resolve_checkpoint(directory)  # verified once (its checksums read the whole model)
    return _model_of(directory), checkpoint_tokenizer(directory)


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50  # 0 or None: off
    top_p: float | None = 0.95
    seed: int = 0
    # Generation stops when the decoded text of a row contains one of these (it is cut before it).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # torch's own errors for these (a negative k in topk, say) name neither the option nor the value.
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be 0 or more, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k: must be a positive number of tokens (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")


def _pick(logits: torch.Tensor, s: Sampling, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row of [B, V] logits: greedy at temperature 0, else top-k / top-p sampling, row i
    drawing from `gens[i]`."""
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
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


@torch.no_grad()
def generate_batch(
    model: CrystalModel,
    prompts: list[list[int]],
    sampling: Sampling,
    stop_ids: set[int],
    pad_id: int = 0,
    finished: Callable[[int, list[int]], bool] | None = None,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """Continuations of several prompts at once. Prompts are left-padded; each row's positions start at 0
    at its first real token and padding is masked out, so a row's result does not depend on its neighbours
    (the original remote code shifted rotary positions by the padding). Sampling keeps that: row i draws
    from its own generator seeded with `seeds[i]` (default: `sampling.seed` for every row, so a prompt gives
    the same text alone or in any batch). Each row gets up to `max_new_tokens`, fewer only where its own
    prompt leaves less room in the context. A row also ends when `finished(row index, its ids so far)` is
    true (e.g. its text reached a stop string). A prompt longer than the context keeps its last
    max_seq_len - 1 tokens (with a warning)."""
    device = model.wte.weight.device
    B = len(prompts)
    seeds = [sampling.seed] * B if seeds is None else seeds
    if len(seeds) != B:
        raise ValueError(f"seeds: {len(seeds)} given for {B} prompts")
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds] if sampling.temperature > 0 else []
    limit = model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) >= limit:
            log.warning("prompt %d: %d tokens, cut to its last %d (context %d)", i, len(p), limit - 1, limit)
    prompts = [p[-(limit - 1) :] for p in prompts]
    # Positions are per row, so the padded width may pass the context; a row never does.
    budgets = [min(sampling.max_new_tokens, limit - len(p)) for p in prompts]
    out: list[list[int]] = [[] for _ in range(B)]
    if max(budgets, default=0) <= 0:
        return out
    P = max(len(p) for p in prompts)
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
    done = [b <= 0 for b in budgets]
    for _ in range(max(budgets)):
        nxt = _pick(logits, sampling, gens)
        picked = nxt.tolist()
        for i in range(B):
            if done[i]:
                continue
            t = picked[i]
            if t in stop_ids:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = len(out[i]) >= budgets[i] or (finished is not None and finished(i, out[i]))
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


def decode_continuation(tok: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds after `prompt`. Decoding `new` alone is wrong with a SentencePiece-style tokenizer
    (LLaMA's, Crystal's): its decoder drops the leading space of the text, here the space of the first new
    word, so "ab" + " cd" would read "abcd". A few prompt tokens are context enough, and keep this cheap when
    it runs at every step (stop strings)."""
    prompt = prompt[-16:]
    head = tok.decode(prompt, skip_special_tokens=True)
    full = tok.decode([*prompt, *new], skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tok.decode(new, skip_special_tokens=True)  # the join rewrote the prompt's end (split bytes)


def _check_room(prompts: list[list[int]], sampling: Sampling, limit: int, strict: bool) -> None:
    """Warn when a prompt leaves less room than max_new_tokens; when it fills the context, `strict` makes
    that an error (generate_batch would keep its last tokens, so a different question is answered)."""
    for i, p in enumerate(prompts):
        room = limit - len(p)
        where = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
        if room <= 0 and strict:
            raise ValueError(
                f"{where} is {len(p)} tokens, the model's context is {limit}: shorten it to leave room "
                "for new tokens"
            )
        if 0 < room < sampling.max_new_tokens:
            log.warning(
                "%s is %d tokens: room for %d new tokens only (context %d)", where, len(p), room, limit
            )


def generate(
    model: CrystalModel,
    tok: Tokenizer,
    prompt: str | list[str],
    sampling: Sampling,
    *,
    strict: bool = False,
) -> str | list[str]:
    """Text continuation(s) of a prompt or a batch of prompts (each starts with BOS, as in training). A row
    stops at EOS, at `max_new_tokens`, or as soon as its text holds a stop string (cut before it). A prompt
    that fills the context is cut to its last tokens, or with `strict` is an error."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    ids_in = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    _check_room(ids_in, sampling, model.cfg.max_seq_len, strict)

    def finished(i: int, new: list[int]) -> bool:
        text = decode_continuation(tok, ids_in[i], new)
        return any(s and s in text for s in sampling.stop)

    ids = generate_batch(
        model,
        ids_in,
        sampling,
        {tok.eos_id},
        pad_id=tok.eos_id,
        finished=finished if sampling.stop else None,
    )
    texts = [
        cut_at_stop(decode_continuation(tok, p, row), sampling.stop)
        for p, row in zip(ids_in, ids, strict=True)
    ]
    return texts[0] if isinstance(prompt, str) else texts


def infill(
    model: CrystalModel,
    tok: Tokenizer,
    prefix: str,
    suffix: str,
    sampling: Sampling,
    mode: str = "psm",
    *,
    strict: bool = False,
) -> str:
    """The middle between `prefix` and `suffix`, prompted as in training (crystal-spec §7 item 9).

    The middle is decoded on its own, unlike a continuation: training encoded it as a separate piece
    (data/fim.py), so with a SentencePiece-style tokenizer it starts with the dummy "▁" that the decoder drops.
    """
    prompt = fim_prompt(tok, prefix, suffix, mode)
    _check_room([prompt], sampling, model.cfg.max_seq_len, strict)

    def finished(_: int, new: list[int]) -> bool:
        text = tok.decode(new, skip_special_tokens=True)
        return any(s and s in text for s in sampling.stop)

    ids = generate_batch(
        model, [prompt], sampling, fim_stop_ids(tok), finished=finished if sampling.stop else None
    )[0]
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
