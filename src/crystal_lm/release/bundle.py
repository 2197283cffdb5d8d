"""`crystal release RUN_DIR --out RELEASE_DIR`: a self-describing bundle of a run.

Layout (the top level is itself a Hugging Face model folder holding the final model):

    README.md                 model card (Hugging Face front matter)
    config.json, *.safetensors, tokenizer*, ...   the final checkpoint in LLM360's layout
    checkpoints/<name>_phase{N}_checkpoint_{step:06d}/   every permanent checkpoint (all of them unless
                              the run has a retention policy) in the same layout, named like
                              LLM360's branches; `crystal_state/` holds its training state (and the
                              optimizer, with --with-optimizer) so training resumes from it
    recipe.json, recipe.yaml  the recipe as run, every default resolved
    init_from.json            the checkpoint training started from, for a run started with --init-from
    data/manifest.json        corpus sources (versions, licences, sha256), tokenizer and shard hashes
    data/order.json           per stage: what defines the order and a fingerprint of it
    logs/                     metrics.jsonl (every step), eval.jsonl, summary.json
    eval/results.jsonl        the benchmark sweep store, when the run was evaluated
    report/                   report.md and its plots
    MANIFEST                  sha256, size and path of every other file

The bundle is written into a temporary folder and renamed into place, so a killed build leaves nothing that
looks like a release.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from crystal_lm.config import Recipe, recipe_from_dict
from crystal_lm.files import sha256_file
from crystal_lm.train.checkpoint import list_checkpoints, load_state, verify_checkpoint

MANIFEST = "MANIFEST"


class ReleaseError(RuntimeError):
    pass


def branch_name(recipe_name: str, checkpoint: str) -> str:
    """LLM360's branch naming: `<name>_phase{N}_checkpoint_{step:06d}` (name made git-ref safe)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', recipe_name)}_{checkpoint}"


def write_manifest(root: Path) -> Path:
    """`MANIFEST`: one `sha256  size  path` line per file under `root` (sorted, the manifest excluded)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        lines.append(f"{sha256_file(path)}  {path.stat().st_size}  {rel}")
    out = root / MANIFEST
    out.write_text("\n".join(lines) + "\n")
    return out


def read_manifest(root: Path) -> dict[str, tuple[str, int]]:
    path = root / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{root}: no {MANIFEST} (not a release folder, or an unfinished one)")
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split("  ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise ReleaseError(f"{path}:{lineno}: expected 'sha256  size  path', got {line[:80]!r}")
        out[parts[2]] = (parts[0], int(parts[1]))
    return out


def run_recipe(run_dir: Path) -> tuple[Recipe, dict]:
    record_path = run_dir / "recipe.json"
    if not record_path.is_file():
        raise ReleaseError(f"{run_dir}: no recipe.json; is this a run folder made by `crystal train`?")
    record = json.loads(record_path.read_text())
    return recipe_from_dict(record["recipe"], record.get("source_file")), record


def data_order(recipe: Recipe, data) -> dict:
    """What defines each stage's order (seed, stage, batch, mixture over shard sets of known hashes) and a
    fingerprint of records recomputed from it; `crystal verify` recomputes and compares."""
    from crystal_lm.data.order import order_fingerprint, order_records, stage_samples

    stages = []
    for i, stage in enumerate(recipe.stages):
        stages.append(
            {
                "stage": i + 1,
                "name": stage.name,
                "samples": stage_samples(recipe, i),
                "steps": recipe.stage_steps(stage),
                "batch_size": recipe.train.batch_size,
                "seq_len": recipe.data.seq_len,
                "mixture": stage.mixture,
                "fim": {"rate": stage.fim.rate, "rates": stage.fim.rates, "spm_rate": stage.fim.spm_rate},
                "fingerprint": order_fingerprint(recipe, data, i),
                "first_records": order_records(recipe, data, i, 0, 2),
            }
        )
    return {
        "seed": recipe.seed,
        "tokenizer_sha256": data.tokenizer.sha256,
        "recompute": "crystal data order RELEASE_DIR --stage N --start S --count C --json",
        "stages": stages,
    }


def build_release(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    with_optimizer: bool = False,
    dtype: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Bundle `run_dir` as LLM360 published Crystal into `out_dir` (see the module's docstring). The data
    order is recomputed from the recipe's data, read from `cache_dir` when given (else the recipe's)."""
    from crystal_lm.data.prepare import manifest_differences, prepare_data
    from crystal_lm.interop.llm360 import export_hf
    from crystal_lm.release.model_card import model_card
    from crystal_lm.report.report import write_report
    from crystal_lm.train.retention import is_permanent

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    t0 = time.time()
    from crystal_lm.interop.llm360 import refuse_source_as_target

    # A release inside the run folder is fine (only that folder is replaced); the run folder itself is not.
    refuse_source_as_target(out_dir, [run_dir], "the run folder", inside_ok=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ReleaseError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    recipe, record = run_recipe(run_dir)

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ReleaseError(f"{run_dir}: no checkpoints to release")
    # Permanent checkpoints (all of them without a retention policy), and the newest as the final model.
    checkpoints = [c for c in found[:-1] if is_permanent(c, recipe)] + found[-1:]
    for ckpt in checkpoints:
        verify_checkpoint(ckpt)  # a damaged checkpoint stops the release: nothing is published half-right
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        released = []
        for ckpt in checkpoints:
            name = branch_name(recipe.name, ckpt.name)
            target = tmp / "checkpoints" / name
            export_hf(ckpt, target, dtype=dtype)
            state_dir = target / "crystal_state"
            state_dir.mkdir()
            for f in ("state.json", "config.json") + (("optimizer.pt",) if with_optimizer else ()):
                shutil.copyfile(ckpt / f, state_dir / f)
            if with_optimizer and (ckpt / "optimizer").is_dir():  # the sharded optimizer state
                shutil.copytree(ckpt / "optimizer", state_dir / "optimizer")
            state = load_state(ckpt)
            released.append(
                {
                    "name": name,
                    "checkpoint": ckpt.name,
                    "stage": state.stage_index + 1,
                    "step": state.step,
                    "tokens": state.tokens_seen,
                    "optimizer": with_optimizer,
                }
            )
            log(f"exported {name}")
        final = checkpoints[-1]
        export_hf(final, tmp / ".final", dtype=dtype)
        for f in (tmp / ".final").iterdir():
            f.rename(tmp / f.name)
        (tmp / ".final").rmdir()
        (tmp / "checkpoints" / "index.json").write_text(json.dumps(released, indent=1) + "\n")

        (tmp / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
        if (run_dir / "init_from.json").is_file():  # the checkpoint training started from (--init-from)
            shutil.copyfile(run_dir / "init_from.json", tmp / "init_from.json")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        # The releaser's cache is local: it must not reach the published recipe.yaml.
        data = prepare_data(
            dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, cache_dir=cache_dir))
            if cache_dir
            else recipe
        )
        (tmp / "data").mkdir()
        manifest = json.loads((run_dir / "data_manifest.json").read_text())
        changed = manifest_differences(manifest, data.manifest())
        if changed:
            raise ReleaseError(
                f"{run_dir}/data_manifest.json does not match the data the recipe prepares now ("
                f"{', '.join(changed)} differ: source files or tokenizer changed since training?); the data "
                "order could not be published faithfully"
            )
        shutil.copyfile(run_dir / "data_manifest.json", tmp / "data" / "manifest.json")
        (tmp / "data" / "order.json").write_text(json.dumps(data_order(recipe, data), indent=1) + "\n")

        (tmp / "logs").mkdir()
        for f in ("metrics.jsonl", "eval.jsonl", "summary.json"):
            if (run_dir / f).is_file():
                shutil.copyfile(run_dir / f, tmp / "logs" / f)
        if (run_dir / "eval" / "results.jsonl").is_file():
            (tmp / "eval").mkdir()
            shutil.copyfile(run_dir / "eval" / "results.jsonl", tmp / "eval" / "results.jsonl")
        write_report(run_dir)
        (tmp / "report").mkdir()
        for f in ["report.md", *sorted(p.name for p in run_dir.glob("*.png"))]:
            shutil.copyfile(run_dir / f, tmp / "report" / f)

        (tmp / "README.md").write_text(model_card(tmp, recipe, license=license))
        write_manifest(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"release written: {out_dir} ({len(released)} checkpoints, {time.time() - t0:.1f}s)")
    return out_dir
