"""`crystal verify RELEASE_DIR`: every hash, every checkpoint loads and runs, the data order recomputes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crystal_lm.config import RecipeError
from crystal_lm.files import sha256_file
from crystal_lm.release.bundle import (
    MANIFEST,
    ReleaseError,
    read_manifest,
    run_recipe,
)


@dataclass
class VerifyReport:
    files: int = 0
    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)  # folder → "ok" or the error
    data_order: dict[str, str] = field(default_factory=dict)  # stage → "ok" or what differs

    @property
    def ok(self) -> bool:
        return (
            not (self.missing or self.altered or self.extra)
            and all(v == "ok" for v in self.checkpoints.values())
            and all(v == "ok" for v in self.data_order.values())
        )

    def lines(self) -> list[str]:
        out = [f"files: {self.files} in {MANIFEST}"]
        out += [f"MISSING  {p}" for p in self.missing]
        out += [f"ALTERED  {p}" for p in self.altered]
        out += [f"EXTRA    {p} (not in {MANIFEST})" for p in self.extra]
        out += [f"checkpoint {k}: {v}" for k, v in self.checkpoints.items()]
        out += [f"data order {k}: {v}" for k, v in self.data_order.items()]
        out.append("release OK" if self.ok else "release FAILED verification")
        return out


def _check_checkpoint(folder: Path) -> str:
    """Load an exported folder as LLM360's layout and run a forward pass: finite logits of the right shape."""
    from crystal_lm.interop.llm360 import InteropError, read_hf_checkpoint
    from crystal_lm.model import build_model

    try:
        model_cfg, mup, tensors = read_hf_checkpoint(folder)
        model = build_model(model_cfg, mup, init=False)
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        with torch.no_grad():
            logits = model(torch.arange(8)[None] % model_cfg.vocab_size)
        if logits.shape != (1, 8, model_cfg.vocab_size) or not torch.isfinite(logits).all():
            return "forward pass gives non-finite or misshapen logits"
        return "ok"
    except (InteropError, OSError, RuntimeError, ValueError) as exc:
        return f"does not load: {exc}"


def _check_data_order(release: Path, cache_dir: str | None) -> dict[str, str]:
    from crystal_lm.data.corpus import CorpusError
    from crystal_lm.data.order import order_fingerprint
    from crystal_lm.data.prepare import manifest_differences, prepare_data
    from crystal_lm.data.shards import ShardError

    needed = ("recipe.json", "data/order.json", "data/manifest.json")
    absent = [rel for rel in needed if not (release / rel).is_file()]
    if absent:
        return {"all": f"cannot be recomputed: {', '.join(absent)} missing from the release"}
    try:
        recipe, _ = run_recipe(release)
        order = json.loads((release / "data" / "order.json").read_text())
        published = json.loads((release / "data" / "manifest.json").read_text())
    except (ReleaseError, RecipeError, OSError, ValueError, KeyError) as exc:
        return {"all": f"cannot be recomputed: {exc}"}
    if cache_dir:
        recipe.data.cache_dir = cache_dir
    try:
        data = prepare_data(recipe)  # from the cache, or rebuilt from the pinned sources
    except (
        ValueError,
        OSError,
        CorpusError,
        ShardError,
    ) as exc:  # e.g. a source not on this machine, offline
        return {"all": f"cannot be recomputed here: {exc} (--skip-data checks the rest alone)"}
    changed = manifest_differences(published, data.manifest())
    if changed:
        return {
            "all": f"the recipe's data now prepares differently from data/manifest.json: {', '.join(changed)}"
        }
    out = {}
    for i, stage in enumerate(order["stages"]):
        got = order_fingerprint(recipe, data, i)
        out[stage["name"]] = "ok" if got == stage["fingerprint"] else f"fingerprint {got[:12]}… ≠ published"
    return out


def verify_release(
    release: str | Path,
    check_data: bool = True,
    cache_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> VerifyReport:
    release = Path(release)
    listed = read_manifest(release)
    report = VerifyReport(files=len(listed))
    for rel, (digest, size) in listed.items():
        path = release / rel
        if not path.is_file():
            report.missing.append(rel)
        elif path.stat().st_size != size or sha256_file(path) != digest:
            report.altered.append(rel)
    on_disk = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    report.extra = sorted(on_disk - set(listed) - {MANIFEST})
    folders = [release, *sorted(p.parent for p in (release / "checkpoints").glob("*/config.json"))]
    for i, folder in enumerate(folders, 1):
        name = "(final, top level)" if folder == release else folder.name
        if log:  # progress only: the results are in the report's lines, once
            log(f"loading checkpoint {i}/{len(folders)}: {name}")
        report.checkpoints[name] = _check_checkpoint(folder)
    if check_data:
        report.data_order = _check_data_order(release, cache_dir)
    return report
