"""Generation speed on CPU: our KV-cache sampler against transformers' `generate` on the same weights.

The model is the demo recipe's shape (`recipes/tiny.yaml`), with the weights of `runs/demo`'s newest
checkpoint when it exists (random muP-initialised weights otherwise: speed does not depend on them).
Greedy decoding, batch 1 and batch 8, in one process. Prints a table and writes
benchmarks/results/generate_throughput_cpu.json.

    .venv/bin/python benchmarks/generate_throughput.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401  (registers crystalcoder)
    from crystal_lm.config import load_recipe
    from crystal_lm.eval.generate import Sampling, generate_batch
    from crystal_lm.interop.llm360 import export_hf
    from crystal_lm.model import build_model
    from crystal_lm.train.checkpoint import TrainState, latest_checkpoint, load_model_weights, save_checkpoint

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    model = build_model(recipe.model, recipe.mup, seed=0)
    source = "random init"
    found = latest_checkpoint(REPO / "runs" / "demo" / "checkpoints")
    if found is not None:
        load_model_weights(found, model)
        source = str(found.relative_to(REPO))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(
            Path(tmp) / "ckpt",
            model.state_dict(),
            None,
            TrainState(),
            {
                "format": "crystal-lm",
                "model": asdict(recipe.model),
                "mup": asdict(recipe.mup),
                "seq_len": recipe.data.seq_len,
            },
            None,
        )
        hf = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, Path(tmp) / "hf")).eval()

    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(
            3, 4000, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch)
        )

        def ours(prompts: torch.Tensor = prompts) -> list[list[int]]:
            return generate_batch(model, prompts.tolist(), greedy, stop_ids=set())

        def theirs(prompts: torch.Tensor = prompts) -> list[list[int]]:
            with torch.no_grad():
                out = hf.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            return out[:, args.prompt_tokens :].tolist()

        assert ours() == theirs(), "the two generators disagree on greedy output"
        timing = {}
        for name, fn in (("crystal_lm", ours), ("transformers", theirs)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            timing[name] = batch * args.new_tokens / best
        rows.append(
            {
                "batch": batch,
                "tokens_per_s": timing["crystal_lm"],
                "transformers_tokens_per_s": timing["transformers"],
                "ratio_vs_peer": timing["crystal_lm"] / timing["transformers"],
            }
        )

    print(
        f"generation, demo model ({sum(p.numel() for p in model.parameters()):,} params, {source}), "
        f"{args.new_tokens} new tokens, greedy, {args.threads} threads, best of {args.repeats}"
    )
    print(f"{'batch':>5} | {'crystal-lm tok/s':>16} | {'transformers tok/s':>18} | {'ratio':>5}")
    for r in rows:
        print(
            f"{r['batch']:>5} | {r['tokens_per_s']:>16,.0f} | {r['transformers_tokens_per_s']:>18,.0f} | "
            f"{r['ratio_vs_peer']:>5.2f}"
        )
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "torch": torch.__version__,
        "weights": source,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    out = REPO / "benchmarks" / "results" / "generate_throughput_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
