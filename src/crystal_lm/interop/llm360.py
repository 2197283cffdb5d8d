"""LLM360's Hugging Face layout for Crystal (crystal-spec §1.4): read it into our checkpoints and write ours out.

Our parameter names and [in, out] layouts are already LLM360's, so conversion is about files and config keys:
`config.json` (GPT-2 style keys plus muP multipliers), weights as `pytorch_model*.bin` or `*.safetensors`
(single or sharded with an index), fp32 / bf16 / fp16, the tied `lm_head.weight` stored or not, and the
non-persistent causal-mask buffers of the old fp32 shards. Every problem names the file, key or tensor, and
nothing is written half-way: outputs are built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.model import build_model
from crystal_lm.text import first_few
from crystal_lm.train.checkpoint import TrainState, load_tensors, save_checkpoint

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in LLM360's fp32 shards
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InteropError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- config


def to_hf_config(model: ModelConfig, mup: MupConfig, dtype: torch.dtype, tokenizer: Tokenizer | None) -> dict:
    cfg: dict[str, Any] = {
        "model_type": "crystalcoder",
        "architectures": ["CrystalCoderLMHeadModel"],
        "vocab_size": model.vocab_size,
        "n_positions": model.max_seq_len,
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": model.ffn_dim,
        "activation_function": "swiglu",
        "layer_norm_epsilon": model.layer_norm_eps,
        "position_embedding_type": "rotary",
        "rotary_dim": model.rotary_dim,
        "rope_theta": model.rope_theta,
        "scale_attn_weights": True,
        "mup_scale_qk_dot_by_d": model.qk_scale == "d_head",
        "mup_embeddings_scale": mup.embeddings_scale,
        "mup_output_alpha": mup.output_alpha,
        "mup_width_scale": mup.base_width / model.d_model,
        "tie_word_embeddings": model.tie_embeddings,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "use_cache": True,
        "bos_token_id": tokenizer.bos_id if tokenizer else 1,
        "eos_token_id": tokenizer.eos_id if tokenizer else 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return cfg


# What an absent config.json key means, for our importer and for the transformers class alike
# (hf_model.CrystalCoderConfig takes its defaults from here). LLM360's own config.json holds every one of
# these (crystal-spec §1.4); for a file without them we follow the remote code's config class, whose lineage
# (GPT-2, then Cerebras' BTLM with the same mup_* keys) defaults to standard parametrisation: no muP
# multipliers and 1/sqrt(d_head) attention. rotary_dim None means a quarter of the head (Crystal's 32 of 128).
HF_DEFAULTS: dict[str, Any] = {
    "n_positions": 2048,
    "rotary_dim": None,
    "rope_theta": 10000.0,  # LLM360's code hard-codes 10000
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "mup_scale_qk_dot_by_d": False,
    "mup_embeddings_scale": 1.0,
    "mup_output_alpha": 1.0,
    "mup_width_scale": 1.0,
}
# Keys of the GPT-2 family that would change the function if set otherwise; we refuse rather than ignore.
UNSUPPORTED_VALUES = {
    "activation_function": "swiglu",
    "position_embedding_type": "rotary",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InteropError(f"{path}: not valid JSON ({exc})") from None


def _get(cfg: dict, key: str, kind: type, where: str, required: bool = False) -> Any:
    """`cfg[key]` as `kind` (its default when absent or null), or an error naming the key and the value."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise InteropError(f"{where}: missing key {key!r}")
        return HF_DEFAULTS.get(key)
    # bool is an int to Python, and int("40") would accept a string: take the JSON types only.
    ok = (
        isinstance(value, bool)
        if kind is bool
        else (isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
    )
    if not ok:
        raise InteropError(
            f"{where}: {key} must be {'a number' if kind is float else kind.__name__}, got {value!r}"
        )
    return kind(value)


def from_hf_config(cfg: dict, where: str = "config.json") -> tuple[ModelConfig, MupConfig]:
    """Our model and muP configs from an LLM360 `config.json` (any size)."""
    if not isinstance(cfg, dict):
        raise InteropError(f"{where}: not a JSON object")
    if cfg.get("model_type") not in ("crystalcoder", None):
        raise InteropError(f"{where}: model_type {cfg.get('model_type')!r} is not 'crystalcoder'")
    for key, want in UNSUPPORTED_VALUES.items():
        if cfg.get(key, want) != want:
            raise InteropError(f"{where}: {key} {cfg[key]!r} is not supported (Crystal uses {want!r})")
    d, heads = _get(cfg, "n_embd", int, where, True), _get(cfg, "n_head", int, where, True)
    if d <= 0 or heads <= 0 or d % heads:
        raise InteropError(f"{where}: n_head {heads} must divide n_embd {d}")
    head_dim = d // heads
    rotary_dim = _get(cfg, "rotary_dim", int, where)
    rotary_dim = head_dim // 4 if rotary_dim is None else rotary_dim
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise InteropError(
            f"{where}: rotary_dim {rotary_dim} must be even and at most the head dim n_embd / n_head = {head_dim}"
        )
    width_scale = _get(cfg, "mup_width_scale", float, where)
    n_inner = _get(cfg, "n_inner", int, where)
    model = ModelConfig(
        vocab_size=_get(cfg, "vocab_size", int, where, True),
        d_model=d,
        n_layers=_get(cfg, "n_layer", int, where, True),
        n_heads=heads,
        max_seq_len=_get(cfg, "n_positions", int, where),
        d_ff=n_inner or None,
        rotary_pct=rotary_dim / head_dim,  # ModelConfig.rotary_dim gives rotary_dim back exactly
        rope_theta=_get(cfg, "rope_theta", float, where),
        layer_norm_eps=_get(cfg, "layer_norm_epsilon", float, where),
        tie_embeddings=_get(cfg, "tie_word_embeddings", bool, where),
        qk_scale="d_head" if _get(cfg, "mup_scale_qk_dot_by_d", bool, where) else "sqrt_d_head",
    )
    if model.rotary_dim != rotary_dim:  # a guard on the round trip through rotary_pct
        raise InteropError(f"{where}: rotary_dim {rotary_dim} does not survive as a fraction of {head_dim}")
    mup = MupConfig(
        base_width=round(d * width_scale),
        embeddings_scale=_get(cfg, "mup_embeddings_scale", float, where),
        output_alpha=_get(cfg, "mup_output_alpha", float, where),
    )
    if abs(mup.base_width / d - width_scale) > 1e-9:
        raise InteropError(f"{where}: mup_width_scale {width_scale} × n_embd {d} is not a whole base width")
    return model, mup


# ------------------------------------------------------------------------------------------ tensors


def _weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InteropError(
                    f"{index}: not a weight index (expected an object whose weight_map maps tensor names "
                    "to file names)"
                )
            files = sorted({hf_dir / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise InteropError(f"{f}: shard listed in {index_name} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise InteropError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or shard index")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise InteropError(f"{path}: unreadable or truncated weight file ({exc})") from None
    # A .bin may hold any picklable value; a state dict maps names to tensors.
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InteropError(f"{path}: holds a {type(tensors).__name__}, not a dict of tensor names to tensors")
    return tensors


def read_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelConfig, MupConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an LLM360-layout folder, checked against the shapes the config implies."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise InteropError(f"{hf_dir}: no config.json")
    model_cfg, mup = from_hf_config(read_json(config_path), str(config_path))
    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(hf_dir):
        for name, t in _read_file(f).items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if t.dtype not in SUPPORTED_DTYPES:
                raise InteropError(f"{f}: tensor {name} has dtype {t.dtype}; supported: fp32, bf16, fp16")
            tensors[name] = t
    expected = {k: tuple(v.shape) for k, v in build_model(model_cfg, mup, device="meta").state_dict().items()}
    if model_cfg.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not torch.equal(head, tensors.get("transformer.wte.weight", head)):
            raise InteropError(
                f"{hf_dir}: lm_head.weight differs from transformer.wte.weight, but the config "
                "says tie_word_embeddings"
            )
    for name, t in tensors.items():
        if name not in expected:
            raise InteropError(f"{hf_dir}: unknown tensor {name!r} for a Crystal model")
        if tuple(t.shape) != expected[name]:
            raise InteropError(
                f"{hf_dir}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                f"{expected[name]} (check n_embd, n_inner, n_layer, vocab_size)"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InteropError(f"{hf_dir}: missing tensors {missing[:4]}{' …' if len(missing) > 4 else ''}")
    return model_cfg, mup, tensors


# -------------------------------------------------------------------------------------- import/export


def _checkpoint_config(model: ModelConfig, mup: MupConfig, source: str) -> dict:
    return {
        "format": "crystal-lm",
        "recipe": source,
        "model": asdict(model),
        "mup": asdict(mup),
        "seq_len": model.max_seq_len,
    }


# LLM360's branch names (crystal-spec §4): `CrystalCoder_phase{N}_checkpoint_{step:06d}`, the step counted from
# 0 in each phase; a crystal-lm release names its branches the same way (`<recipe>_phase{N}_...`).
BRANCH_RE = re.compile(r"^(?:(?P<model>.+)_)?phase(?P<phase>\d+)_checkpoint_(?P<step>\d+)$")
# Crystal's own run (crystal-spec §4): every stage 2112 × 2048 tokens a step; stage 2 started from stage 1's
# last step (79,721), stage 3 from stage 2's (214,387). Tokens seen at (phase, step) follow from these alone.
CRYSTAL_TOKENS_PER_STEP = 2112 * 2048
CRYSTAL_STAGE_STEPS = (79_721, 214_387, 27_728)
CRYSTAL_7B_SHAPE = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32_032}


def crystal_position(phase: int, step: int) -> tuple[int, int] | None:
    """(global step, tokens seen) of Crystal's own checkpoint at `step` of `phase`, or None outside its run."""
    if not 1 <= phase <= len(CRYSTAL_STAGE_STEPS) or step > CRYSTAL_STAGE_STEPS[phase - 1]:
        return None
    global_step = sum(CRYSTAL_STAGE_STEPS[: phase - 1]) + step
    return global_step, global_step * CRYSTAL_TOKENS_PER_STEP


def import_position(
    hf_dir: Path,
    model_cfg: ModelConfig,
    phase: int | None = None,
    step: int | None = None,
    tokens: int | None = None,
) -> tuple[TrainState, dict]:
    """Where in its training an imported checkpoint stands, and where that came from (for the record).

    In order: the values given; a crystal-lm release's `crystal_state/state.json` (exact); LLM360's branch
    name (phase and step). Tokens seen only when given, recorded, or derivable: a `CrystalCoder_` branch of
    Crystal's 7B shape is a checkpoint of Crystal's run, whose batch and stage lengths the spec gives.
    Unknown values are None in the record (the state holds 0)."""
    name = hf_dir.resolve().name
    state_path = hf_dir / "crystal_state" / "state.json"
    if phase is None and step is None and state_path.is_file():
        state = TrainState(**read_json(state_path))
        if tokens is not None:
            state.tokens_seen = tokens
        record = {
            "phase": state.stage_index + 1,
            "step": state.step,
            "tokens": state.tokens_seen,
            "from": "from crystal_state/state.json" + ("; --tokens given" if tokens is not None else ""),
        }
        # The release's recipe (its top folder, or two up from checkpoints/NAME): what the position is in.
        for release_recipe in (hf_dir / "recipe.json", hf_dir.parent.parent / "recipe.json"):
            if release_recipe.is_file():
                record["recipe"] = read_json(release_recipe).get("recipe")
                break
        return state, record
    given = [f"--{k}" for k, v in (("phase", phase), ("step", step), ("tokens", tokens)) if v is not None]
    sources = [f"{', '.join(given)} given"] if given else []
    m = BRANCH_RE.match(name)
    if m:
        named = [k for k, v in (("phase", phase), ("step", step)) if v is None]
        phase = int(m["phase"]) if phase is None else phase
        step = int(m["step"]) if step is None else step
        if named:
            sources.append(f"{' and '.join(named)} from the folder name {name}")
    if (phase is None) != (step is None):
        raise InteropError(f"{hf_dir}: give --phase and --step together (the folder name gives neither)")
    if phase is not None and (phase < 1 or step < 0):
        raise InteropError(f"phase {phase}, step {step}: phases count from 1, steps from 0")
    global_step = step if phase == 1 else None
    shape = {k: getattr(model_cfg, k) for k in CRYSTAL_7B_SHAPE}
    crystal = m is not None and m["model"] == "CrystalCoder" and shape == CRYSTAL_7B_SHAPE
    derived = crystal_position(phase, step) if crystal and phase is not None else None
    if derived is not None:
        global_step = derived[0]
        if tokens is None:
            tokens = derived[1]
            sources.append(
                "tokens from Crystal's 2112 × 2048-token steps and stage lengths (crystal-spec §4)"
            )
    state = TrainState(
        stage_index=(phase or 1) - 1, step=step or 0, global_step=global_step or 0, tokens_seen=tokens or 0
    )
    record = {"phase": phase, "step": step, "tokens": tokens, "from": "; ".join(sources) or None}
    return state, record


def looks_like_hf_folder(folder: Path) -> bool:
    """Whether a folder holds an LLM360-layout model: a config.json that is not a crystal-lm checkpoint's."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") != "crystal-lm" and "n_embd" in cfg


def check_import_source(hf_dir: Path) -> None:
    """Say what `hf_dir` is when it is not an LLM360-layout folder (rather than a missing key or file)."""
    if not hf_dir.exists():
        raise InteropError(f"{hf_dir}: does not exist")
    if hf_dir.is_file():
        raise InteropError(
            f"{hf_dir}: a file; pass the folder that holds config.json and the weights ({hf_dir.parent})"
        )
    config = hf_dir / "config.json"
    if config.is_file():
        cfg = read_json(config)
        if isinstance(cfg, dict) and cfg.get("format") == "crystal-lm":
            raise InteropError(
                f"{hf_dir}: already a crystal-lm checkpoint; use it as it is (generate, eval, train "
                "--init-from), or `crystal export` it to LLM360's layout"
            )
        return
    if (hf_dir / "checkpoints").is_dir() or (hf_dir / "recipe.json").is_file():
        raise InteropError(
            f"{hf_dir}: a crystal-lm run folder; its checkpoints (under checkpoints/) are used as they are"
        )
    inside = sorted(p.name for p in hf_dir.iterdir() if p.is_dir() and looks_like_hf_folder(p))
    if inside:
        shown = first_few(inside, 8)
        raise InteropError(
            f"{hf_dir}: no config.json here, but it holds {len(inside)} LLM360-layout checkpoint folder(s): "
            f"{shown}; import each one, e.g. `crystal import {hf_dir / inside[0]} --out OUT`"
        )
    raise InteropError(f"{hf_dir}: no config.json (not an LLM360 / Hugging Face model folder)")


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    *,
    phase: int | None = None,
    step: int | None = None,
    tokens: int | None = None,
    tokenizer: str | Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> Path:
    """An LLM360-layout folder → a crystal-lm checkpoint folder (tensors bit-exact, dtype kept), placed in
    its training (phase, step, tokens: `import_position`). `tokenizer` replaces or supplies the folder's
    tokenizer.json; `log` receives what was inferred and warnings."""
    hf_dir = Path(hf_dir)
    check_import_source(hf_dir)
    _check_target(Path(out_dir), overwrite, (hf_dir,))
    model_cfg, mup, tensors = read_hf_checkpoint(hf_dir)
    tok_path = Path(tokenizer) if tokenizer is not None else hf_dir / "tokenizer.json"
    if tokenizer is not None and not tok_path.is_file():
        raise InteropError(f"--tokenizer {tok_path}: no such file")
    tok = Tokenizer(tok_path) if tok_path.is_file() else None
    if tok is not None and tok.max_id >= model_cfg.vocab_size:
        raise InteropError(
            f"{hf_dir}: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's largest "
            f"id {tok.max_id} ({tok_path})"
        )
    if tok is None:
        log(
            f"warning: {hf_dir} has no tokenizer.json, so neither has the checkpoint: generate, infill, eval "
            "and export will need one; import again with --tokenizer PATH (the model's tokenizer.json)"
        )
    state, position = import_position(hf_dir, model_cfg, phase, step, tokens)
    if position["phase"] is None:
        log("position in training unknown (give --phase N --step S [--tokens T]); recorded as unknown")
    else:
        known = f"phase {position['phase']}, step {position['step']:,}" + (
            f", {position['tokens']:,} tokens" if position["tokens"] is not None else ", tokens unknown"
        )
        log(f"position: {known} ({position['from']})")
    config = _checkpoint_config(model_cfg, mup, f"import:{hf_dir.resolve().name}")
    config["imported"] = {"source": str(hf_dir.resolve()), **position}
    return save_checkpoint(Path(out_dir), tensors, None, state, config, tok_path if tok else None)


def refuse_source_as_target(
    out_dir: Path, sources: list[Path], what: str = "the source", inside_ok: bool = False
) -> None:
    """--out must not be a source folder, hold one, or (unless `inside_ok`) lie inside one, symlinks resolved:
    writing there would replace (with --overwrite: delete) what is being read."""
    out = Path(out_dir).resolve()
    for src in sources:
        src = Path(src).resolve()
        if out == src:
            where = "is"
        elif out in src.parents:
            where = "contains"
        elif src in out.parents and not inside_ok:
            where = "lies inside"
        else:
            continue
        raise InteropError(
            f"--out {out_dir} {where} {what} {src}; writing there would replace what is being read. "
            "Choose a folder outside it"
        )


def _check_target(out_dir: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    refuse_source_as_target(out_dir, list(sources))
    if out_dir.exists() and not out_dir.is_dir():
        raise InteropError(f"{out_dir}: exists and is a file; --out needs a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InteropError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")


def fold_mup(tensors: dict[str, torch.Tensor], model: ModelConfig, mup: MupConfig):
    """Standard-parametrisation tensors computing the same function (crystal-spec §1.5): untied head with the
    logit multiplier folded in, embeddings ×α_in, and, when attention is muP's q·k/d_head, keys ÷ sqrt(d_head)
    so standard 1/sqrt(d_head) attention gives the same scores."""
    out = dict(tensors)
    wte = tensors["transformer.wte.weight"]
    out["lm_head.weight"] = (wte.double() * (mup.output_alpha * mup.base_width / model.d_model)).to(wte.dtype)
    out["transformer.wte.weight"] = (wte.double() * mup.embeddings_scale).to(wte.dtype)
    d, k_scale = model.d_model, 1.0 / math.sqrt(model.head_dim)
    # Attention already 1/sqrt(d_head) (qk_scale "sqrt_d_head"): the keys stay as they are.
    for i in range(model.n_layers if model.qk_scale == "d_head" else 0):
        for kind in ("weight", "bias"):
            name = f"transformer.h.{i}.attn.c_attn.{kind}"
            t = tensors[name].double().clone()
            t[..., d : 2 * d] *= k_scale
            out[name] = t.to(tensors[name].dtype)
    folded_model = ModelConfig(**{**asdict(model), "tie_embeddings": False, "qk_scale": "sqrt_d_head"})
    folded_mup = MupConfig(
        base_width=model.d_model, init_std=mup.init_std, embeddings_scale=1.0, output_alpha=1.0
    )
    return out, folded_model, folded_mup


def write_remote_code(folder: Path) -> dict[str, str]:
    """The code files an `auto_map` names, written into `folder`; returns that map. Like LLM360's folders,
    but ours only import crystal-lm's classes, so `from_pretrained(folder, trust_remote_code=True)` works in
    a process that never imported crystal_lm."""
    auto_map = {}
    for auto, module, cls in (
        ("AutoConfig", "configuration_crystalcoder", "CrystalCoderConfig"),
        ("AutoModelForCausalLM", "modeling_crystalcoder", "CrystalCoderLMHeadModel"),
    ):
        (folder / f"{module}.py").write_text(
            f'"""Needs `pip install crystal-lm`."""\n\n'
            f"from crystal_lm.interop.hf_model import {cls}  # noqa: F401\n"
        )
        auto_map[auto] = f"{module}.{cls}"
    return auto_map


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def export_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    fold: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """A crystal-lm checkpoint → LLM360's Hugging Face layout (config, safetensors shards, tokenizer files)."""
    from crystal_lm.eval.generate import checkpoint_configs, resolve_checkpoint

    out_dir = Path(out_dir)
    ckpt = resolve_checkpoint(checkpoint_dir)  # a run folder means its newest checkpoint, as in generate
    # Only the checkpoint is read: RUN/hf is a fine place for a run's export, RUN itself is not.
    refuse_source_as_target(out_dir, [Path(checkpoint_dir)], inside_ok=True)
    _check_target(out_dir, overwrite, (ckpt,))
    model_cfg, mup = checkpoint_configs(ckpt)
    tensors = load_tensors(ckpt)
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise InteropError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        tensors = {k: v.to(DTYPE_NAMES[dtype]) for k, v in tensors.items()}
    if fold:
        if not model_cfg.tie_embeddings:
            raise InteropError(f"{ckpt}: already in standard parametrisation")
        tensors, model_cfg, mup = fold_mup(tensors, model_cfg, mup)
    for name, t in tensors.items():  # a cast (or fold) past float16's ±65504 gives inf, silently
        if not bool(torch.isfinite(t).all()):
            raise InteropError(
                f"{ckpt}: tensor {name} has values that are not finite in {t.dtype} (float16 reaches "
                f"±65504); export as bfloat16 or float32"
            )
    tok_path = ckpt / "tokenizer.json"
    tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
    first_dtype = next(iter(tensors.values())).dtype
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _shards(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    hf_config = to_hf_config(model_cfg, mup, first_dtype, tokenizer)
    hf_config["auto_map"] = write_remote_code(tmp)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    gen = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        # As LLM360's: no BOS added by the tokenizer (training documents did start with <s>).
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_cfg.max_seq_len,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
