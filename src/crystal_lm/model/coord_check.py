"""muP coordinate check: train a few steps at several widths and watch activation sizes.

Under muP the typical size of each activation (mean |x| per coordinate) stays flat as the model widens, so
hyper-parameters tuned on a narrow proxy hold for the wide model. Under standard parametrisation (same LR for
every matrix, logits not divided by the width multiplier, 1/sqrt(d_head) attention) the sizes grow with width
after a few Adam steps. Data: real bytes of the Python standard library (token = byte), the same batch at
every width.
"""

from __future__ import annotations

import json
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.model import build_model, param_groups
from crystal_lm.model.crystal import CrystalModel

ACTIVATIONS = ("embedding", "attention", "mlp", "logits")


@dataclass
class CoordCheckConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512)
    steps: int = 4
    base_width: int = 64
    head_dim: int = 32
    n_layers: int = 2
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 0.01
    seed: int = 0


def real_byte_batch(cfg: CoordCheckConfig) -> torch.Tensor:
    """[batch, seq_len + 1] byte tokens from CPython's own source (always present, PSF-2.0)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / name).read_bytes() for name in ("functools.py", "textwrap.py", "heapq.py"))
    n = cfg.seq_len + 1
    rows = [np.frombuffer(data[i * n : (i + 1) * n], dtype=np.uint8) for i in range(cfg.batch_size)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _standard_parametrisation(model: CrystalModel, mup: MupConfig) -> None:
    """Turn a muP model into its SP counterpart (same init): width-independent logit multiplier and
    1/sqrt(d_head) attention. (The optimizer side, equal LRs, is set by the caller.)"""
    model.logits_scale = mup.output_alpha
    for block in model.blocks:
        block.attn.scale = block.attn.head_dim**-0.5


def _measure(model: CrystalModel, tokens: torch.Tensor) -> dict[str, float]:
    sizes: dict[str, list[float]] = {k: [] for k in ACTIVATIONS}
    hooks = []
    for block in model.blocks:
        hooks.append(
            block.attn.register_forward_hook(lambda m, i, o: sizes["attention"].append(o.abs().mean().item()))
        )
        hooks.append(
            block.mlp.register_forward_hook(lambda m, i, o: sizes["mlp"].append(o.abs().mean().item()))
        )
    with torch.no_grad():
        sizes["embedding"].append((model.wte(tokens) * model.embeddings_scale).abs().mean().item())
        sizes["logits"].append(model(tokens).abs().mean().item())
    for h in hooks:
        h.remove()
    return {k: float(np.mean(v)) for k, v in sizes.items()}


def run_coord_check(cfg: CoordCheckConfig) -> dict:
    """{parametrisation: {width: [sizes after step 1..steps]}} with sizes per activation type."""
    batch = real_byte_batch(cfg)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    mask = torch.ones_like(labels, dtype=torch.float32)
    results: dict = {"config": cfg.__dict__ | {"widths": list(cfg.widths)}, "mup": {}, "sp": {}}
    for param in ("mup", "sp"):
        for width in cfg.widths:
            mcfg = ModelConfig(
                vocab_size=256,
                d_model=width,
                n_layers=cfg.n_layers,
                n_heads=width // cfg.head_dim,
                max_seq_len=cfg.seq_len,
            )
            mup = MupConfig(base_width=cfg.base_width)
            model = build_model(mcfg, mup, seed=cfg.seed)
            groups = param_groups(model, 0.0, model.width_multiplier)
            if param == "sp":
                _standard_parametrisation(model, mup)
                for g in groups:
                    g["lr_scale"] = 1.0
            for g in groups:
                g["lr"] = cfg.lr * g.pop("lr_scale")
            opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-9)
            trace = []
            for _ in range(cfg.steps):
                opt.zero_grad()
                model.loss(inputs, labels, mask).backward()
                opt.step()
                trace.append(_measure(model, inputs))
            results[param][width] = trace
    return results


def growth(results: dict, param: str, activation: str, step: int = -1) -> float:
    """Slope of log(size) against log(width) at a step: 0 = flat, 1 = grows like the width."""
    widths = sorted(results[param])
    x = np.log([float(w) for w in widths])
    y = np.log([results[param][w][step][activation] for w in widths])
    return float(np.polyfit(x, y, 1)[0])


def plot_coord_check(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(ACTIVATIONS), figsize=(3.2 * len(ACTIVATIONS), 6), sharex=True)
    for row, param in enumerate(("mup", "sp")):
        widths = sorted(results[param])
        steps = len(results[param][widths[0]])
        for col, act in enumerate(ACTIVATIONS):
            ax = axes[row][col]
            for t in range(steps):
                ax.plot(
                    widths,
                    [results[param][w][t][act] for w in widths],
                    marker="o",
                    markersize=3,
                    color=plt.cm.viridis(t / max(1, steps - 1)),
                    label=f"step {t + 1}",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{'muP' if param == 'mup' else 'standard'}: {act}", fontsize=9)
            if row == 1:
                ax.set_xlabel("width (d_model)")
            if col == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Coordinate check: flat lines = width-independent training dynamics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coord_check(out_dir: str | Path, cfg: CoordCheckConfig | None = None) -> dict:
    cfg = cfg or CoordCheckConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run_coord_check(cfg)
    summary = {p: {a: growth(results, p, a) for a in ACTIVATIONS} for p in ("mup", "sp")}
    results["growth"] = summary
    (out_dir / "coord_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot_coord_check(results, out_dir / "coord_check.png")
    assert all(math.isfinite(v) for p in summary.values() for v in p.values())
    return results
