"""Recipes: YAML files validated into typed configs.

A recipe is data, not code: the model shape, muP constants, data sources and, per stage, the token budget,
mixture weights, FIM rate and LR schedule. Every key is checked; an unknown or mistyped key, a bad value or a
missing file is a `RecipeError` that names the file and the key path (for example
``recipes/tiny.yaml: stages[1].mixture.pyton: unknown source 'pyton' (known: prose, python, ...)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and key."""


# --------------------------------------------------------------------------------------------- data


@dataclass
class TokenizerConfig:
    # Any Hugging Face tokenizer.json (Crystal's own LLaMA-based one, for instance). When absent, a
    # byte-level BPE is trained on the training split of the recipe's sources.
    path: str | None = None
    # Size of the trained BPE before Crystal's 22 added tokens and 10 unused ids (32,000 in Crystal).
    vocab_size: int = 4064
    # Bytes read from each source to train the BPE.
    sample_bytes: int = 2_000_000


@dataclass
class DocumentFimConfig:
    """FIM per document before packing (StarCoder / Megatron style), applied when the shards are built."""

    rate: float = 0.5
    spm_rate: float = 0.5


@dataclass
class SourceConfig:
    # Top-level domain the source belongs to ("text" or "code" in Crystal's recipe); validation loss is
    # reported per source and per domain.
    domain: str
    # A part of the embedded corpus (prose, technical, python, web), built from pip / the Python install.
    embedded: str | None = None
    # Or user data: a file, a glob, or a directory, in one of the formats (guessed from the files if unset):
    # jsonl (.jsonl / .json, plain, .gz or .zst; SlimPajama), parquet (StarCoderData), files (a source
    # tree), hf_disk (a Hugging Face `save_to_disk` dataset).
    path: str | None = None
    format: Literal["jsonl", "parquet", "files", "hf_disk"] | None = None
    # Field or column holding the document (default: `text`; `content` for parquet, as in StarCoderData).
    text_field: str | None = None
    # Keep only records whose (dotted) field has this value or one of these values, e.g.
    # {"meta.redpajama_set_name": "RedPajamaArXiv"} to read one SlimPajama domain from mixed files.
    where: dict[str, Any] | None = None
    # Parquet / files: keep these languages (a `lang` field, else the folder name, e.g. starcoderdata/python;
    # for files, the language of the extension).
    languages: list[str] | None = None
    extensions: list[str] | None = None
    # Malformed records (bad JSON, not UTF-8, missing field) and files the source cannot read (another
    # format, truncated, a dangling link): `fail` names the file (and line) and stops; `skip` counts them
    # per reason in the data manifest and goes on.
    on_error: Literal["fail", "skip"] = "fail"
    # Documents larger than this are skipped and counted (a single huge document never fills memory).
    max_doc_bytes: int = 64 * 2**20
    # A prefix of the source: reading stops at the first document that would take its normalised text past
    # this many UTF-8 bytes, in file order, for shards and tokenizer sampling alike (None = all of it).
    max_bytes: int | None = None
    # Optional FIM per document before packing, instead of Crystal's per-sample FIM after packing (a stage's
    # `fim` must then leave this source out).
    document_fim: DocumentFimConfig | None = None


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig]
    seq_len: int = 2048
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Share of each source's documents held out for validation (chosen by a hash of the document id).
    val_fraction: float = 0.02
    # Validation samples per source used for the per-domain loss at each checkpoint.
    val_max_samples: int = 64
    # Where corpora, tokenizers and shards are cached (relative paths are relative to the working dir).
    cache_dir: str = ".cache/crystal-lm"
    # Byte budget for each embedded corpus part (None = everything the source has).
    embedded_max_bytes: int | None = None
    # Crystal's normalisation: ftfy.fix_text with NFC (`ftfy`), NFC only (`nfc`), or none.
    normalize: Literal["ftfy", "nfc", "none"] = "ftfy"
    # Long documents are tokenized in pieces of about this many characters, cut at a space (Crystal split
    # StarCoder texts into ~2000-character chunks); the ids are concatenated under one <s> … </s>.
    chunk_chars: int | None = 2000
    # Processes that tokenize and pack (None = one per core). Input is split into units (files, or byte
    # ranges of large JSONL files of about `unit_bytes`); each finished unit is kept, so an interrupted
    # build resumes without repeating or losing a document.
    workers: int | None = None
    unit_bytes: int = 256 * 2**20
    # Mixture slots are allocated per block of this many samples (largest-remainder rounding), so a source's
    # share is exact to 1/(2·block) over every whole block; Crystal-scale stages use a large block.
    mixture_block: int = 1024


# -------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int = 2048
    # Crystal: floor(8/3 * d_model) = 10,922 for d_model 4096.
    d_ff: int | None = None
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    # Crystal ties the LM head to the embedding; `crystal export --fold-mup` writes an untied variant. An
    # untied head trains with the tied one's muP init and LR group.
    tie_embeddings: bool = True
    # Attention scores q·kᵀ are divided by d_head under muP, by sqrt(d_head) in standard parametrisation.
    qk_scale: Literal["d_head", "sqrt_d_head"] = "d_head"

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else int(8 * self.d_model / 3)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        # Floor, but a fraction stored from a whole rotary_dim (30 / 88, say) comes back as that number: it
        # lands a rounding error below it (29.999...), which plain int() would cut to 29.
        exact = self.head_dim * self.rotary_pct
        return round(exact) if abs(exact - round(exact)) < 1e-6 else int(exact)


@dataclass
class MupConfig:
    # Width of the proxy model the hyper-parameters were tuned on (Crystal/BTLM: 256).
    base_width: int = 256
    init_std: float = 0.073
    embeddings_scale: float = 14.6
    output_alpha: float = 2.22


# ----------------------------------------------------------------------------------------- training


@dataclass
class OptimizerConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-9
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class LRConfig:
    """Crystal's schedule: linear warmup from 0 to `peak`, then linear decay towards `end` over `decay_steps`.

    `decay_steps` may exceed the stage (Crystal stage 1 stops mid-decay). With `continue_previous` the stage
    re-warms to the LR the previous stage reached and keeps its slope (Crystal stage 2). Values are the base
    LR (embeddings, biases, norms); hidden matrices get base / width multiplier (muP).
    """

    warmup_steps: int = 0
    peak: float | None = None
    end: float | None = None
    decay_steps: int | None = None
    continue_previous: bool = False


@dataclass
class FimConfig:
    rate: float = 0.0
    spm_rate: float = 0.5
    # Sources of these domains are FIM'd (Crystal: StarCoder code only, never SlimPajama)...
    domains: list[str] = field(default_factory=lambda: ["code"])
    # ...or, when given, exactly these sources.
    sources: list[str] | None = None
    # Per-source rates overriding `rate` for those sources (Crystal's stage 3 read stage 2's StarCoder data,
    # FIM'd at 0.9, next to its own FIM-0.3 language subsets).
    rates: dict[str, float] = field(default_factory=dict)

    def rate_for(self, source: str, domain: str) -> float:
        if source in self.rates:
            return self.rates[source]
        chosen = source in self.sources if self.sources is not None else domain in self.domains
        return self.rate if chosen else 0.0

    def applies_to(self, source: str, domain: str) -> bool:
        return self.rate_for(source, domain) > 0


@dataclass
class StageConfig:
    name: str
    tokens: int
    mixture: dict[str, float]
    lr: LRConfig
    fim: FimConfig = field(default_factory=FimConfig)
    checkpoint_every: int = 1000
    # Crystal stage 3: weights only from the previous stage, fresh optimizer state.
    reset_optimizer: bool = False
    # Crystal's `data_subset`: read only this fraction range of a source's samples, e.g. {sp3_c4: [0.0, 0.1]}.
    subsets: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class TrainConfig:
    batch_size: int
    # At most this many sequences per process per micro-step (gradient accumulation; None: a process's whole
    # share). Each process uses the largest micro-batch within it that splits its share evenly.
    micro_batch_size: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    # CPU threads for torch (None = torch's default).
    threads: int | None = None
    log_every: int = 1
    # Under torchrun: replicate (`ddp`) or shard (`fsdp`, FSDP2) the model over the processes.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    activation_checkpointing: bool = False
    # Who prepares the next batches: a forked process (tokenizing and FIM then never hold the GIL the
    # training loop needs) or a thread. `process` falls back to a thread where the platform cannot fork.
    loader: Literal["process", "thread"] = "process"
    # Stability guard: a step whose loss or gradient norm is not finite, or whose loss exceeds
    # `spike_factor` × the mean of the last 20 steps, is skipped (no update) and logged;
    # `max_skipped_in_row` skipped steps in a row stop the run with the reason.
    spike_factor: float | None = None
    max_skipped_in_row: int = 10
    # Checkpoint retention: the newest `keep_last` (None = all), every checkpoint whose global step is a
    # multiple of `keep_every`, and each stage's last checkpoint are kept.
    keep_last: int | None = None
    keep_every: int | None = None
    # Peak dense bf16 TFLOP/s of one device, for the MFU in the logs (None: known GPUs are looked up).
    peak_tflops: float | None = None
    # Besides metrics.jsonl: TensorBoard event files / W&B offline runs, when those packages are installed.
    tensorboard: bool = True
    wandb: bool = True


@dataclass
class Recipe:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    stages: list[StageConfig]
    description: str = ""
    seed: int = 1
    mup: MupConfig = field(default_factory=MupConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Set by `load_recipe`: the file it came from (for error messages and relative paths).
    source_file: str | None = field(default=None, metadata={"internal": True})

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.data.seq_len

    def stage_steps(self, stage: StageConfig) -> int:
        return max(1, stage.tokens // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        return out

    def fingerprint(self) -> str:
        """Hash of everything that changes what a run computes (used to refuse resuming another recipe)."""
        d = self.to_dict()
        d["data"].pop("cache_dir")  # where data is cached does not change what is trained
        blob = json.dumps(d, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """Dotted keys (`stages[0].tokens`) whose value in a recorded recipe dict (a run folder's recipe.json)
        differs from this recipe's, leaving out `RUN_NEUTRAL_KEYS`. The recorded dict is read as a recipe
        first, so a key added since (with its default) is not a difference."""
        with contextlib.suppress(RecipeError):  # a value refused since it was recorded: compare it raw
            recorded = recipe_from_dict(recorded).to_dict()
        ours = json.loads(json.dumps(self.to_dict(), default=list))
        theirs = json.loads(json.dumps(recorded, default=list))
        return [k for k in _diff(theirs, ours, "") if k not in RUN_NEUTRAL_KEYS]

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute() or self.source_file is None:
            return p
        return Path(self.source_file).resolve().parent / p


# Keys that do not change what a run computes: a run folder may be resumed with them changed. (Only for this
# comparison: `Recipe.fingerprint` keeps its value, which checkpoints record.)
RUN_NEUTRAL_KEYS = frozenset(
    {
        "description",
        "data.cache_dir",
        "data.workers",  # the shards are the same; their hashes are checked on resume
        "train.keep_last",
        "train.keep_every",
        "train.log_every",
        "train.tensorboard",
        "train.wandb",
        "train.peak_tflops",  # only the MFU in the logs
        # How each step is computed, not what: a run may resume on another number of processes or GPUs,
        # another layout or with compile switched (results agree to rounding; the data order is the same).
        "train.micro_batch_size",
        "train.parallel",
        "train.threads",
        "train.loader",
        "train.compile",
        "train.activation_checkpointing",
    }
)


def _diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        prefix = f"{where}." if where else ""
        return [k for key in sorted(a.keys() | b.keys()) for k in _diff(a.get(key), b.get(key), prefix + key)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and where == "stages":
        return [k for i, (x, y) in enumerate(zip(a, b, strict=True)) for k in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


# ------------------------------------------------------------------------------------ generic loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(
            errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key (known keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{prefix}{name}: required key is missing")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------ semantic checks


def _validate(recipe: Recipe) -> None:
    d, m = recipe.data, recipe.model
    if not recipe.stages:
        raise RecipeError("stages: at least one stage is required")
    if not d.sources:
        raise RecipeError("data.sources: at least one source is required")
    t = recipe.train
    for key, value, low in (
        ("keep_last", t.keep_last, 1),
        ("keep_every", t.keep_every, 1),
        ("max_skipped_in_row", t.max_skipped_in_row, 1),
    ):
        if value is not None and value < low:
            raise RecipeError(f"train.{key}: must be at least {low}, got {value}")
    # Integers the training loop divides or loops by, and sizes of the model: zero or negative would crash
    # it after the data is prepared, or build an empty layer.
    for key, value, none_means in (
        ("train.log_every", t.log_every, ""),
        ("train.threads", t.threads, " (or null for torch's default)"),
        ("model.d_ff", recipe.model.d_ff, " (or null for 8/3 × d_model)"),
        ("model.max_seq_len", recipe.model.max_seq_len, ""),
        ("data.val_max_samples", recipe.data.val_max_samples, ""),
    ):
        if value is not None and value < 1:
            raise RecipeError(f"{key}: must be a positive integer{none_means}, got {value}")
    for key, value in (
        ("train.peak_tflops", t.peak_tflops),
        ("model.layer_norm_eps", recipe.model.layer_norm_eps),
        ("model.rope_theta", recipe.model.rope_theta),
    ):
        if value is not None and value <= 0:
            raise RecipeError(f"{key}: must be positive, got {value}")
    o = recipe.optimizer
    if o.grad_clip <= 0:  # 0 would zero every gradient, a negative value reverse them
        raise RecipeError(
            f"optimizer.grad_clip: the largest gradient norm must be positive, got {o.grad_clip}"
        )
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise RecipeError(f"optimizer.betas[{i}]: must be in [0, 1), got {beta}")
    if o.eps <= 0:
        raise RecipeError(f"optimizer.eps: must be positive, got {o.eps}")
    if o.weight_decay < 0:
        raise RecipeError(f"optimizer.weight_decay: must not be negative, got {o.weight_decay}")
    if t.spike_factor is not None and t.spike_factor <= 1.0:
        raise RecipeError(
            f"train.spike_factor: a loss this many times the recent mean is a spike; use > 1, got {t.spike_factor}"
        )
    for name, src in d.sources.items():
        where = f"data.sources.{name}"
        if (src.max_bytes is not None and src.max_bytes < 0) or src.max_doc_bytes < 1:
            raise RecipeError(f"{where}: max_bytes must be >= 0 and max_doc_bytes >= 1")
        if (src.embedded is None) == (src.path is None):
            raise RecipeError(f"{where}: give exactly one of 'embedded' or 'path'")
        if src.embedded is not None:
            from crystal_lm.data.corpus import EMBEDDED_PARTS

            if src.embedded not in EMBEDDED_PARTS:
                raise RecipeError(
                    f"{where}.embedded: unknown part {src.embedded!r} (known: {', '.join(EMBEDDED_PARTS)})"
                )
    domain_sources: dict[str, list[str]] = {}
    for name, src in d.sources.items():
        domain_sources.setdefault(src.domain, []).append(name)
    for name in d.sources:
        # Validation loss is reported per source and per domain under one set of keys: a source named like
        # a domain of other sources would have its figure and the domain's summed into one wrong number.
        if name in domain_sources and domain_sources[name] != [name]:
            raise RecipeError(
                f"data.sources.{name}: named like the domain {name!r} of sources "
                f"{', '.join(domain_sources[name])}; validation loss reports sources and domains under one "
                f"set of names, so rename the source (e.g. {name}_src)"
            )
    for key, value in (
        ("data.seq_len", d.seq_len),
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("model.vocab_size", m.vocab_size),
        ("train.batch_size", recipe.train.batch_size),
        ("mup.base_width", recipe.mup.base_width),
    ):
        if value <= 0:
            raise RecipeError(f"{key}: must be positive, got {value}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise RecipeError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    # Sizes the data pipeline divides or loops by: zero or negative would hang or crash it.
    for key, value, none_means in (
        ("data.unit_bytes", d.unit_bytes, ""),
        ("data.mixture_block", d.mixture_block, ""),
        ("data.chunk_chars", d.chunk_chars, " (or null to tokenize each document whole)"),
        ("data.workers", d.workers, " (or null for one per core)"),
        ("data.tokenizer.vocab_size", d.tokenizer.vocab_size, ""),
        ("data.tokenizer.sample_bytes", d.tokenizer.sample_bytes, ""),
    ):
        if value is not None and value < 1:
            raise RecipeError(f"{key}: must be a positive integer{none_means}, got {value}")
    if m.d_model % m.n_heads:
        raise RecipeError(f"model.n_heads: {m.n_heads} does not divide model.d_model {m.d_model}")
    if m.rotary_dim % 2 or not 0 <= m.rotary_pct <= 1:
        raise RecipeError(
            f"model.rotary_pct: {m.rotary_pct} gives {m.rotary_dim} rotary dims per head; they must be even "
            f"and at most the head dim {m.head_dim} (rotary_pct between 0 and 1)"
        )
    if d.seq_len > m.max_seq_len:
        raise RecipeError(f"data.seq_len: {d.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    mb = recipe.train.micro_batch_size
    if mb is not None and mb <= 0:  # a bound: each process takes the largest that splits its share evenly
        raise RecipeError(f"train.micro_batch_size: {mb} must be positive")
    names = set()
    for i, st in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if st.name in names:
            raise RecipeError(f"{where}.name: duplicate stage name {st.name!r}")
        names.add(st.name)
        if st.tokens <= 0:
            raise RecipeError(f"{where}.tokens: must be positive, got {st.tokens}")
        if st.checkpoint_every <= 0:
            raise RecipeError(f"{where}.checkpoint_every: must be positive, got {st.checkpoint_every}")
        if not st.mixture:
            raise RecipeError(
                f"{where}.mixture: empty mixture; give at least one source with a positive weight"
            )
        for src, w in st.mixture.items():
            if src not in d.sources:
                raise RecipeError(
                    f"{where}.mixture.{src}: unknown source {src!r} (known: {', '.join(sorted(d.sources))})"
                )
            if w < 0:
                raise RecipeError(f"{where}.mixture.{src}: weight must not be negative, got {w}")
        if sum(st.mixture.values()) <= 0:
            raise RecipeError(f"{where}.mixture: weights sum to zero")
        from crystal_lm.data.mixture import allocate

        slots = allocate(list(st.mixture.values()), d.mixture_block)
        for (src, w), n in zip(st.mixture.items(), slots, strict=True):
            if w > 0 and n == 0:  # its share rounds to no slot of a block: it would never be drawn
                share = w / sum(st.mixture.values())
                raise RecipeError(
                    f"{where}.mixture.{src}: weight {w} is a share of {share:.2g}, less than one of the "
                    f"{d.mixture_block} slots of a mixture block, so the source would never be drawn; raise "
                    f"data.mixture_block to at least {math.ceil(1 / share)} or set the weight to 0"
                )
        for src in st.fim.sources or []:
            if src not in d.sources:
                raise RecipeError(f"{where}.fim.sources: unknown source {src!r}")
            if src not in st.mixture and st.fim.rate > 0:  # a likely slip: FIM meant for it never happens
                raise RecipeError(
                    f"{where}.fim.sources: {src!r} is not in this stage's mixture, so nothing of it is FIM'd "
                    f"(the mixture: {', '.join(st.mixture)})"
                )
        domains = sorted({s.domain for s in d.sources.values()})
        if st.fim.sources is None and st.fim.rate > 0:
            for dom in st.fim.domains:
                # A near-miss is a typo that would silently turn FIM off. A domain no source has at all is
                # allowed (the default `code` in a text-only recipe): there is just nothing to FIM.
                near = difflib.get_close_matches(dom, domains, n=1, cutoff=0.6)
                if dom not in domains and near:
                    raise RecipeError(
                        f"{where}.fim.domains: no source has domain {dom!r}; did you mean {near[0]!r}? "
                        f"(the sources' domains: {', '.join(domains)})"
                    )
        for src in st.mixture:
            if d.sources[src].document_fim is not None and st.fim.applies_to(src, d.sources[src].domain):
                raise RecipeError(
                    f"{where}.fim: source {src!r} is already FIM'd per document (data.sources.{src}."
                    "document_fim); leave it out of the stage's fim.sources / domains"
                )
        for src, (lo, hi) in st.subsets.items():
            if src not in st.mixture:
                raise RecipeError(f"{where}.subsets.{src}: not a source of this stage's mixture")
            if not 0.0 <= lo < hi <= 1.0:
                raise RecipeError(f"{where}.subsets.{src}: need 0 <= start < end <= 1, got [{lo}, {hi}]")
        if not 0.0 <= st.fim.rate <= 1.0 or not 0.0 <= st.fim.spm_rate <= 1.0:
            raise RecipeError(f"{where}.fim: rate and spm_rate must lie in [0, 1]")
        for src, rate in st.fim.rates.items():
            if src not in d.sources or not 0.0 <= rate <= 1.0:
                raise RecipeError(f"{where}.fim.rates.{src}: need a known source and a rate in [0, 1]")
        lr = st.lr
        if lr.continue_previous:
            if i == 0:
                raise RecipeError(f"{where}.lr.continue_previous: the first stage has no previous stage")
            if lr.peak is not None or lr.end is not None or lr.decay_steps is not None:
                raise RecipeError(
                    f"{where}.lr: continue_previous takes peak, end and decay_steps from the "
                    "previous stage; remove them"
                )
        elif lr.peak is None or lr.peak <= 0:
            raise RecipeError(f"{where}.lr.peak: a positive peak LR is required")
        if lr.end is not None and lr.end < 0:
            raise RecipeError(f"{where}.lr.end: must not be negative")
        if lr.warmup_steps < 0 or (lr.decay_steps is not None and lr.decay_steps <= 0):
            raise RecipeError(f"{where}.lr: warmup_steps must be >= 0 and decay_steps > 0")
    _check_continued_schedules(recipe)


def _check_continued_schedules(recipe: Recipe) -> None:
    """A stage that continues the previous one's line starts where that stage stopped: if it stopped at an LR
    of 0 (its decay fitted within it, towards the default end 0), the whole stage would train at LR 0."""
    from crystal_lm.train.schedule import stage_schedules

    schedules = stage_schedules(recipe)
    for i, (stage, schedule) in enumerate(zip(recipe.stages, schedules, strict=True)):
        if not stage.lr.continue_previous:
            continue
        prev, before = recipe.stages[i - 1], schedules[i - 1]
        # Structurally, not by the value reached: the line's float arithmetic may stop at 1e-18, not 0.
        decayed = recipe.stage_steps(prev) - before.warmup_steps >= before.decay_steps
        if schedule.peak <= 0 or (decayed and before.end <= 0):
            raise RecipeError(
                f"stages[{i}].lr.continue_previous: stage {prev.name!r} has already decayed to an LR of 0 by "
                f"its end ({recipe.stage_steps(prev):,} steps), so this stage would train at LR 0. Give stage "
                f"{prev.name!r} a decay_steps longer than the stage and an end (as Crystal's stage 1, whose "
                "decay spans stages 1 and 2), or give this stage its own peak"
            )


def check_paths(recipe: Recipe) -> None:
    """Check that every user data path and tokenizer file exists (needed for data work, not for `info`)."""
    for name, src in recipe.data.sources.items():
        if src.path is None:
            continue
        p = recipe.resolve_path(src.path)
        if any(c in str(p) for c in "*?["):  # a wildcard in any part: matched as the reader matches it
            from crystal_lm.data.documents import DataError
            from crystal_lm.data.readers import _expand

            try:
                _expand(p)
            except DataError:
                raise RecipeError(
                    f"{recipe.source_file}: data.sources.{name}.path: no files match {p}"
                ) from None
        elif not p.exists() and not p.is_symlink():  # a dangling link is named by the reader
            raise RecipeError(f"{recipe.source_file}: data.sources.{name}.path: {p} does not exist")
    tok = recipe.data.tokenizer.path
    if tok is not None and not recipe.resolve_path(tok).is_file():
        raise RecipeError(
            f"{recipe.source_file}: data.tokenizer.path: {recipe.resolve_path(tok)} does not exist"
        )


def recipe_from_dict(data: Any, source_file: str | None = None) -> Recipe:
    label = source_file or "<recipe>"
    try:
        recipe = _from_dict(Recipe, data, "")
        recipe.source_file = source_file
        _validate(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{label}: {exc}") from None
    return recipe


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override keys: allowed
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise _DuplicateKeyError(
                        f"line {line}: duplicate key {key!r} (first given at line {first[key]}); "
                        "YAML would keep only the last value: remove one of them"
                    )
                first[key] = line
            except TypeError:  # an unhashable key: the base loader reports it
                pass
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return recipe_from_dict(data, str(path))
