"""What a run folder holds and promises: it belongs to one recipe (recipe.json), it records where a run
started from (init_from.json), its packed data and tokenizer stay those it trained on, and summary.json and
eval.jsonl say what each stage reached."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crystal_lm.config import Recipe
from crystal_lm.data.prepare import PreparedData, manifest_differences
from crystal_lm.text import first_few
from crystal_lm.train.checkpoint import TrainState, list_checkpoints
from crystal_lm.train.metrics import read_jsonl, write_text_atomic

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    pass


def _lock_holder(folder: Path) -> str:
    """The process holding a flock on `folder`, from /proc/locks (Linux: `MAJ:MIN:INODE` in hex:hex:decimal),
    or "unknown"."""
    st = folder.stat()
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" not in fields:
                continue
            major, minor, inode = fields[-3].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == (
                os.major(st.st_dev),
                os.minor(st.st_dev),
                st.st_ino,
            ):
                return fields[-4]
    except (OSError, IndexError, ValueError):
        pass
    return "unknown"


@contextmanager
def run_dir_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder while training writes it: a second trainer started on the same
    folder (a rerun while the first still runs, or torchrun workers left running by a killed launcher) is
    refused, naming the process that holds it. The lock is on the folder itself (no file is left in it), the
    kernel drops it when that process dies, and it holds between processes of one machine (on NFS, not across
    machines sharing the folder)."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{run_dir}: another training process (pid {_lock_holder(run_dir)}) is writing this run; let "
                "it finish, or stop it and run the command again to resume"
            ) from None
        except OSError as exc:  # a file system without flock: train, unguarded, as before the lock existed
            log.warning(
                "%s: cannot lock the run folder (%s); nothing stops a second trainer on it", run_dir, exc
            )
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_started(run_dir: Path) -> bool:
    """Whether the folder holds training: a checkpoint, or logs (the first is the untrained model's val loss).
    A recipe.json alone is left by a run that failed before training (bad data, a model that cannot be built)."""
    logs = (run_dir / name for name in ("metrics.jsonl", "eval.jsonl"))
    return bool(list_checkpoints(run_dir / "checkpoints")) or any(
        p.is_file() and p.stat().st_size for p in logs
    )


def claim_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """Record the recipe a run folder belongs to; refuse to continue it with another recipe, naming the keys
    that differ. Keys that change nothing computed (`RUN_NEUTRAL_KEYS`: description, retention, logging) may
    change; the record then stays the run's first recipe. A record with no training yet is replaced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "recipe.json"
    if not record.is_file() and any(run_dir.iterdir()):  # checkpoints and logs would mix with what is there
        raise RunDirError(
            f"--out {run_dir}: a folder that holds other files and no crystal-lm run (no recipe.json); give a "
            "new or empty folder"
        )
    fp = recipe.fingerprint()
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("fingerprint") == fp:
            return
        if _run_started(run_dir):
            differ = recipe.differences(old.get("recipe", {}))
            if not differ:
                return
            shown = first_few(differ, sep="; ")
            raise RunDirError(
                f"{run_dir} holds a run of another recipe ({old.get('name')}, recorded in {record}): "
                f"{shown} differ. Restore those values to resume it, or use a new --out folder."
            )
        log.info("%s: no training yet under the recorded recipe; replacing it", record)
        (run_dir / "init_from.json").unlink(missing_ok=True)
        (run_dir / "recipe.yaml").unlink(missing_ok=True)
    body = {
        "name": recipe.name,
        "fingerprint": fp,
        "source_file": recipe.source_file,
        "recipe": recipe.to_dict(),
    }
    write_text_atomic(record, json.dumps(body, indent=1, default=list) + "\n")
    if recipe.source_file:
        shutil.copyfile(recipe.source_file, run_dir / "recipe.yaml")


def initial_checkpoint(
    run_dir: Path, init_from: str | Path | None, resuming: bool
) -> tuple[str | Path | None, bool]:
    """The checkpoint a new run starts from. The run folder records it (init_from.json): starting again after
    an interruption before the first checkpoint uses it again rather than a random initialisation, and an
    --init-from for a run that already has checkpoints, which would be ignored, is refused. Also returns
    whether the start is the recorded one (its record, with the path as first given, then stays as it is)."""
    record_path = run_dir / "init_from.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    if recorded is not None:  # records written before the resolved path was kept hold only the path as given
        recorded.setdefault("resolved", str(Path(recorded["init_from"]).resolve()))
    if resuming:
        if init_from is not None and (
            recorded is None or Path(init_from).resolve() != Path(recorded["resolved"])
        ):
            began = f"from {recorded['init_from']}" if recorded else "without --init-from"
            raise RunDirError(
                f"{run_dir} holds a run that began {began}; --init-from {init_from} only starts a new run. "
                "Drop it to resume this one, or use a new --out folder."
            )
        return None, False
    if init_from is None and recorded is not None:
        from crystal_lm.train.compat import weights_sha256

        if not Path(recorded["resolved"]).is_dir():
            raise RunDirError(
                f"{run_dir} began from {recorded['resolved']} (recorded in {record_path}), which no longer "
                "exists; give --init-from to start from another checkpoint, or use a new --out folder"
            )
        if recorded.get("weights_sha256", {}) not in ({}, weights_sha256(Path(recorded["resolved"]))):
            raise RunDirError(
                f"{run_dir} began from {recorded['resolved']} (recorded in {record_path}), whose weights have "
                "changed since; give --init-from explicitly to start from them as they are now"
            )
        log.info("starting from %s again, as recorded in %s", recorded["init_from"], record_path)
        return recorded["resolved"], True
    return init_from, False


def record_initial_checkpoint(run_dir: Path, init_from: str | Path, with_optimizer: bool) -> None:
    """init_from.json: the path as given, where it led, and the weights that were there."""
    from crystal_lm.train.compat import weights_sha256

    record = {
        "init_from": str(init_from),
        "resolved": str(Path(init_from).resolve()),
        "weights_sha256": weights_sha256(Path(init_from)),
        "optimizer": with_optimizer,
    }
    (run_dir / "init_from.json").write_text(json.dumps(record, indent=1) + "\n")


def write_summary(recipe: Recipe, run_dir: Path, state: TrainState) -> dict:
    """`summary.json`: per stage its tokens, wall time and validation loss at the stage's last checkpoint."""
    evals = read_jsonl(run_dir / "eval.jsonl")
    stages = []
    for i, stage in enumerate(recipe.stages):
        steps = recipe.stage_steps(stage)
        final = [e for e in evals if e["stage_index"] == i and e["step"] == steps]
        stages.append(
            {
                "name": stage.name,
                "steps": steps,
                "tokens": steps * recipe.tokens_per_step,
                "wall_s": round(state.stage_wall_s.get(stage.name, 0.0), 2),
                "val_loss": final[-1]["val_loss"] if final else None,
                "checkpoint": final[-1]["checkpoint"] if final else None,
                "mixture": stage.mixture,
                "fim_rate": stage.fim.rate,
            }
        )
    summary = {
        "recipe": recipe.name,
        "complete": all(s["val_loss"] is not None for s in stages),
        "tokens_seen": state.tokens_seen,
        "stages": stages,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def refuse_changed_data(run_dir: Path, resume: Path, data: PreparedData) -> None:
    """A resumed run must see the tokens it started with. The recipe fingerprint covers paths and settings,
    not what the files hold: a tokenizer or corpus changed in place would silently change the token ids and
    the published data order half-way through a run."""
    tokenizer = resume / "tokenizer.json"
    if tokenizer.is_file():
        before = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        if before != data.tokenizer.sha256:
            raise RunDirError(
                f"{run_dir}: the recipe's tokenizer ({data.tokenizer.path}, sha256 {data.tokenizer.sha256[:16]}…) "
                f"is not the one this run trained with ({resume.name}/tokenizer.json, sha256 {before[:16]}…). "
                "Restore the original tokenizer to resume, or train into a new --out folder."
            )
    recorded = run_dir / "data_manifest.json"
    if not recorded.is_file():
        return
    try:
        before = json.loads(recorded.read_text())
    except ValueError as exc:
        raise RunDirError(
            f"{recorded}: unreadable ({exc}); restore it, or delete it to resume without comparing the data"
        ) from None
    changed = manifest_differences(before, data.manifest())
    if changed:
        raise RunDirError(
            f"{run_dir}: the packed data of {', '.join(changed)} differs from what this run started with "
            f"(shard hashes in {recorded}); its data order would no longer be what it trained on. Restore "
            "the source files, or train into a new --out folder."
        )


def eval_record(recipe: Recipe, state: TrainState, name: str | None) -> dict:
    return {
        "checkpoint": name,
        "stage": recipe.stages[state.stage_index].name,
        "stage_index": state.stage_index,
        "step": state.step,
        "global_step": state.global_step,
        "tokens": state.tokens_seen,
        "val_loss": state.val_loss,
    }
