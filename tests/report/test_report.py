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
