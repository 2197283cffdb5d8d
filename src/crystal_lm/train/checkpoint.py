"""Checkpoints named like Crystal's (`phase{N}_checkpoint_{step:06d}`; ordered by phase, then step).

A checkpoint folder holds the model (`model.safetensors`), optimizer state and RNG (`optimizer.pt`), the
trainer state (`state.json`), what is needed to use it alone (`config.json`, `tokenizer.json`) and
`checksums.json`. It is written to a temporary folder, completed with a `COMPLETE` marker and renamed into
place, so an interruption never leaves a partial checkpoint under a real name; on load, the marker and every
checksum are checked, and a damaged checkpoint is skipped for the previous good one with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crystal_lm.files import sha256_file

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^phase(\d+)_checkpoint_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    stage_index: int = 0
    step: int = 0  # optimizer steps completed in the stage
    global_step: int = 0
    tokens_seen: int = 0
    stage_wall_s: dict[str, float] = field(default_factory=dict)
    recipe_fingerprint: str = ""
    val_loss: dict[str, float] | None = None
    guard: dict = field(default_factory=dict)  # the stability guard's state


def checkpoint_name(stage_index: int, step: int) -> str:
    return f"phase{stage_index + 1}_checkpoint_{step:06d}"


def save_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    state: TrainState,
    config: dict[str, Any],
    tokenizer_path: Path | None,
    tmp: Path | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `tensors` are saved as given (dtype kept). The optimizer state is
    either given here (small, one process) or already written, sharded, into `tmp/optimizer` by every process
    (see `crystal_lm.train.parallel.save_optimizer_sharded`); `tmp` is then that folder."""
    directory = Path(directory)
    if tmp is None:
        tmp = staging_dir(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "crystal-lm"})
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=1) + "\n")
    with open(tmp / "COMPLETE", "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    if directory.exists():  # re-saving the same step after a resume, or replacing an import
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def staging_dir(directory: Path) -> Path:
    """Where a checkpoint is assembled before the rename; the same name on every process."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.tmp")


def optimizer_source(directory: Path) -> Path | dict | None:
    """What a checkpoint holds of the optimizer: a sharded `optimizer/` folder (loaded into a live optimizer
    by `load_optimizer_sharded`), a state dict (older checkpoints), or nothing."""
    directory = Path(directory)
    if (directory / "optimizer").is_dir():
        return directory / "optimizer"
    if (directory / "optimizer.pt").is_file():
        return load_optimizer(directory).get("optimizer")
    return None


def read_optimizer_state(directory: Path) -> dict:
    """The optimizer state of a checkpoint as one dict keyed by parameter name (for inspection)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source = optimizer_source(directory)
    if not isinstance(source, Path):
        return source or {}
    from crystal_lm.train.parallel import single_process_dcp

    with tempfile.TemporaryDirectory() as tmp, single_process_dcp():
        dcp_to_torch_save(source, Path(tmp) / "optimizer.pt")
        return torch.load(Path(tmp) / "optimizer.pt", weights_only=True)["optimizer"]


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


# What every checkpoint holds, whatever its checksums.json lists (a list cut short must not pass).
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "state.json", "config.json")


def verify_checkpoint(directory: Path, resumable: bool = False) -> None:
    """Raise CheckpointError unless the folder is a complete checkpoint whose files match their checksums.
    `resumable`: it must also hold optimizer state (training resumed from it would restart AdamW)."""
    directory = Path(directory)
    if not (directory / "COMPLETE").is_file():
        raise CheckpointError(f"{directory}: no COMPLETE marker (interrupted while saving)")
    try:
        sums = json.loads((directory / "checksums.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: unreadable checksums.json ({exc})") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{directory}: checksums.json is not a mapping of file to sha256")
    unlisted = [name for name in REQUIRED_FILES if name not in sums]
    if unlisted:
        raise CheckpointError(f"{directory}: checksums.json does not cover {', '.join(unlisted)}")
    for name, digest in sums.items():
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: checksum mismatch (corrupt)")
    if resumable and "optimizer/.metadata" not in sums:  # older checkpoints: the state inside optimizer.pt
        try:  # memory-mapped: only the keys are looked at
            saved = torch.load(directory / "optimizer.pt", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises several kinds for a damaged file
            raise CheckpointError(f"{directory}/optimizer.pt: unreadable ({exc})") from None
        if saved.get("optimizer") is None:
            raise CheckpointError(f"{directory}: no optimizer state (resuming from it would restart AdamW)")


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """(phase, step) as numbers from a checkpoint's name (phase counts from 1), or None for another name."""
    m = NAME_RE.match(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoints oldest first. Ordered by (phase, step) as numbers: as text, phase10 would sort before
    phase9 and step 1,000,000 before 999,999."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and checkpoint_position(p)]
    return sorted(found, key=checkpoint_position)  # type: ignore[arg-type]


def latest_checkpoint(root: Path, resumable: bool = False) -> Path | None:
    """The newest checkpoint that verifies (`resumable`: with optimizer state); damaged ones are reported and
    skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, resumable)
            return path
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", path.name, exc)
    return None


def load_state(directory: Path) -> TrainState:
    return TrainState(**json.loads((Path(directory) / "state.json").read_text()))


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    tensors = load_tensors(directory)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_optimizer(directory: Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "optimizer.pt", weights_only=True)


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a save that was killed."""
    if Path(root).is_dir():
        for p in Path(root).glob(".*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)
