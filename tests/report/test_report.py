"""The run report: Markdown with per-stage tables and PNG plots with stage boundaries."""

from __future__ import annotations

from crystal_lm.report.report import write_report


def test_report_has_tables_and_plots(trained_run):
    _, run_dir, summary = trained_run
    path = write_report(run_dir)
    text = path.read_text()
    for stage in ("stage1", "stage2", "stage3"):
        assert f"| {stage} |" in text
    assert "| stage | code |" in text or "code" in text.split("## Validation loss")[1].splitlines()[2]
    for png in ("train_loss.png", "val_loss.png", "learning_rate.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({png})" in text
    code_end = summary["stages"][1]["val_loss"]["code"]
    assert f"{code_end:.3f}" in text


def test_report_analyses_benchmarks_across_checkpoints(trained_run):
    """A real sweep (language, code, memorization) over every checkpoint, then the analysis section."""
    from crystal_lm.eval.sweep import sweep
    from crystal_lm.report.report import averages, benchmark_table

    recipe, run_dir, _ = trained_run
    store = run_dir / "eval" / "results.jsonl"
    store.parent.mkdir(exist_ok=True)
    records = sweep(
        [run_dir], ["arc_easy", "mbpp", "memorization"], store, limit=2, recipe=recipe, log=lambda m: None
    )
    tasks, rows = benchmark_table(records)
    assert tasks == ["arc_easy", "mbpp", "memorization"]
    assert [row["tokens"] for row in rows] == sorted(row["tokens"] for row in rows) and len(rows) == 6
    avg = averages(tasks, rows)
    assert avg[0]["language_tasks"] == ["arc_easy"] and avg[0]["code_tasks"] == ["mbpp"]
    assert all(a["language"] == row["arc_easy"] for a, row in zip(avg, rows, strict=True))
    text = write_report(run_dir).read_text()
    assert "## Benchmarks across checkpoints" in text and "| phase3_checkpoint_000004 |" in text
    for png in ("benchmarks.png", "language_vs_code.png", "memorization.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in text
    final_memo = next(
        r for r in records if r["task"] == "memorization" and r["step"] == 4 and r["stage_index"] == 2
    )
    assert f"{final_memo['metrics']['score']:.3f} of 32 greedy tokens" in text
