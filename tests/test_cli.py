"""The `crystal` command line on real data."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .conftest import REPO


def crystal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystal_lm.cli", *args], capture_output=True, text=True)


@pytest.fixture()
def crystal_here(capsys):
    """The command line in this process, for exit codes and messages: no interpreter start-up (and torch
    import) per call. An exception the CLI does not turn into a message fails the test."""
    from crystal_lm.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


def test_info_prints_the_7b_parameter_count(crystal_here):
    out = crystal("info", str(REPO / "recipes" / "crystal-7b.yaml"))  # the installed entry point
    assert out.returncode == 0 and "6,575,278,720 parameters" in out.stdout
    info = json.loads(crystal_here("info", str(REPO / "recipes" / "tiny.yaml"), "--json").stdout)
    assert [s["name"] for s in info["stages"]] == ["stage1", "stage2", "stage3"]


def test_info_says_when_a_stage_budget_is_rounded_to_whole_steps(recipe_dict, write_recipe, crystal_here):
    recipe_dict["stages"][0]["tokens"] = 500  # 4 x 64 = 256 tokens a step: 1 step of 256
    out = crystal_here("info", str(write_recipe(recipe_dict)))
    assert "stage1: 1 step, 256 tokens (recipe: 500, in whole steps)" in out.stdout
    assert "stage2: 6 steps, 1,536 tokens, FIM" in out.stdout  # a multiple of a step: nothing to say


def test_bad_recipe_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "recipes" / "tiny.yaml").read_text().replace("checkpoint_every: 50", "checkpoint_evry: 50", 1)
    )
    out = crystal("info", str(bad))
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and "stages[0].checkpoint_evry: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_infill_eval_and_report(trained_run, crystal_here):
    _, run_dir, summary = trained_run
    ckpt = str(run_dir / "checkpoints" / "phase3_checkpoint_000004")
    out = crystal_here("generate", ckpt, "--prompt", "import ", "--max-new-tokens", "8", "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("import ")
    out = crystal_here(
        "infill",
        ckpt,
        "--prefix",
        "def f(x):\n    return ",
        "--suffix",
        "\n",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert out.returncode == 0 and set(json.loads(out.stdout)) == {"prefix", "middle", "suffix"}
    out = crystal_here("eval", ckpt, "--json", "--store", str(run_dir / "cli-eval.jsonl"))
    assert out.returncode == 0, out.stderr
    (record,) = json.loads(out.stdout)
    assert abs(record["metrics"]["code"] - summary["stages"][2]["val_loss"]["code"]) < 1e-6
    out = crystal_here("report", str(run_dir))
    assert out.returncode == 0 and (run_dir / "report.md").is_file()


def test_export_import_and_info_round_trip(trained_run, tmp_path, crystal_here):
    _, run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "phase3_checkpoint_000004"
    out = crystal_here("export", str(ckpt), "--out", str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    out = crystal_here("import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr
    counts = [
        json.loads(crystal_here("info", str(p), "--json").stdout)["parameters"]
        for p in (ckpt, tmp_path / "hf", tmp_path / "back")
    ]
    assert counts[0] == counts[1] == counts[2] > 0
    again = crystal_here("export", str(ckpt), "--out", str(tmp_path / "hf"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_coord_check_command(tmp_path, crystal_here):
    out = crystal_here("mup", "coord-check", "--out", str(tmp_path), "--widths", "64,128", "--steps", "2")
    assert out.returncode == 0, out.stderr
    assert "mup:" in out.stdout and (tmp_path / "coord_check.png").is_file()


def test_eval_code_scores_a_completions_file(tmp_path, crystal_here):
    from crystal_lm.eval.code import load_benchmark

    tasks = load_benchmark("humaneval")[:6]
    lines = [{"task_id": t.task_id, "completion": t.canonical} for t in tasks[:3]]
    lines += [{"task_id": t.task_id, "completion": "    return None\n"} for t in tasks[3:]]
    completions = tmp_path / "c.jsonl"
    completions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = crystal_here(
        "eval-code",
        "humaneval",
        "--completions",
        str(completions),
        "--out",
        str(tmp_path / "r.json"),
        "--limit",
        "6",  # the first 6 problems: without it every one needs a completion
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["pass@1"] == 0.5 and result["tasks"] == 6
    assert result["per_task"][tasks[0].task_id]["results"][0]["status"] == "passed"


def test_data_order_sample_and_stats_commands(trained_run, crystal_here):
    """The published order through the CLI, from the run folder's recorded recipe, agrees with training."""
    from crystal_lm.data.loader import StageData
    from crystal_lm.data.prepare import prepare_data

    recipe, run_dir, _ = trained_run
    out = crystal_here(
        "data", "order", str(run_dir), "--stage", "2", "--start", "4", "--count", "3", "--json"
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in records] == [4, 5, 6] and all(r["step"] == 1 for r in records)
    stage = StageData(recipe, prepare_data(recipe), 1)
    assert [r["source"] for r in records] == [stage.sample(i)[3] for i in (4, 5, 6)]
    out = crystal_here("data", "sample", str(run_dir), "--stage", "stage2", "--index", "5", "--json")
    sample = json.loads(out.stdout)
    assert sample["input_ids"] == stage.sample(5)[0].tolist()
    assert sample["loss_mask"] == stage.sample(5)[2].astype(int).tolist()
    out = crystal_here("data", "stats", str(run_dir))
    assert out.returncode == 0 and "stage3" in out.stdout and "python" in out.stdout
    out = crystal_here("data", "order", str(run_dir), "--stage", "2", "--start", "10000", "--count", "1")
    assert out.returncode == 2 and "out of range" in out.stderr and "Traceback" not in out.stderr
    out = crystal_here("data", "order", str(run_dir), "--stage", "7")
    assert out.returncode == 2 and "stages 1-3" in out.stderr


def test_data_commands_number_stages_from_1_and_stats_count_real_tokens(
    prepared, recipe_dict, write_recipe, crystal_here
):
    """`--stage 2` gives records saying stage 2; stats show samples, real tokens and epochs (the padding left
    out of the tokens is checked against the trainer's loss positions in tests/data/test_order.py)."""
    path = write_recipe(recipe_dict)
    out = crystal_here("data", "order", str(path), "--stage", "2", "--count", "3", "--json")
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["stage"] for r in records] == [2, 2, 2] and all(r["document_fim"] is False for r in records)
    out = crystal_here("data", "sample", str(path), "--stage", "stage3", "--index", "0", "--json")
    assert json.loads(out.stdout)["stage"] == 3
    rows = json.loads(crystal_here("data", "stats", str(path), "--json").stdout)
    assert sorted({r["stage"] for r in rows}) == [1, 2, 3]
    out = crystal_here("data", "stats", str(path))
    header, *lines = out.stdout.splitlines()
    assert header.split() == ["stage", "source", "samples", "tokens", "share", "epochs", "FIM"]
    for r in rows:
        line = next(x for x in lines if x.startswith(f"{r['stage']} {r['stage_name']}") and r["source"] in x)
        assert f"{r['samples']:,}" in line and f"{r['tokens']:,}" in line and f"{r['epochs']:.3f}" in line
    assert "padding left out" in out.stdout


def test_release_verify_and_unreachable_push(trained_run, tmp_path, crystal_here):
    _, run_dir, _ = trained_run
    out = crystal_here("release", str(run_dir), "--out", str(tmp_path / "rel"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rel" / "README.md").is_file()
    out = crystal_here("verify", str(tmp_path / "rel"))
    assert out.returncode == 0 and "release OK" in out.stdout, out.stdout + out.stderr
    (tmp_path / "rel" / "recipe.yaml").write_text("altered\n")
    out = crystal_here("verify", str(tmp_path / "rel"), "--skip-data")
    assert out.returncode == 1 and "ALTERED  recipe.yaml" in out.stdout
    out = crystal_here("release", str(run_dir), "--out", str(tmp_path / "rel"))
    assert out.returncode == 2 and "--overwrite" in out.stderr
    missing = f"file://{tmp_path / 'no-hub.git'}"
    out = crystal_here("release", str(run_dir), "--out", str(tmp_path / "rel2"), "--push", missing)
    assert out.returncode == 2 and "cannot reach" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "rel2").exists()  # nothing built before the hub was found unreachable


def test_generate_options_take_escapes_and_bad_values_are_clear_errors(trained_run, tmp_path, crystal_here):
    from crystal_lm.cli import unescape

    # As a shell passes them: backslash escapes decoded, non-ASCII text and unknown escapes left alone.
    assert unescape(r"def add(a, b):\n    return ") == "def add(a, b):\n    return "
    assert unescape(r"é→\t\\n C:\dir \x41") == "é→\t\\n C:\\dir A"
    _, run_dir, _ = trained_run
    ckpt = str(run_dir / "checkpoints" / "phase3_checkpoint_000004")
    out = crystal_here("generate", ckpt, "--prompt", r"a\nb", "--max-new-tokens", "2", "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("a\nb"), out.stderr
    for bad, message in (
        (["--prompt", "x " * 100], r"the prompt is \d+ tokens, the model's context is 64: shorten it"),
        (["--prompt", "x", "--top-k", "-5"], "top_k: must be a positive number"),
    ):
        out = crystal_here("generate", ckpt, *bad)
        assert out.returncode == 2 and re.search(f"crystal: error: {message}", out.stderr), out.stderr
    # A run folder exports its newest checkpoint, as generate reads it.
    out = crystal_here("export", str(run_dir), "--out", str(tmp_path / "hf"))
    assert out.returncode == 0 and (tmp_path / "hf" / "config.json").is_file(), out.stderr


def test_a_file_in_place_of_a_folder_is_a_one_line_error_naming_it(
    recipe_dict, write_recipe, tmp_path, crystal_here
):
    recipe = str(write_recipe(recipe_dict))
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for args, message in (
        (["train", recipe, "--out", str(afile)], f"{afile}: File exists"),
        (["train", recipe, "--out", str(afile / "sub")], f"{afile / 'sub'}: Not a directory"),
        (["data", "prepare", recipe, "--cache-dir", str(afile)], f"{afile}"),
    ):
        out = crystal_here(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert (
            f"crystal: error: {message}" in out.stderr and "a file is where a folder is needed" in out.stderr
        )


def test_a_diverged_run_is_a_clear_error_naming_the_checkpoint_to_start_from(
    recipe_dict, write_recipe, tmp_path, monkeypatch, capsys
):
    """The guard's stop used to be a traceback whose advice ("lower the LR, then resume") the run folder
    refuses; it now names the last good checkpoint and the --init-from command."""
    import crystal_lm.train.trainer as trainer
    from crystal_lm.cli import main

    d = dict(recipe_dict, train={**recipe_dict["train"], "max_skipped_in_row": 2})
    recipe = write_recipe(d)
    real, calls = trainer.compute_gradients, []

    def diverging(*args):
        calls.append(1)
        return real(*args) if len(calls) <= 4 else float("inf")

    monkeypatch.setattr(trainer, "compute_gradients", diverging)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    good = run / "checkpoints" / "phase1_checkpoint_000003"
    assert "crystal: error: stage1 step 6: 2 steps in a row skipped (last: non-finite loss (inf))" in err
    assert f"--init-from {good}" in err and "from stage 1 on" in err and good.is_dir()


def test_plan_refuses_impossible_layouts_and_bad_numbers(crystal_here):
    tiny = str(REPO / "recipes" / "tiny.yaml")
    for args, message in (
        (["--gpus", "0"], "argument --gpus: '0' must be positive"),
        (["--gpus", "-2"], "argument --gpus: '-2' must be positive"),
        (["--mfu", "0"], "argument --mfu: '0' must be positive and at most 1"),
        (["--peak-tflops", "0"], "argument --peak-tflops: '0' must be positive"),
        (["--gpu-memory", "nan"], "argument --gpu-memory: 'nan' must be positive"),
        (["--micro-batch", "-1"], "argument --micro-batch: '-1' must be positive"),
        (["--gpus", "32"], "not possible on 32 GPU(s), training would refuse it: train.batch_size 16"),
    ):
        out = crystal_here("plan", tiny, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = crystal_here("plan", tiny, "--gpus", "4")
    assert out.returncode == 0 and "micro-batch 4 × " in out.stdout, out.stderr


def test_data_order_and_eval_messages_say_what_is_wrong(trained_run, tmp_path, crystal_here):
    _, run_dir, _ = trained_run
    out = crystal_here("data", "order", str(run_dir), "--stage", "2", "--count", "-5")
    assert out.returncode == 2 and "argument --count: '-5' must be positive" in out.stderr
    out = crystal_here("data", "order", str(run_dir), "--stage", "2", "--start", "-1")
    assert out.returncode == 2 and "argument --start: '-1' must be at least 0" in out.stderr
    out = crystal_here("data", "order", str(run_dir), "--stage", "2", "--start", "10000", "--count", "1")
    assert (
        "crystal: error: stage 2 'stage2': sample 10000 out of range" in out.stderr
    )  # --stage counts from 1
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "recipe.json").write_text((run_dir / "recipe.json").read_text())
    out = crystal_here("eval", str(empty))
    assert (
        out.returncode == 2 and f"crystal: error: {empty}: a run folder with no checkpoints yet" in out.stderr
    )
    out = crystal_here("eval", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and f"crystal: error: {tmp_path / 'nowhere'}: does not exist" in out.stderr


def test_import_options_and_export_shard_size_are_checked(trained_run, tmp_path, crystal_here):
    _, run_dir, _ = trained_run
    ckpt = str(run_dir / "checkpoints" / "phase3_checkpoint_000004")
    for bad in ("0", "-1"):
        out = crystal_here("export", ckpt, "--out", str(tmp_path / "hf"), "--max-shard-gb", bad)
        assert out.returncode == 2 and f"argument --max-shard-gb: '{bad}' must be positive" in out.stderr
    assert not (tmp_path / "hf").exists()
    hf = tmp_path / "CrystalCoder_phase3_checkpoint_000004"
    assert crystal_here("export", ckpt, "--out", str(hf)).returncode == 0
    out = crystal_here("import", str(hf), "--out", str(tmp_path / "a"))
    assert (
        out.returncode == 0
        and "position: phase 3, step 4, tokens unknown (phase and step from the folder name" in out.stderr
    )
    out = crystal_here(
        "import", str(hf), "--out", str(tmp_path / "b"), "--phase", "2", "--step", "7", "--tokens", "900"
    )
    assert (
        out.returncode == 0
        and "position: phase 2, step 7, 900 tokens (--phase, --step, --tokens given)" in out.stderr
    )
    out = crystal_here("import", str(hf), "--out", str(tmp_path / "c"), "--phase", "0")
    assert out.returncode == 2 and "argument --phase: '0' must be positive" in out.stderr


def test_a_missing_benchmark_package_is_named_with_the_make_target(
    trained_run, crystal_here, monkeypatch, tmp_path
):
    """After `make demo` alone (no lm-eval), a language benchmark was a ModuleNotFoundError traceback."""
    _, run_dir, _ = trained_run
    for name in ("crystal_lm.eval.harness", "crystal_lm.eval.language"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-eval raises
    ckpt = str(run_dir / "checkpoints" / "phase3_checkpoint_000004")
    out = crystal_here(
        "eval-lm", ckpt, "--tasks", "arc_easy", "--limit", "1", "--out", str(tmp_path / "r.json")
    )
    assert out.returncode == 2
    assert "package 'lm_eval' is not installed; `make dev` installs" in out.stderr


def test_data_order_of_a_run_refuses_data_changed_since_it_trained(
    trained_run, recipe_dict, write_recipe, tmp_path, crystal_here
):
    """`data order RUN` showed, with no word, the order of whatever the source files hold now: after a line
    was appended to a source it named other samples than those the run trained on."""
    from crystal_lm.config import load_recipe
    from crystal_lm.data.prepare import prepare_data
    from crystal_lm.train.run_dir import claim_run_dir

    _, trained, _ = trained_run
    notes = tmp_path / "notes.jsonl"
    paragraphs = [p for p in (REPO / "README.md").read_text().split("\n\n") if len(p) > 200]
    notes.write_text("".join(json.dumps({"id": str(i), "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    recipe_dict["data"]["tokenizer"] = {"path": str(trained / "tokenizer.json")}
    recipe_dict["data"]["sources"] = {"notes": {"domain": "text", "path": str(notes)}}
    for stage in recipe_dict["stages"]:
        stage["mixture"] = {"notes": 1.0}
        stage.pop("fim", None)
    recipe = load_recipe(write_recipe(recipe_dict))
    run = tmp_path / "run"  # what training records before its first step
    claim_run_dir(recipe, run)
    (run / "data_manifest.json").write_text(json.dumps(prepare_data(recipe).manifest()))

    before = crystal_here("data", "order", str(run), "--stage", "1", "--count", "8", "--json")
    assert before.returncode == 0, before.stderr
    with notes.open("a") as f:
        f.write(json.dumps({"id": "new", "text": paragraphs[0][::-1]}) + "\n")
    for command in (("order", "--count", "8"), ("sample", "--index", "1"), ("stats",)):
        out = crystal_here(
            "data", command[0], str(run), *(("--stage", "1") if command[0] != "stats" else ()), *command[1:]
        )
        assert out.returncode == 2, out.stdout
        assert (
            f"{run}: the data its recipe prepares now differs" in out.stderr and "notes/train" in out.stderr
        )
    assert (
        crystal_here("data", "order", str(recipe.source_file), "--stage", "1", "--count", "8").returncode == 0
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval-lm", "CKPT", "--batch-size", "0"], "argument --batch-size: '0' must be positive"),
        (["eval-lm", "CKPT", "--batch-size", "-1"], "argument --batch-size: '-1' must be positive"),
        (["eval-lm", "CKPT", "--shots", "arc_easy=x"], "argument --shots: 'x' (arc_easy) is not an integer"),
        (
            ["eval-lm", "CKPT", "--shots", "arc_easy=-1"],
            "argument --shots: '-1' (arc_easy) must be at least 0",
        ),
        (["eval-lm", "CKPT", "--shots", "arc_easy"], "argument --shots: 'arc_easy' is not NAME=SHOTS"),
        (
            ["eval-lm", "CKPT", "--shots", "foo=1"],
            "argument --shots: unknown benchmark 'foo' (known: arc_challenge",
        ),
        (
            ["eval-code", "humaneval", "--completions", "c.jsonl", "--workers", "-1"],
            "argument --workers: '-1'",
        ),
        (["eval-code", "humaneval", "--completions", "c.jsonl", "--workers", "0"], "argument --workers: '0'"),
    ],
)
def test_bad_eval_option_values_are_errors_naming_the_option(args, message, tmp_path, crystal_here):
    """--batch-size 0 failed deep in the harness ("range() arg 3 must not be zero") and -1 ran with 8; a
    non-number in --shots was a bare int() error and an unknown benchmark was ignored; --workers -1 failed as
    "max_workers must be greater than 0". Each is now argparse's error, naming the option."""
    out = crystal_here(*args, "--out", str(tmp_path / "r.json"))
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_harness_refuses_a_batch_size_below_one(trained_run):
    """The lm-eval model itself (reachable without the CLI: `model_args="batch_size=..."`) refuses one, rather
    than running with 8."""
    from crystal_lm.eval.harness import CrystalLM

    _, run_dir, _ = trained_run
    ckpt = str(run_dir / "checkpoints" / "phase1_checkpoint_000003")
    assert CrystalLM(ckpt, batch_size="3").batch_size == 3
    for bad in ("0", "-1", "auto"):
        with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, not '{bad}'"):
            CrystalLM(ckpt, batch_size=bad)


def test_eval_names_a_target_that_is_no_run_or_checkpoint_before_asking_for_a_store(tmp_path, crystal_here):
    """An empty folder was first 'not inside a run folder; pass --store RESULTS.jsonl', and only with --store
    'neither a run folder nor a checkpoint folder'."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for store in ([], ["--store", str(tmp_path / "r.jsonl")]):
        out = crystal_here("eval", str(empty), "--tasks", "humaneval", *store)
        assert out.returncode == 2 and f"{empty}: neither a run folder nor a checkpoint folder" in out.stderr
        assert "--store" not in out.stderr


def test_eval_task_lists_ignore_empty_names(trained_run, tmp_path, crystal_here):
    """`--tasks val_loss,` (a trailing comma) was refused as 'unknown task(s) ; known: ...'; a list with no name
    at all names the option."""
    _, run_dir, _ = trained_run
    ckpt = str(run_dir / "checkpoints" / "phase1_checkpoint_000003")
    store = str(tmp_path / "r.jsonl")
    out = crystal_here("eval", ckpt, "--tasks", "val_loss,", "--store", store, "--json")
    assert out.returncode == 0, out.stderr
    assert [r["task"] for r in json.loads(out.stdout)] == ["val_loss"]
    out = crystal_here("eval", ckpt, "--tasks", " arc_easy, ,bogus", "--store", store)
    assert out.returncode == 2 and "unknown task(s) bogus; known:" in out.stderr
    for command in (["eval", ckpt, "--store", store], ["eval-lm", ckpt, "--out", store]):
        out = crystal_here(*command, "--tasks", " , ")
        assert out.returncode == 2 and "argument --tasks: no task named in ' , '" in out.stderr, out.stderr
