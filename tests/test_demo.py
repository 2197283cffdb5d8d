"""The demo recipe end to end (slow: several minutes on 2 cores). Checks the figures the foundation promises:
each domain's validation loss falls while it is trained, and code loss at the end of stage 2 is at least 20%
below its value at the end of stage 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from crystal_lm.train.metrics import read_jsonl

from .conftest import REPO


@pytest.mark.slow
def test_tiny_recipe_learns_like_the_paper_describes(tmp_path):
    run_dir = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = str(REPO / ".cache" / "crystal-lm")
    for cmd in (
        ["train", str(REPO / "recipes" / "tiny.yaml"), "--out", str(run_dir), "--cache-dir", cache],
        ["report", str(run_dir)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "crystal_lm.cli", *cmd], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    s1, s2, s3 = summary["stages"]
    assert summary["complete"]
    # Code loss drops through stage 2, when code becomes ~63% of the mixture.
    assert s2["val_loss"]["code"] <= 0.8 * s1["val_loss"]["code"]
    # Every domain improves over the stage that trains it most (text: stage 1; code: stages 2 and 3).
    evals = read_jsonl(run_dir / "eval.jsonl")
    first = evals[0]["val_loss"]
    assert s1["val_loss"]["text"] < first["text"] and s1["val_loss"]["prose"] < first["prose"]
    assert s1["val_loss"]["technical"] < first["technical"]
    for key in ("code", "python", "web"):
        assert s2["val_loss"][key] < s1["val_loss"][key]
        assert s3["val_loss"][key] < s2["val_loss"][key] + 0.05
    for name in ("train_loss.png", "val_loss.png", "report.md"):
        assert (run_dir / name).is_file()
