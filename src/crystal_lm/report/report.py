"""The run report: how each stage moved the model (plots against tokens seen, stage boundaries marked)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from crystal_lm.train.metrics import read_jsonl

TOP_DOMAINS = ("text", "code")


def _stage_bounds(metrics: list[dict]) -> list[tuple[str, float, float]]:
    bounds: dict[str, list[float]] = {}
    for m in metrics:
        lo, hi = bounds.setdefault(m["stage"], [m["tokens"], m["tokens"]])
        bounds[m["stage"]] = [min(lo, m["tokens"]), max(hi, m["tokens"])]
    return [(name, lo, hi) for name, (lo, hi) in bounds.items()]


def _mark_stages(ax, bounds: list[tuple[str, float, float]]) -> None:
    for i, (name, lo, hi) in enumerate(bounds):
        if i:
            ax.axvline(lo, color="grey", linestyle="--", linewidth=0.8)
        ax.axvspan(lo, hi, color=f"C{i}", alpha=0.06)
        ax.text(
            (lo + hi) / 2,
            1.0,
            name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
        )


def _save(fig, path: Path, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~2% of the run (at least 5 steps), so early steps do not drag the curve."""
    window = max(5, len(values) // 50)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _tokens_axis(ax) -> None:
    def fmt(x, _pos):
        for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= scale:
                return f"{x / scale:g}{unit}"
        return f"{x:g}"

    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt))
    ax.set_xlabel("tokens seen")


def plot_training_loss(metrics: list[dict], bounds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = [m["tokens"] for m in metrics]
    y = [m["loss"] for m in metrics]
    ax.plot(x, y, color="C0", alpha=0.25, linewidth=0.8, label="per step")
    smooth = _smooth(y)
    ax.plot(x, smooth, color="C0", linewidth=1.6, label="smoothed")
    _mark_stages(ax, bounds)
    _tokens_axis(ax)
    ax.set_ylabel("training loss")
    lo = min(smooth) if y else 0
    ax.set_ylim(max(0.0, lo - 0.5), min(max(y), lo + 5) if y else 1)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_validation_loss(evals: list[dict], bounds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    keys = sorted({k for e in evals for k in e["val_loss"]}, key=lambda k: (k not in TOP_DOMAINS, k))
    x = [e["tokens"] for e in evals]
    for i, k in enumerate(keys):
        top = k in TOP_DOMAINS
        ax.plot(
            x,
            [e["val_loss"].get(k) for e in evals],
            marker="o" if top else None,
            markersize=3,
            linewidth=2.0 if top else 1.0,
            linestyle="-" if top else ":",
            color=f"C{i}",
            label=k,
        )
    _mark_stages(ax, bounds)
    _tokens_axis(ax)
    trained = [v for e in evals if e["global_step"] > 0 for v in e["val_loss"].values()]
    if trained:  # the untrained model's loss is far above; let its line leave the top of the plot
        ax.set_ylim(min(trained) - 0.3, max(trained) + 0.5)
    ax.set_ylabel("validation loss (held-out)")
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_learning_rate(metrics: list[dict], bounds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = [m["tokens"] for m in metrics]
    for group in metrics[0]["lr"] if metrics else {}:
        ax.plot(x, [m["lr"][group] for m in metrics], label=group)
    _mark_stages(ax, bounds)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


CODE_TASKS = ("humaneval", "mbpp", "humaneval-infill-single", "humaneval-infill-multi")


def headline_metric(task: str, metrics: dict) -> tuple[str, float | None]:
    """The one number a task is judged by, and its name: pass@1 for code, acc_norm / acc / exact match for
    language, the trained-sample match for memorization."""
    if task in CODE_TASKS:
        return "pass@1", metrics.get("pass@1")
    if task == "memorization":
        return "score", metrics.get("score")
    for key in ("acc_norm", "acc", "exact_match"):
        if isinstance(metrics.get(key), int | float):
            return key, float(metrics[key])
    return "", None


def headline(task: str, metrics: dict) -> float | None:
    return headline_metric(task, metrics)[1]


DATA_TASKS = ("val_loss", "memorization")


def _setting(r: dict) -> tuple:
    """What, besides the checkpoint, decides a record's value: shots, item limit, code sampling, seed, data.
    The data tasks read the recipe's data whatever the limit and seed (records of earlier versions hold them)."""
    if r["task"] in DATA_TASKS:
        return (r.get("shots"), None, r.get("settings"), None, r.get("data"))
    return (r.get("shots"), r.get("limit"), r.get("settings"), r.get("seed"), r.get("data"))


def describe_setting(r: dict, among: Iterable[dict] = ()) -> str:
    """A record's setting in words, e.g. `first 30 items, 25-shot` or `all items, 0-shot, crystal sampling`. Its
    seed and data are named where a record in `among` (the task's other settings) reads the same without them
    (`first 2 items, 0-shot, seed 7`)."""
    described = _describe(r)
    same = [o for o in among if _setting(o) != _setting(r) and _describe(o) == described]
    extra = []
    if any(o.get("seed") != r.get("seed") for o in same):
        extra.append(f"seed {r.get('seed')}")
    if any(o.get("data") != r.get("data") for o in same):
        data = str(r.get("data"))
        is_hash = len(data) == 16 and all(c in "0123456789abcdef" for c in data)
        extra.append(f"data hash {data[:8]}" if is_hash else f"data {data}")
    return ", ".join([described, *extra])


def _describe(r: dict) -> str:
    """Limit, shots and code sampling in words (MMLU's limit is per subject, as lm-eval applies it)."""
    if r.get("limit") is None or r["task"] in DATA_TASKS:
        parts = ["all items"]
    elif r["task"] == "mmlu":
        subjects = r.get("metrics", {}).get("subjects")
        parts = [
            f"first {r['limit']} items " + (f"of each of {subjects} subjects" if subjects else "per subject")
        ]
    else:
        parts = [f"first {r['limit']} items"]
    if r["task"] not in CODE_TASKS and r["task"] != "memorization":
        parts.append(f"{r.get('shots', 0)}-shot")
    if r.get("settings"):
        parts.append(f"{r['settings']} sampling")
    return ", ".join(parts)


def select_series(
    results: list[dict], skip: tuple[str, ...] = ("val_loss",)
) -> tuple[list[dict], dict[str, str], list[str]]:
    """One setting per task (but those in `skip`), so a column, a curve or an average never mixes scores of
    different settings: the setting that covers the most checkpoints (ties: the one written last). Returns its
    records, each task's setting in words, and a line for each setting left out."""
    groups: dict[str, dict[tuple, list[tuple[int, dict]]]] = {}
    for i, r in enumerate(results):
        if r["task"] not in skip:
            groups.setdefault(r["task"], {}).setdefault(_setting(r), []).append((i, r))
    chosen: list[tuple[int, dict]] = []
    described: dict[str, str] = {}
    omitted: list[str] = []
    for task, by_setting in groups.items():

        def rank(item: tuple) -> tuple[int, int]:
            recs = item[1]
            return len({r["weights"] for _, r in recs}), max(i for i, _ in recs)

        ordered = sorted(by_setting.items(), key=rank, reverse=True)
        settings = [recs[0][1] for _, recs in ordered]  # one record of each setting, the chosen one first
        chosen += ordered[0][1]
        described[task] = describe_setting(settings[0], settings)
        for (_, recs), first in zip(ordered[1:], settings[1:], strict=True):
            n = len({r["weights"] for _, r in recs})
            omitted.append(f"{task} ({describe_setting(first, settings)}; {n} checkpoint{'s' * (n != 1)})")
    return [r for _, r in sorted(chosen, key=lambda x: x[0])], described, omitted


def benchmark_table(results: list[dict]) -> tuple[list[str], list[dict]]:
    """Per checkpoint (in token order): tokens, stage and the headline of each scored task, each task in one
    setting (`select_series`); a result evaluated again in that setting: the latest record counts."""
    rows: dict[str, dict] = {}
    for r in select_series(results)[0]:
        row = rows.setdefault(r["weights"], _position(r))
        row[r["task"]] = headline(r["task"], r["metrics"])
    tasks = sorted({k for row in rows.values() for k in row} - {"checkpoint", "tokens", "stage", "step"})
    tasks.sort(key=lambda t: (t == "memorization", t in CODE_TASKS, t))
    return tasks, sorted(rows.values(), key=_order(list(rows.values())))


def _position(r: dict) -> dict:
    """A store record's checkpoint and place in training, as a table row holds them."""
    return {
        "checkpoint": r["checkpoint"],
        "tokens": r["tokens"],
        "stage": r["stage_index"],
        "step": r.get("step"),
    }


def _order(rows: list[dict]):
    """Time order of checkpoints: tokens seen when every one is known; else (stage, step), as imported
    checkpoints often know only those (LLM360's branch names), unknown positions last."""
    if all(r.get("tokens") is not None for r in rows):
        return lambda r: (r["tokens"], r.get("stage") or 0, r.get("step") or 0)

    def key(r: dict) -> tuple:
        stage, step = r.get("stage"), r.get("step")
        return (stage is None, stage or 0, step or 0, r.get("tokens") or 0, r["checkpoint"])

    return key


def checkpoint_axis(rows: list[dict], bounds) -> tuple[list[float], list, Callable[[Any], None]]:
    """Where each row (in `benchmark_table`'s order) goes on the x axis, the stage spans there, and how to
    label the axis: tokens seen when every row knows them, else the checkpoints in order, named by
    (stage, step), with spans from the rows' own stages."""
    if all(r.get("tokens") is not None for r in rows):
        if not bounds:  # a store without training logs: spans from the records
            spans: dict[int, list[float]] = {}
            for r in rows:
                if r.get("stage") is not None:
                    lo, hi = spans.setdefault(r["stage"], [r["tokens"], r["tokens"]])
                    spans[r["stage"]] = [min(lo, r["tokens"]), max(hi, r["tokens"])]
            bounds = [(f"stage {i + 1}", lo, hi) for i, (lo, hi) in sorted(spans.items())]
        return [r["tokens"] for r in rows], bounds, _tokens_axis
    xs = list(range(len(rows)))
    spans = {}
    for x, r in zip(xs, rows, strict=True):
        if r.get("stage") is not None:
            spans.setdefault(r["stage"], [x - 0.4, x + 0.4])[1] = x + 0.4
    labels = [
        f"p{r['stage'] + 1}:{r['step']:,}" if r.get("stage") is not None else r["checkpoint"][:16]
        for r in rows
    ]

    def axis(ax) -> None:
        ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("checkpoint (phase:step; tokens seen unknown)")

    return xs, [(f"stage {i + 1}", lo, hi) for i, (lo, hi) in sorted(spans.items())], axis


def averages(tasks: list[str], rows: list[dict]) -> list[dict]:
    """Language and code averages per checkpoint over the tasks every checkpoint has (so points compare)."""
    common = [t for t in tasks if t != "memorization" and all(row.get(t) is not None for row in rows)]
    language = [t for t in common if t not in CODE_TASKS]
    code = [t for t in common if t in CODE_TASKS]
    out = []
    for row in rows:
        out.append(
            {
                "tokens": row["tokens"],
                "stage": row.get("stage"),
                "step": row.get("step"),
                "checkpoint": row["checkpoint"],
                "language": sum(row[t] for t in language) / len(language) if language else None,
                "code": sum(row[t] for t in code) / len(code) if code else None,
                "language_tasks": language,
                "code_tasks": code,
            }
        )
    return out


def plot_benchmarks(tasks: list[str], rows: list[dict], bounds, path: Path) -> None:
    cols = min(3, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.9 * nrows), squeeze=False)
    xs, bounds, axis = checkpoint_axis(rows, bounds)
    for ax, task in zip(axes.flat, tasks, strict=False):
        pts = [(x, row[task]) for x, row in zip(xs, rows, strict=True) if row.get(task) is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, color="C0")
        _mark_stages(ax, bounds)
        axis(ax)
        ax.set_title(task, fontsize=9, pad=14)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    _save(fig, path, dpi=110)


def plot_language_vs_code(avg: list[dict], bounds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    xs, bounds, axis = checkpoint_axis(avg, bounds)
    for i, key in enumerate(("language", "code")):
        pts = [(x, a[key]) for x, a in zip(xs, avg, strict=True) if a[key] is not None]
        if pts:
            tasks = ", ".join(avg[0][f"{key}_tasks"])
            ax.plot(
                *zip(*pts, strict=True), marker="o", markersize=3, color=f"C{i}", label=f"{key} ({tasks})"
            )
    _mark_stages(ax, bounds)
    axis(ax)
    ax.set_ylabel("average score")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_memorization(records: list[dict], bounds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    rows = [_position(r) | {"metrics": r["metrics"]} for r in records]
    rows.sort(key=_order(rows))
    xs, bounds, axis = checkpoint_axis(rows, bounds)
    for key, label, color in (
        ("score", "trained samples", "C3"),
        ("heldout_score", "held-out (control)", "C7"),
    ):
        pts = [
            (x, r["metrics"][key]) for x, r in zip(xs, rows, strict=True) if r["metrics"].get(key) is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, color=color, label=label)
    _mark_stages(ax, bounds)
    axis(ax)
    ax.set_ylabel("memorization score\n(32-token greedy match)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def analysis_section(run_dir: Path, bounds) -> list[str]:
    """Benchmarks across checkpoints from the sweep store (`crystal eval RUN_DIR --tasks ...`)."""
    results = read_jsonl(run_dir / "eval" / "results.jsonl")
    tasks, rows = benchmark_table(results)
    if not rows or not tasks:
        return [
            "## Benchmarks across checkpoints",
            "",
            "No benchmark results yet: `crystal eval RUN_DIR --tasks arc_easy,hellaswag,humaneval,memorization` "
            "evaluates every checkpoint, then run `crystal report` again.",
        ]
    lines = ["## Benchmarks across checkpoints", ""]
    lines += [
        "| checkpoint | stage | step | tokens | " + " | ".join(tasks) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for row in rows:
        cells = " | ".join(_fmt(row.get(t)) for t in tasks)
        stage = "–" if row.get("stage") is None else row["stage"] + 1
        step = "–" if row.get("step") is None else f"{row['step']:,}"
        tokens = "–" if row["tokens"] is None else f"{row['tokens']:,}"
        lines.append(f"| {row['checkpoint']} | {stage} | {step} | {tokens} | {cells} |")
    _, settings, omitted = select_series(results)
    lines += [
        "",
        "Headline metric per task: pass@1 for code, acc_norm (else acc, else exact match) for language, "
        "the trained-sample match for memorization. Each column, curve and average holds one setting: "
        + "; ".join(f"{t}: {settings[t]}" for t in tasks)
        + ".",
        "",
    ]
    if omitted:
        lines += [
            "Left out of the table and plots (another setting than the column's): "
            + "; ".join(omitted)
            + ".",
            "",
        ]
    scored = [t for t in tasks if t != "memorization"]
    if scored:
        plot_benchmarks(scored, rows, bounds, run_dir / "benchmarks.png")
        lines += ["![benchmarks across checkpoints](benchmarks.png)", ""]
        avg = averages(tasks, rows)
        if any(a["language"] is not None or a["code"] is not None for a in avg):
            plot_language_vs_code(avg, bounds, run_dir / "language_vs_code.png")
            lines += ["![language average and code average](language_vs_code.png)", ""]
    memo = [r for r in select_series(results)[0] if r["task"] == "memorization"]
    scored_memo = [r for r in memo if r["metrics"].get("score") is not None]
    if scored_memo:
        plot_memorization(scored_memo, bounds, run_dir / "memorization.png")
        names = {r["checkpoint"] for r in scored_memo}
        last = next(r for r in reversed(rows) if r["checkpoint"] in names)
        last = next(r for r in scored_memo if r["checkpoint"] == last["checkpoint"])["metrics"]
        lines += [
            "![memorization across checkpoints](memorization.png)",
            "",
            f"Memorization at the last checkpoint: {_fmt(last['score'])} of 32 greedy tokens reproduced on "
            f"trained samples ({last['n']} probes), {_fmt(last['heldout_score'])} on held-out text.",
            "",
        ]
    unscored = [r for r in memo if r["metrics"].get("score") is None and r["metrics"].get("reason")]
    if unscored:
        lines += ["Memorization not measured:", ""]
        lines += [f"- {r['checkpoint']}: {r['metrics']['reason']}" for r in unscored] + [""]
    return lines


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` and its PNG plots into RUN_DIR (from metrics.jsonl, eval.jsonl, summary.json)."""
    run_dir = Path(run_dir)
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    if not metrics:
        if read_jsonl(run_dir / "eval" / "results.jsonl"):
            return write_store_report(run_dir)
        raise FileNotFoundError(
            f"{run_dir}: neither a run folder (no metrics.jsonl records) nor a sweep store (no "
            "eval/results.jsonl records: `crystal eval CKPT... --store DIR/eval/results.jsonl` writes one)"
        )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": []}
    bounds = _stage_bounds(metrics)
    plot_training_loss(metrics, bounds, run_dir / "train_loss.png")
    plot_validation_loss(evals, bounds, run_dir / "val_loss.png")
    plot_learning_rate(metrics, bounds, run_dir / "learning_rate.png")

    domains = sorted({k for e in evals for k in e["val_loss"]}, key=lambda k: (k not in TOP_DOMAINS, k))
    lines = [f"# Run report: {summary.get('recipe', run_dir.name)}", ""]
    if not summary.get("complete"):
        lines += ["*The run is not complete; figures cover what has been trained so far.*", ""]
    lines += ["## Stages", "", "| stage | tokens | wall (s) | mixture | FIM |", "|---|---:|---:|---|---:|"]
    for s in summary["stages"]:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in _normalised(s["mixture"]).items())
        lines.append(f"| {s['name']} | {s['tokens']:,} | {s['wall_s']:.0f} | {mix} | {s['fim_rate']} |")
    header = ["| stage | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    lines += ["", "## Validation loss at the end of each stage", "", *header]
    start = evals[0]["val_loss"] if evals else {}
    prev = None
    for s in summary["stages"]:
        lines.append(
            f"| {s['name']} | " + " | ".join(_fmt((s["val_loss"] or {}).get(d)) for d in domains) + " |"
        )
    lines += [
        "",
        "Change over each stage (end of stage vs end of the one before; stage 1 vs the model before training):",
        "",
        *header,
    ]
    for s in summary["stages"]:
        end = s["val_loss"] or {}
        base = prev if prev is not None else start
        cells = [f"{(end[d] - base[d]) / base[d]:+.1%}" if d in end and d in base else "–" for d in domains]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
        prev = end or prev
    lines += ["", *analysis_section(run_dir, bounds)]
    lines += [
        "",
        "## Plots",
        "",
        "![training loss](train_loss.png)",
        "",
        "![validation loss per domain](val_loss.png)",
        "",
        "![learning rate per muP group](learning_rate.png)",
        "",
        f"Checkpoints: {len(evals)} evaluated; logs: `metrics.jsonl` (every step), `eval.jsonl` "
        "(every checkpoint).",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_store_report(folder: Path) -> Path:
    """`report.md` of a folder that holds only a sweep store (`eval/results.jsonl`), e.g. benchmarks of
    imported LLM360 checkpoints: the benchmarks across checkpoints, without training plots."""
    results = read_jsonl(folder / "eval" / "results.jsonl")
    lines = [
        f"# Evaluation report: {folder.resolve().name}",
        "",
        f"From the sweep store `eval/results.jsonl` alone ({len(results)} records): no training logs here, so "
        "no training or validation-loss plots.",
        "",
        *analysis_section(folder, []),
    ]
    # One row per checkpoint: one setting (data), and of a checkpoint's records in it the latest.
    chosen, _, val_omitted = select_series([r for r in results if r["task"] == "val_loss"], skip=())
    val = list({r["weights"]: r for r in chosen}.values())
    if val:
        order = _order([_position(r) for r in val])
        val.sort(key=lambda r: order(_position(r)))
        keys = sorted({k for r in val for k in r["metrics"]}, key=lambda k: (k not in TOP_DOMAINS, k))
        lines += [
            "## Validation loss",
            "",
            "| checkpoint | " + " | ".join(keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        lines += [
            f"| {r['checkpoint']} | " + " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " |"
            for r in val
        ]
        lines.append("")
        if val_omitted:
            lines += [f"Left out of the table (another setting than its own): {'; '.join(val_omitted)}.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _normalised(mixture: dict[str, float]) -> dict[str, float]:
    total = sum(mixture.values())
    return {k: v / total for k, v in mixture.items()}
