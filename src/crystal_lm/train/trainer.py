"""The stage loop: every stage of a recipe in order, as one run that can be interrupted at any moment.

Per step: the stage's batch (a pure function of the step, see `crystal_lm.data.loader`), gradient
accumulation over micro-batches, clipping, AdamW with muP groups at the stage's scheduled LR, a JSONL record.
At the stage's checkpoint cadence and at its end: validation loss per domain, then an atomic checkpoint.
Running again on the same run folder resumes from the newest good checkpoint; stage transitions follow the
recipe (stage 2 keeps the optimizer, a stage with `reset_optimizer` starts a fresh one from the weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from crystal_lm.config import ModelConfig, MupConfig, Recipe
from crystal_lm.data.loader import Batch, StageData
from crystal_lm.data.prepare import PreparedData, prepare_data
from crystal_lm.eval.validation import validation_loss
from crystal_lm.model import CrystalModel, build_model, param_groups
from crystal_lm.train.checkpoint import (
    TrainState,
    checkpoint_name,
    checkpoint_position,
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_optimizer,
    load_state,
    optimizer_source,
    save_checkpoint,
    staging_dir,
)
from crystal_lm.train.loggers import ExtraLoggers
from crystal_lm.train.metrics import JsonlLog, Progress, read_jsonl, write_text_atomic
from crystal_lm.train.parallel import (
    World,
    flops_per_token,
    init_world,
    load_optimizer_sharded,
    load_optimizer_state,
    model_state,
    parallelize,
    peak_tflops,
    process_micro_batch,
    save_optimizer_sharded,
)
from crystal_lm.train.schedule import stage_schedules
from crystal_lm.train.stability import StabilityGuard, TrainingDiverged

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    pass


def make_optimizer(model: CrystalModel, recipe: Recipe) -> torch.optim.AdamW:
    o = recipe.optimizer
    groups = param_groups(model, o.weight_decay, model.width_multiplier)
    # One fused kernel for all parameters (sharded DTensors included) on CPU and GPU alike.
    return torch.optim.AdamW(groups, lr=0.0, betas=o.betas, eps=o.eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> dict[str, float]:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_scale"]
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def compute_gradients(
    train_model: torch.nn.Module, batch: Batch, micro_batch: int, precision: str, device: str = "cpu"
) -> float:
    """Forward and backward over `batch` in micro-batches (gradients accumulate); returns the mean loss."""
    n_micro = max(1, batch.input_ids.shape[0] // micro_batch)
    device_type = device.split(":")[0]
    total = 0.0
    for c in range(n_micro):
        rows = slice(c * micro_batch, (c + 1) * micro_batch)
        ids, labels, mask = (t[rows].to(device) for t in (batch.input_ids, batch.labels, batch.loss_mask))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = train_model(ids, labels=labels, loss_mask=mask)
        (loss / n_micro).backward()
        total += loss.item() / n_micro
    return total


def train_step(
    model: CrystalModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    micro_batch: int,
    precision: str,
    grad_clip: float,
) -> tuple[float, float]:
    """One optimizer step over `batch` in micro-batches; returns (loss, grad norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    total = compute_gradients(model, batch, micro_batch, precision)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return total, grad_norm


def restore_optimizer(
    model: CrystalModel, optimizer: torch.optim.Optimizer, source: Path | dict, world: World
) -> None:
    """A sharded optimizer folder (any world size), or a state dict by parameter name or, from older
    checkpoints, by position."""
    if isinstance(source, Path):
        load_optimizer_sharded(model, optimizer, source)
    elif source.get("state") and all(isinstance(k, int) for k in source["state"]):
        optimizer.load_state_dict(source)
    else:
        load_optimizer_state(model, optimizer, source, world)


def _position(checkpoint: Path, recipe: Recipe) -> tuple[int, int, int] | None:
    """(stage index, step in the stage, global step) of a checkpoint, from its name and the recipe: no file
    inside it is read, so a damaged folder (a kill in the middle of its removal) still has a position."""
    where = checkpoint_position(checkpoint)
    if where is None or not 1 <= where[0] <= len(recipe.stages):
        return None
    stage, step = where[0] - 1, where[1]
    return stage, step, sum(recipe.stage_steps(s) for s in recipe.stages[:stage]) + step


def is_permanent(checkpoint: Path, recipe: Recipe) -> bool:
    """Kept for good by the retention policy: every checkpoint when there is none, else stage ends and
    every `keep_every`-th global step."""
    t = recipe.train
    where = _position(checkpoint, recipe)
    if t.keep_last is None or where is None:
        return True
    stage, step, global_step = where
    stage_end = step == recipe.stage_steps(recipe.stages[stage])
    return stage_end or (t.keep_every is not None and global_step % t.keep_every == 0)


def remove_checkpoint(checkpoint: Path) -> None:
    """Rename out of the checkpoint namespace first (to a hidden `.NAME.tmp-removed` folder, which
    `clean_partial` also clears), then delete: a kill half-way never leaves a checkpoint-named folder with
    part of its files for a later run to trip over."""
    trash = checkpoint.with_name(f".{checkpoint.name}.tmp-removed")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(root: Path, recipe: Recipe) -> list[str]:
    """Apply the retention policy; returns the names removed. The newest `keep_last` checkpoints, each stage's
    end and every `keep_every`-th global step are kept; the others are removed (damaged ones too: what is
    permanent is decided by the name)."""
    t = recipe.train
    if t.keep_last is None:
        return []
    everything = list_checkpoints(root)
    doomed = [c for c in everything[: max(0, len(everything) - t.keep_last)] if not is_permanent(c, recipe)]
    for ckpt in doomed:
        remove_checkpoint(ckpt)
    return [c.name for c in doomed]


def checkpoint_config(recipe: Recipe) -> dict:
    return {
        "format": "crystal-lm",
        "recipe": recipe.name,
        "model": asdict(recipe.model),
        "mup": asdict(recipe.mup),
        "seq_len": recipe.data.seq_len,
    }


def _run_started(run_dir: Path) -> bool:
    """Whether the folder holds training: a checkpoint, or logs (the first is the untrained model's val loss).
    A recipe.json alone is left by a run that failed before training (bad data, a model that cannot be built)."""
    logs = (run_dir / name for name in ("metrics.jsonl", "eval.jsonl"))
    return bool(list_checkpoints(run_dir / "checkpoints")) or any(
        p.is_file() and p.stat().st_size for p in logs
    )


def _claim_run_dir(recipe: Recipe, run_dir: Path) -> None:
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
            shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
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


def _initial_checkpoint(
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


def load_initial_weights(
    source: str | Path, model: CrystalModel, recipe: Recipe, tokenizer_sha256: str
) -> Path | dict | None:
    """Weights to start a new run from: a released checkpoint (LLM360's layout, optionally with
    `crystal_state/optimizer.pt`) or a crystal-lm checkpoint folder. Returns the optimizer state if the
    source has one. The architecture, muP settings and tokenizer must be the recipe's."""
    from crystal_lm.interop.llm360 import read_hf_checkpoint
    from crystal_lm.train.checkpoint import CheckpointError, verify_checkpoint
    from crystal_lm.train.compat import recipe_mismatch

    source = Path(source)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"--init-from {source}: no config.json (give a checkpoint folder)")
    config = json.loads(config_path.read_text())
    if config.get("format") == "crystal-lm":  # our own checkpoint folder
        verify_checkpoint(source)
        model_cfg, mup = ModelConfig(**config["model"]), MupConfig(**config["mup"])
        optimizer_dir = source
    else:
        model_cfg, mup, tensors = read_hf_checkpoint(source)
        optimizer_dir = source / "crystal_state"

    problem = recipe_mismatch(source, model_cfg, mup, recipe, tokenizer_sha256, whole_architecture=True)
    if problem:
        raise RunDirError(f"--init-from {source}: {problem}")
    if config.get("format") == "crystal-lm":  # after the shapes are compared: those name the key
        load_model_weights(source, model)
    else:
        try:
            model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"--init-from {source}: weights do not fit the model: {exc}") from None
    return optimizer_source(optimizer_dir) if optimizer_dir.is_dir() else None


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


class _NoLog:
    """Stands in for the JSONL logs on processes other than rank 0."""

    path = None

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _shard_hashes(manifest: dict) -> dict[str, list[str]]:
    return {
        f"{name}/{split}": [shard["sha256"] for shard in summary[split]["shards"]]
        for name, summary in manifest.get("sources", {}).items()
        for split in ("train", "val")
    }


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
    before_shards, now_shards = (
        _shard_hashes(before),
        _shard_hashes(data.manifest()),
    )
    changed = sorted(
        k for k in before_shards.keys() | now_shards.keys() if before_shards.get(k) != now_shards.get(k)
    )
    if changed:
        raise RunDirError(
            f"{run_dir}: the packed data of {', '.join(changed)} differs from what this run started with "
            f"(shard hashes in {recorded}); its data order would no longer be what it trained on. Restore "
            "the source files, or train into a new --out folder."
        )


def train(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    stop_after_steps: int | None = None,
    data: PreparedData | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Run (or resume) every stage of `recipe` in `run_dir`. `stop_after_steps` stops early (for tests).
    `init_from` starts a new run from a checkpoint's weights (and its optimizer state, when it has one).
    Under torchrun every process calls this; rank 0 writes the logs and checkpoints."""
    run_dir = Path(run_dir)
    world = init_world()
    t = recipe.train
    try:
        micro = process_micro_batch(t.batch_size, t.micro_batch_size, world.world_size)
    except ValueError as exc:
        raise RunDirError(f"{exc}; change train.batch_size or train.micro_batch_size") from None
    if world.main:
        _claim_run_dir(recipe, run_dir)
    if t.threads:
        torch.set_num_threads(t.threads)
    if data is None:
        if world.main:
            data = prepare_data(recipe)  # rank 0 builds; the others then find it in the cache
        world.barrier()
        data = data or prepare_data(recipe)
    model = build_model(recipe.model, recipe.mup, seed=recipe.seed)
    ck_root = run_dir / "checkpoints"
    if world.main:
        clean_partial(ck_root)
    world.barrier()
    resume = latest_checkpoint(ck_root)
    if resume is not None:
        refuse_changed_data(run_dir, resume, data)
    init_from, recorded_start = _initial_checkpoint(run_dir, init_from, resuming=resume is not None)
    world.barrier()
    tokenizer_path = run_dir / "tokenizer.json"
    if world.main:
        # Atomic: resuming compares against it.
        write_text_atomic(run_dir / "data_manifest.json", json.dumps(data.manifest(), indent=1) + "\n")
        shutil.copyfile(data.tokenizer.path, tokenizer_path)

    state = TrainState(recipe_fingerprint=recipe.fingerprint())
    opt_state = None
    init_optimizer = False  # the first stage continues an initial checkpoint's optimizer state
    if resume is not None:
        state = load_state(resume)
        load_model_weights(resume, model)
        torch.set_rng_state(load_optimizer(resume)["torch_rng"])
        opt_state = optimizer_source(resume)
        log.info(
            "resuming from %s (stage %d, step %d, %s tokens seen)",
            resume.name,
            state.stage_index + 1,
            state.step,
            f"{state.tokens_seen:,}",
        )
    elif init_from is not None:
        opt_state = load_initial_weights(init_from, model, recipe, data.tokenizer.sha256)
        init_optimizer = opt_state is not None
        if world.main and not recorded_start:
            from crystal_lm.train.compat import weights_sha256

            record = {  # the path as given, where it led, and what was there
                "init_from": str(init_from),
                "resolved": str(Path(init_from).resolve()),
                "weights_sha256": weights_sha256(Path(init_from)),
                "optimizer": init_optimizer,
            }
            (run_dir / "init_from.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info("starting from %s (%s)", init_from, "with optimizer state" if init_optimizer else "weights")
    model.to(world.device)
    train_model = parallelize(model, t, world)
    guard = StabilityGuard(t.spike_factor, t.max_skipped_in_row)
    m = recipe.model
    flops_token = flops_per_token(  # parameter counts are global (a DTensor's numel is its full size)
        sum(p.numel() for p in model.parameters()),
        m.n_layers,
        m.n_heads,
        m.d_model // m.n_heads,
        recipe.data.seq_len,
    )
    peak = peak_tflops(t.peak_tflops, world.device)
    guard.load_state_dict(state.guard)

    metrics: JsonlLog | _NoLog = JsonlLog(run_dir / "metrics.jsonl") if world.main else _NoLog()
    evals: JsonlLog | _NoLog = JsonlLog(run_dir / "eval.jsonl") if world.main else _NoLog()
    if world.main:
        metrics.truncate_after(state.global_step)
        evals.truncate_after(state.global_step)
    extra = (
        ExtraLoggers(run_dir, recipe.name, recipe.to_dict(), t.tensorboard, t.wandb, state.global_step)
        if world.main
        else None
    )
    logged_evals = read_jsonl(run_dir / "eval.jsonl")
    if (
        resume is not None
        and state.val_loss is not None
        and not any(e["global_step"] == state.global_step for e in logged_evals)
    ):
        evals.write(_eval_record(recipe, state, resume.name))
    if state.global_step == 0 and not logged_evals:
        # The model before training: where each domain's loss starts from.
        state.val_loss = validation_loss(train_model, data.val, recipe)
        evals.write(_eval_record(recipe, state, None))

    schedules = stage_schedules(recipe)
    total_steps = sum(recipe.stage_steps(s) for s in recipe.stages)
    progress = Progress(total_steps, state.global_step, quiet=not world.main)
    optimizer = None
    try:
        for si, stage in enumerate(recipe.stages):
            steps = recipe.stage_steps(stage)
            if si < state.stage_index or (si == state.stage_index and state.step >= steps):
                continue
            if si > state.stage_index:
                state.stage_index, state.step = si, 0
            fresh = state.step == 0 and ((si == 0 and not init_optimizer) or stage.reset_optimizer)
            if optimizer is None or fresh:
                optimizer = make_optimizer(model, recipe)
                if opt_state is not None and not fresh:
                    restore_optimizer(model, optimizer, opt_state, world)
                opt_state = None
            progress.message(
                f"stage {si + 1}/{len(recipe.stages)} '{stage.name}': steps {state.step}→{steps}, "
                f"mixture {stage.mixture}, FIM {stage.fim.rate}"
                + (", fresh optimizer" if fresh and si else "")
                + (f", {world.world_size} processes ({t.parallel})" if world.distributed else "")
            )
            stage_data = StageData(recipe, data, si)
            wall0, t0 = state.stage_wall_s.get(stage.name, 0.0), time.time()
            t_ready = time.time()
            batches = stage_data.batches(state.step, steps, world.rank, world.world_size, worker=t.loader)
            for step, batch in batches:
                t_batch = time.time()
                lrs = set_lr(optimizer, schedules[si].lr(step))
                optimizer.zero_grad(set_to_none=True)
                loss = world.mean(compute_gradients(train_model, batch, micro, t.precision, world.device))
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip)
                )
                skipped = guard.check(loss, grad_norm, f"{stage.name} step {step + 1}")
                if skipped is None:
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    progress.message(f"{stage.name} step {step + 1}: skipped, {skipped}")
                now = time.time()
                tokens = recipe.tokens_per_step
                state.step, state.global_step = step + 1, state.global_step + 1
                state.tokens_seen += tokens
                state.stage_wall_s[stage.name] = wall0 + (now - t0)
                tok_s = tokens / max(now - t_ready, 1e-9)
                if state.step % t.log_every == 0 or state.step == steps or skipped:
                    record = {
                        "stage": stage.name,
                        "stage_index": si,
                        "step": state.step,
                        "global_step": state.global_step,
                        "tokens": state.tokens_seen,
                        "loss": round(loss, 6) if math.isfinite(loss) else str(loss),
                        "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else str(grad_norm),
                        "lr": {k: float(f"{v:.6g}") for k, v in lrs.items()},
                        "tokens_per_s": round(tok_s, 1),
                        "tokens_per_s_per_process": round(tok_s / world.world_size, 1),
                        "tflops_per_process": round(flops_token * tok_s / world.world_size / 1e12, 4),
                        "data_wait_s": round(t_batch - t_ready, 4),
                        "fim_segments": batch.fim_segments,
                        "time": round(now, 3),
                    }
                    if peak:
                        record["mfu"] = round(record["tflops_per_process"] / peak, 4)
                        record["peak_tflops"] = peak
                    if world.device.startswith("cuda"):
                        record["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    if skipped:
                        record["skipped"] = skipped
                    metrics.write(record)
                    if extra is not None:
                        extra.log(record, state.global_step)
                progress.update(stage.name, state.step, steps, loss, tok_s)
                if state.step % stage.checkpoint_every == 0 or state.step == steps:
                    state.val_loss = validation_loss(train_model, data.val, recipe)
                    state.guard = guard.state_dict()
                    name = checkpoint_name(si, state.step)
                    # Every process takes part: the full model is gathered, the optimizer written in shards.
                    tensors = model_state(model, world)
                    staging = staging_dir(ck_root / name)
                    if world.main:
                        shutil.rmtree(staging, ignore_errors=True)
                        staging.mkdir(parents=True)
                    world.barrier()
                    save_optimizer_sharded(model, optimizer, staging / "optimizer")
                    world.barrier()
                    if world.main:
                        save_checkpoint(
                            ck_root / name,
                            tensors,
                            None,
                            state,
                            checkpoint_config(recipe),
                            tokenizer_path,
                            tmp=staging,
                        )
                        evals.write(_eval_record(recipe, state, name))
                        if extra is not None:
                            extra.log({"val_loss": state.val_loss}, state.global_step, prefix="")
                        removed = prune_checkpoints(ck_root, recipe)
                        losses = ", ".join(f"{k} {v:.3f}" for k, v in state.val_loss.items())
                        progress.message(
                            f"checkpoint {name}: "
                            + (f"val loss {losses}" if losses else "no validation data (data.val_fraction)")
                            + (f" (removed {', '.join(removed)})" if removed else "")
                        )
                    world.barrier()
                if stop_after_steps is not None and state.global_step >= stop_after_steps:
                    return {"stopped_at": state.global_step}
                t_ready = time.time()
    except TrainingDiverged as exc:
        raise TrainingDiverged(
            f"{exc} {_diverged_advice(recipe, run_dir, latest_checkpoint(ck_root))}"
        ) from None
    except KeyboardInterrupt:
        progress.message(
            f"interrupted; run the same command again to resume from {latest_checkpoint(ck_root)}"
        )
        raise
    finally:
        metrics.close()
        evals.close()
        if extra is not None:
            extra.close()
    return write_summary(recipe, run_dir, state) if world.main else {}


def _diverged_advice(recipe: Recipe, run_dir: Path, last_good: Path | None) -> str:
    """What to do after the guard stopped a run. Resuming in the same folder with a lower LR is refused (the
    recipe differs), and `--init-from` starts a new run at its recipe's first stage."""
    source = recipe.source_file or "RECIPE"
    new_dir = f"{run_dir.name}-lower-lr"
    if last_good is None:
        return (
            f"No checkpoint was written. Lower lr.peak (or check the data) in {source} and train into a new "
            f"folder: crystal train {source} --out {new_dir}"
        )
    stage = checkpoint_position(last_good)[0]  # type: ignore[index]
    return (
        f"The last good state is {last_good}. To go on with a lower lr.peak (or fixed data), start a new run "
        f"from it: crystal train NEW_RECIPE --out {new_dir} --init-from {last_good}. It starts at its recipe's "
        f"first stage, so NEW_RECIPE should hold only what is left from stage {stage} on (with that stage's "
        "tokens reduced by what the checkpoint has trained)."
    )


def _eval_record(recipe: Recipe, state: TrainState, name: str | None) -> dict:
    return {
        "checkpoint": name,
        "stage": recipe.stages[state.stage_index].name,
        "stage_index": state.stage_index,
        "step": state.step,
        "global_step": state.global_step,
        "tokens": state.tokens_seen,
        "val_loss": state.val_loss,
    }
