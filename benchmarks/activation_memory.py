"""Activation memory: what one Crystal block keeps for backward per token, against `crystal plan`'s formula.

For the demo and the ~1.3B shapes, under bf16 autocast and in fp32, eager and compiled per block (as
`train.compile` does), the bytes autograd saves per layer and token are counted on CPU
(`measured_layer_activation_bytes`: batch 4 minus batch 2, so weight copies cancel) and set beside the plan's
`layer_activation_bytes`. With `--compare-bias-add`, also the projections as `x @ w + b` (the bf16 outputs
promoted to fp32; the code before the fix in benchmarks/NOTES.md). Prints a table and writes
benchmarks/results/activation_memory_cpu.json.

    .venv/bin/python benchmarks/activation_memory.py [--shapes demo 1.3b] [--no-compile] [--compare-bias-add]

bf16 matrix products are slow on CPUs without bf16 units: a 1.3B-shaped block takes over a minute per bf16 row.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import REPO, SHAPES  # benchmarks/common.py: run as a script, benchmarks/ is on sys.path

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.model import build_model
from crystal_lm.model import crystal as crystal_model
from crystal_lm.train.plan import layer_activation_bytes, measured_layer_activation_bytes


def block_for(shape: tuple, compiled: bool) -> tuple[torch.nn.Module, ModelConfig]:
    d, _, heads, ff, vocab, _ = shape
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=1, n_heads=heads, d_ff=ff, max_seq_len=128)
    block = build_model(cfg, MupConfig(base_width=256), seed=0).blocks[0]
    if compiled:
        block.forward = torch.compile(block.forward, dynamic=False)
    return block, cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--no-compile", action="store_true", help="eager rows only (compiling takes ~10 s a row)"
    )
    parser.add_argument("--compare-bias-add", action="store_true", help="also the projections as x @ w + b")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["demo"])
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per row (the count is per token)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = [("addmm", crystal_model.Conv1D.forward)]
    if args.compare_bias_add:
        variants.append(("x @ w + b", lambda self, x: x @ self.weight + self.bias))
    rows = []
    for projection, forward in variants:
        crystal_model.Conv1D.forward = forward
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            for bf16 in (True, False):
                for compiled in (False,) if args.no_compile else (False, True):
                    block, cfg = block_for(shape, compiled)
                    measured = measured_layer_activation_bytes(block, cfg, args.seq_len, bf16)
                    planned = layer_activation_bytes(cfg.d_model, cfg.ffn_dim, compiled, bf16)
                    rows.append(
                        {
                            "projection": projection,
                            "shape": shape_name,
                            "d_model": cfg.d_model,
                            "d_ff": cfg.ffn_dim,
                            "precision": "bf16" if bf16 else "fp32",
                            "compiled": compiled,
                            "measured_bytes": measured,
                            "planned_bytes": planned,
                            "error_pct": 100 * (planned - measured) / measured,
                        }
                    )
                    torch._dynamo.reset()
    crystal_model.Conv1D.forward = variants[0][1]

    print("bytes kept for backward per layer and token (CPU count) against crystal plan's formula")
    print(
        f"{'projection':<10} | {'shape':<5} | {'precision':<9} | {'mode':<8} | {'measured':>9} | {'plan':>9} | error"
    )
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        print(
            f"{r['projection']:<10} | {r['shape']:<5} | {r['precision']:<9} | {mode:<8} | "
            f"{r['measured_bytes']:>9,.0f} | {r['planned_bytes']:>9,} | {r['error_pct']:+.2f}%"
        )
    out = REPO / "benchmarks" / "results" / "activation_memory_cpu.json"
    out.write_text(
        json.dumps({"torch": torch.__version__, "seq_len": args.seq_len, "rows": rows}, indent=1) + "\n"
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
