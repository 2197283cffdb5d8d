"""The stage loop: every stage of a recipe in order, as one run that can be interrupted at any moment.

Per step: the stage's batch (a pure function of the step, see `crystal_lm.data.loader`), gradient
accumulation over micro-batches, clipping, AdamW with muP groups at the stage's scheduled LR, a JSONL record.
At the stage's checkpoint cadence and at its end: validation loss per domain, then an atomic checkpoint.
Running again on the same run folder resumes from the newest good checkpoint; stage transitions follow the
recipe (stage 2 keeps the optimizer, a stage with `reset_optimizer` starts a fresh one from the weights).
What the run folder records and refuses is in `run_dir`, which checkpoints are kept in `retention`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from crystal_lm.config import ModelConfig, MupConfig, Recipe, StageConfig
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
from crystal_lm.train.retention import prune_checkpoints
from crystal_lm.train.run_dir import (
    RunDirError,
    claim_run_dir,
    eval_record,
    initial_checkpoint,
    record_initial_checkpoint,
    refuse_changed_data,
    run_dir_lock,
    write_summary,
)
from crystal_lm.train.schedule import LinearSchedule, schedule_warnings, stage_schedules
from crystal_lm.train.stability import StabilityGuard, TrainingDiverged

__all__ = ["RunDirError", "Trainer", "train"]

log = logging.getLogger(__name__)


def make_optimizer(model: CrystalModel, recipe: Recipe) -> torch.optim.AdamW:
    o = recipe.optimizer
    groups = param_groups(model, o.weight_decay, model.width_multiplier)
    # One fused kernel for all parameters (sharded DTensors included) on CPU and GPU alike.
    return torch.optim.AdamW(groups, lr=0.0, betas=o.betas, eps=o.eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> dict[str, float]:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_scale"]
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def parent_pid() -> int:
    return os.getppid()


def training_autocast(precision: str, device: str, activation_checkpointing: bool = False) -> torch.autocast:
    """bf16 autocast for a training forward (off in fp32). Under activation checkpointing its cast cache is off:
    the cache keeps every weight's bf16 copy to the end of the forward, which is the memory checkpointing is
    there to free (only the head, used per loss chunk, is then cast more than once)."""
    return torch.autocast(
        device.split(":")[0],
        dtype=torch.bfloat16,
        enabled=precision == "bf16",
        cache_enabled=not activation_checkpointing,
    )


def compute_gradients(
    train_model: torch.nn.Module,
    batch: Batch,
    micro_batch: int,
    precision: str,
    device: str = "cpu",
    activation_checkpointing: bool = False,
) -> float:
    """Forward and backward over `batch` in micro-batches (gradients accumulate); returns the mean loss."""
    n_micro = max(1, batch.input_ids.shape[0] // micro_batch)
    total = 0.0
    for c in range(n_micro):
        rows = slice(c * micro_batch, (c + 1) * micro_batch)
        ids, labels, mask = (t[rows].to(device) for t in (batch.input_ids, batch.labels, batch.loss_mask))
        with training_autocast(precision, device, activation_checkpointing):
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


def checkpoint_config(recipe: Recipe) -> dict:
    return {
        "format": "crystal-lm",
        "recipe": recipe.name,
        "model": asdict(recipe.model),
        "mup": asdict(recipe.mup),
        "seq_len": recipe.data.seq_len,
    }


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


class _NoLog:
    """Stands in for the JSONL logs on processes other than rank 0."""

    path = None

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


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
    with run_dir_lock(run_dir, enabled=init_world().main):
        return Trainer(recipe, run_dir, data=data, init_from=init_from).fit(stop_after_steps)


class Trainer:
    """One run folder's training: set up (or resume) in `__init__`, then `fit` runs the stages that are left.

    Each step's pieces are methods: the stage's optimizer (`_optimizer_for`), the step (`_step`), its log
    record (`_step_record`) and the checkpoint with its validation loss (`_checkpoint`)."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        data: PreparedData | None = None,
        init_from: str | Path | None = None,
    ) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        self.world = world = init_world()
        # Under torchrun: the launcher this worker answers to. A worker whose launcher was killed stops
        # instead of training on alone (torchrun starts workers in their own sessions, so they outlive it).
        self.launcher_pid = parent_pid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        t = recipe.train
        try:
            self.micro = process_micro_batch(t.batch_size, t.micro_batch_size, world.world_size)
        except ValueError as exc:
            raise RunDirError(f"{exc}; change train.batch_size or train.micro_batch_size") from None
        if world.main:
            claim_run_dir(recipe, run_dir)
        if t.threads:
            torch.set_num_threads(t.threads)
        if data is None:
            if world.main:
                data = prepare_data(recipe)  # rank 0 builds; the others then find it in the cache
            world.barrier()
            data = data or prepare_data(recipe)
        self.data = data
        self.model = build_model(recipe.model, recipe.mup, seed=recipe.seed)
        self.ck_root = run_dir / "checkpoints"
        self.tokenizer_path = run_dir / "tokenizer.json"
        self.state, self.opt_state, self.init_optimizer = self._resume_or_start(init_from)
        self.model.to(world.device)
        self.train_model = parallelize(self.model, t, world)
        self.guard = StabilityGuard(t.spike_factor, t.max_skipped_in_row)
        self.guard.load_state_dict(self.state.guard)
        m = recipe.model
        self.flops_token = (
            flops_per_token(  # parameter counts are global (a DTensor's numel is its full size)
                sum(p.numel() for p in self.model.parameters()),
                m.n_layers,
                m.n_heads,
                m.d_model // m.n_heads,
                recipe.data.seq_len,
            )
        )
        self.peak = peak_tflops(t.peak_tflops, world.device)
        self.optimizer: torch.optim.Optimizer | None = None

    def _resume_or_start(self, init_from: str | Path | None) -> tuple[TrainState, Path | dict | None, bool]:
        """The state to continue from: the newest good checkpoint, else `init_from` (or the one recorded),
        else a fresh start. Returns the state, the optimizer state to restore and whether the first stage
        continues it (an initial checkpoint's optimizer)."""
        recipe, run_dir, world, model, data = self.recipe, self.run_dir, self.world, self.model, self.data
        if world.main:
            clean_partial(self.ck_root)
        world.barrier()
        resume = latest_checkpoint(self.ck_root, resumable=True)
        if resume is None and list_checkpoints(self.ck_root):
            raise RunDirError(
                f"{run_dir}: none of its checkpoints can be resumed from (each is named above with what is "
                "wrong); starting from scratch would write over them and cut its logs. Restore one, or move "
                f"{self.ck_root} away to train this folder again from the start."
            )
        if resume is not None:
            refuse_changed_data(run_dir, resume, data)
        init_from, recorded_start = initial_checkpoint(run_dir, init_from, resuming=resume is not None)
        world.barrier()
        if world.main:
            # Atomic: resuming compares against it.
            write_text_atomic(run_dir / "data_manifest.json", json.dumps(data.manifest(), indent=1) + "\n")
            shutil.copyfile(data.tokenizer.path, self.tokenizer_path)

        self.resumed_from = resume
        if resume is not None:
            state = load_state(resume)
            load_model_weights(resume, model)
            torch.set_rng_state(load_optimizer(resume)["torch_rng"])
            log.info(
                "resuming from %s (stage %d, step %d, %s tokens seen)",
                resume.name,
                state.stage_index + 1,
                state.step,
                f"{state.tokens_seen:,}",
            )
            return state, optimizer_source(resume), False
        state = TrainState(recipe_fingerprint=recipe.fingerprint())
        if init_from is None:
            return state, None, False
        opt_state = load_initial_weights(init_from, model, recipe, data.tokenizer.sha256)
        if world.main and not recorded_start:
            record_initial_checkpoint(run_dir, init_from, with_optimizer=opt_state is not None)
        log.info(
            "starting from %s (%s)", init_from, "with optimizer state" if opt_state is not None else "weights"
        )
        return state, opt_state, opt_state is not None

    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Every stage from where the state stands; returns the summary (rank 0)."""
        recipe, state, world = self.recipe, self.state, self.world
        self.metrics: JsonlLog | _NoLog = JsonlLog(self.run_dir / "metrics.jsonl") if world.main else _NoLog()
        self.evals: JsonlLog | _NoLog = JsonlLog(self.run_dir / "eval.jsonl") if world.main else _NoLog()
        self.extra: ExtraLoggers | None = None
        total_steps = sum(recipe.stage_steps(s) for s in recipe.stages)
        self.progress = Progress(total_steps, state.global_step, quiet=not world.main)
        try:
            if world.main:
                self.metrics.truncate_after(state.global_step)
                self.evals.truncate_after(state.global_step)
                t = recipe.train
                self.extra = ExtraLoggers(
                    self.run_dir, recipe.name, recipe.to_dict(), t.tensorboard, t.wandb, state.global_step
                )
            self._log_initial_validation()
            for warning in schedule_warnings(recipe):
                self.progress.message(f"warning: {warning}")
            schedules = stage_schedules(recipe)
            for si, stage in enumerate(recipe.stages):
                steps = recipe.stage_steps(stage)
                if si < state.stage_index or (si == state.stage_index and state.step >= steps):
                    continue
                if si > state.stage_index:
                    state.stage_index, state.step = si, 0
                if self._run_stage(si, schedules[si], stop_after_steps):
                    return {"stopped_at": state.global_step}
        except TrainingDiverged as exc:
            raise TrainingDiverged(
                f"{exc} {_diverged_advice(recipe, self.run_dir, latest_checkpoint(self.ck_root))}"
            ) from None
        except KeyboardInterrupt:
            self.progress.message(
                f"interrupted; run the same command again to resume from {latest_checkpoint(self.ck_root)}"
            )
            raise
        finally:
            self.metrics.close()
            self.evals.close()
            if self.extra is not None:
                self.extra.close()
        return write_summary(recipe, self.run_dir, state) if world.main else {}

    def _log_initial_validation(self) -> None:
        """eval.jsonl starts with the untrained model's validation loss; a resumed run whose last record was
        cut off by the interruption gets its checkpoint's record again."""
        recipe, state = self.recipe, self.state
        logged = read_jsonl(self.run_dir / "eval.jsonl")
        resume = self.resumed_from
        if (
            resume is not None
            and state.val_loss is not None
            and not any(e["global_step"] == state.global_step for e in logged)
        ):
            self.evals.write(eval_record(recipe, state, resume.name))
        if state.global_step == 0 and not logged:
            state.val_loss = validation_loss(self.train_model, self.data.val, recipe)
            self.evals.write(eval_record(recipe, state, None))

    def _optimizer_for(self, si: int, stage: StageConfig) -> bool:
        """The stage's optimizer: the run's first stage and a `reset_optimizer` stage start a fresh one (unless
        an initial checkpoint's state continues); the others continue. Returns whether it is fresh."""
        state = self.state
        fresh = state.step == 0 and ((si == 0 and not self.init_optimizer) or stage.reset_optimizer)
        if self.optimizer is None or fresh:
            self.optimizer = make_optimizer(self.model, self.recipe)
            if self.opt_state is not None and not fresh:
                restore_optimizer(self.model, self.optimizer, self.opt_state, self.world)
            self.opt_state = None
        return fresh

    def _run_stage(self, si: int, schedule: LinearSchedule, stop_after_steps: int | None) -> bool:
        """The rest of stage `si`; returns True when `stop_after_steps` stopped the run."""
        recipe, state, world, t = self.recipe, self.state, self.world, self.recipe.train
        stage = recipe.stages[si]
        steps = recipe.stage_steps(stage)
        fresh = self._optimizer_for(si, stage)
        self.progress.message(
            f"stage {si + 1}/{len(recipe.stages)} '{stage.name}': steps {state.step}→{steps}, "
            f"mixture {stage.mixture}, FIM {stage.fim.rate}"
            + (", fresh optimizer" if fresh and si else "")
            + (f", {world.world_size} processes ({t.parallel})" if world.distributed else "")
        )
        stage_data = StageData(recipe, self.data, si)
        wall0, t0 = state.stage_wall_s.get(stage.name, 0.0), time.time()
        t_ready = time.time()
        for step, batch in stage_data.batches(
            state.step, steps, world.rank, world.world_size, worker=t.loader
        ):
            t_batch = time.time()
            lrs = set_lr(self.optimizer, schedule.lr(step))  # type: ignore[arg-type]
            loss, grad_norm, skipped = self._step(batch, f"{stage.name} step {step + 1}")
            now = time.time()
            state.step, state.global_step = step + 1, state.global_step + 1
            state.tokens_seen += recipe.tokens_per_step
            state.stage_wall_s[stage.name] = wall0 + (now - t0)
            tok_s = recipe.tokens_per_step / max(now - t_ready, 1e-9)
            if state.step % t.log_every == 0 or state.step == steps or skipped:
                record = self._step_record(
                    si, loss, grad_norm, lrs, tok_s, t_batch - t_ready, batch.fim_segments, now
                )
                if skipped:
                    record["skipped"] = skipped
                self.metrics.write(record)
                if self.extra is not None:
                    self.extra.log(record, state.global_step)
            self.progress.update(stage.name, state.step, steps, loss, tok_s)
            if state.step % stage.checkpoint_every == 0 or state.step == steps:
                self._checkpoint(si)
            if stop_after_steps is not None and state.global_step >= stop_after_steps:
                return True
            t_ready = time.time()
        return False

    def _step(self, batch: Batch, where: str) -> tuple[float, float, str | None]:
        """Gradients over the batch (averaged over processes), clipping, then the optimizer step unless the
        stability guard skips it. Returns (loss, grad norm before clipping, why it was skipped or None)."""
        optimizer, t = self.optimizer, self.recipe.train
        assert optimizer is not None
        optimizer.zero_grad(set_to_none=True)
        loss = compute_gradients(
            self.train_model, batch, self.micro, t.precision, self.world.device, t.activation_checkpointing
        )
        # Every process learns in the same all-reduce whether any lost its launcher, and all stop together.
        launcher_gone = self.launcher_pid is not None and parent_pid() != self.launcher_pid
        loss, launcher_gone = self.world.mean_and_any(loss, launcher_gone)
        if launcher_gone:
            raise RunDirError(
                f"the torchrun launcher (pid {self.launcher_pid}) is gone; the workers stop at {where} "
                "rather than train on without it. Run the command again to resume."
            )
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optimizer.grad_clip)
        )
        skipped = self.guard.check(loss, grad_norm, where)
        if skipped is None:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            self.progress.message(f"{where}: skipped, {skipped}")
        return loss, grad_norm, skipped

    def _step_record(
        self,
        si: int,
        loss: float,
        grad_norm: float,
        lrs: dict[str, float],
        tok_s: float,
        data_wait_s: float,
        fim_segments: int,
        now: float,
    ) -> dict:
        """One metrics.jsonl line: where the run is, the loss, LR per muP group, speed and data wait."""
        state, world = self.state, self.world
        record = {
            "stage": self.recipe.stages[si].name,
            "stage_index": si,
            "step": state.step,
            "global_step": state.global_step,
            "tokens": state.tokens_seen,
            "loss": round(loss, 6) if math.isfinite(loss) else str(loss),
            "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else str(grad_norm),
            "lr": {k: float(f"{v:.6g}") for k, v in lrs.items()},
            "tokens_per_s": round(tok_s, 1),
            "tokens_per_s_per_process": round(tok_s / world.world_size, 1),
            "tflops_per_process": round(self.flops_token * tok_s / world.world_size / 1e12, 4),
            "data_wait_s": round(data_wait_s, 4),
            "fim_segments": fim_segments,
            "time": round(now, 3),
        }
        if self.peak:
            record["mfu"] = round(record["tflops_per_process"] / self.peak, 4)
            record["peak_tflops"] = self.peak
        if world.device.startswith("cuda"):
            record["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return record

    def _checkpoint(self, si: int) -> None:
        """Validation loss, then an atomic checkpoint; then the retention policy. Every process takes part:
        the full model is gathered, the optimizer written in shards."""
        recipe, state, world = self.recipe, self.state, self.world
        state.val_loss = validation_loss(self.train_model, self.data.val, recipe)
        state.guard = self.guard.state_dict()
        name = checkpoint_name(si, state.step)
        tensors = model_state(self.model, world)
        staging = staging_dir(self.ck_root / name)
        if world.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        world.barrier()
        save_optimizer_sharded(self.model, self.optimizer, staging / "optimizer")
        world.barrier()
        if world.main:
            save_checkpoint(
                self.ck_root / name,
                tensors,
                None,
                state,
                checkpoint_config(recipe),
                self.tokenizer_path,
                tmp=staging,
            )
            self.evals.write(eval_record(recipe, state, name))
            if self.extra is not None:
                self.extra.log({"val_loss": state.val_loss}, state.global_step, prefix="")
            removed = prune_checkpoints(self.ck_root, recipe)
            losses = ", ".join(f"{k} {v:.3f}" for k, v in state.val_loss.items())
            self.progress.message(
                f"checkpoint {name}: "
                + (f"val loss {losses}" if losses else "no validation data (data.val_fraction)")
                + (f" (removed {', '.join(removed)})" if removed else "")
            )
        world.barrier()


def _diverged_advice(recipe: Recipe, run_dir: Path, newest: Path | None) -> str:
    """What to do after the guard stopped a run. Resuming in the same folder with a lower LR is refused (the
    recipe differs), and `--init-from` starts a new run at its recipe's first stage. The newest checkpoint
    may already have diverged: the advice shows its validation loss next to the best one's."""
    source = recipe.source_file or "RECIPE"
    new_dir = f"{run_dir.name}-lower-lr"
    if newest is None:
        return (
            f"No checkpoint was written. Lower lr.peak (or check the data) in {source} and train into a new "
            f"folder: crystal train {source} --out {new_dir}"
        )
    domains = sorted({s.domain for s in recipe.data.sources.values()})

    def mean_loss(record: dict) -> float | None:
        values = [record["val_loss"][d] for d in domains if d in (record.get("val_loss") or {})]
        return sum(values) / len(values) if values else None

    scored = [(e["checkpoint"], mean_loss(e)) for e in read_jsonl(run_dir / "eval.jsonl")]
    scored = [(name, loss) for name, loss in scored if loss is not None]
    losses = dict(scored)
    start = next((loss for name, loss in scored if name is None), None)
    best = min(((n, v) for n, v in scored if n is not None), key=lambda nv: nv[1], default=None)
    chosen = newest
    said = f"The newest checkpoint is {newest}"
    if newest.name in losses:
        said += f" (validation loss {losses[newest.name]:.3f}"
        said += f"; {start:.3f} before training" if start is not None else ""
        if best is not None and best[0] != newest.name:
            said += f"; lowest {best[1]:.3f} at {best[0]}"
            if losses[newest.name] > best[1] and (newest.parent / best[0]).is_dir():  # not pruned
                chosen = newest.parent / best[0]
        said += ")"
    stage = checkpoint_position(chosen)[0]  # type: ignore[index]
    return (
        f"{said}. To go on with a lower lr.peak (or fixed data), start a new run from "
        f"{'the lowest' if chosen != newest else 'it'}: crystal train NEW_RECIPE --out {new_dir} --init-from "
        f"{chosen}. It starts at its recipe's first stage, so NEW_RECIPE should hold only what is left from "
        f"stage {stage} on (with that stage's tokens reduced by what the checkpoint has trained)."
    )
