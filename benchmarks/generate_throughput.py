"""Generation speed: our KV-cache sampler against transformers' `generate` on the same weights.

`--shape tiny` (default) is the demo recipe's model, with the weights of `runs/demo`'s newest checkpoint when
it exists (random muP-initialised weights otherwise: speed does not depend on them); `--shape 1.3b` is the
Crystal-shaped ~1.3B model of the throughput issue (hidden 2048, 24 layers, 16 heads, FFN 5461, vocab 32032),
random weights, for `--device cuda --dtype bfloat16`. Greedy decoding, batch 1 and batch 8, in one process.
Prints a table and writes benchmarks/results/generate_throughput_<device>.json.

    .venv/bin/python benchmarks/generate_throughput.py [--new-tokens 128] [--repeats 3]
    python benchmarks/generate_throughput.py --shape 1.3b --device cuda --dtype bfloat16
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
from common import result_tag  # benchmarks/common.py: run as a script, benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", choices=["tiny", "1.3b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401  (registers crystalcoder)
    from crystal_lm.config import ModelConfig, MupConfig, load_recipe
    from crystal_lm.eval.generate import Sampling, generate_batch
    from crystal_lm.interop.llm360 import export_hf
    from crystal_lm.model import build_model
    from crystal_lm.train.checkpoint import TrainState, latest_checkpoint, load_model_weights, save_checkpoint

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    model_cfg, mup = recipe.model, recipe.mup
    if args.shape == "1.3b":
        model_cfg = ModelConfig(
            vocab_size=32032, d_model=2048, n_layers=24, n_heads=16, d_ff=5461, max_seq_len=2048
        )
        mup = MupConfig(base_width=256)
    # Initialised on the device: 1.3B parameters on a few CPU threads take minutes.
    model = build_model(model_cfg, mup, device=args.device if args.shape == "1.3b" else "cpu", seed=0)
    source = "random init"
    found = latest_checkpoint(REPO / "runs" / "demo" / "checkpoints") if args.shape == "tiny" else None
    if found is not None:
        load_model_weights(found, model)
        source = str(found.relative_to(REPO))
    dtype = getattr(torch, args.dtype)
    model = model.to(args.device, dtype).eval()
    config = {
        "format": "crystal-lm",
        "model": asdict(model_cfg),
        "mup": asdict(mup),
        "seq_len": model_cfg.max_seq_len,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model.state_dict(), None, TrainState(), config, None)
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(args.device).eval()

    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(
            3, 4000, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch)
        ).to(args.device)

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

        # Same weights, same greedy rule: the same tokens, exactly in fp32. In bf16 the two may pick
        # different kernels (the peer forms logits of the last position only), and a near-tie can flip.
        same = sum(a == b for x, y in zip(ours(), theirs(), strict=True) for a, b in zip(x, y, strict=True))
        agreement = same / (batch * args.new_tokens)
        if dtype == torch.float32:
            assert agreement == 1.0, f"the two generators disagree on greedy output (batch {batch})"
        elif agreement < 1.0:
            print(f"batch {batch}: {agreement:.1%} of greedy tokens agree in {args.dtype} (near-ties)")
        timing = {}
        for name, fn in (("crystal_lm", ours), ("transformers", theirs)):
            best = float("inf")
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            timing[name] = batch * args.new_tokens / best
        rows.append(
            {
                "batch": batch,
                "tokens_per_s": timing["crystal_lm"],
                "transformers_tokens_per_s": timing["transformers"],
                "ratio_vs_peer": timing["crystal_lm"] / timing["transformers"],
                "greedy_agreement": agreement,
            }
        )
        print(
            f"batch {batch}: {timing['crystal_lm']:,.0f} against {timing['transformers']:,.0f} tokens/s",
            flush=True,
        )
        out = write_result(args, rows, source)  # each batch size kept as soon as it is measured

    print(
        f"generation, {args.shape} model ({sum(p.numel() for p in model.parameters()):,} params, {source}), "
        f"{args.device} {args.dtype}, {args.new_tokens} new tokens, greedy, best of {args.repeats}"
    )
    print(f"{'batch':>5} | {'crystal-lm tok/s':>16} | {'transformers tok/s':>18} | {'ratio':>5}")
    for r in rows:
        print(
            f"{r['batch']:>5} | {r['tokens_per_s']:>16,.0f} | {r['transformers_tokens_per_s']:>18,.0f} | "
            f"{r['ratio_vs_peer']:>5.2f}"
        )
    print(f"written: {out.relative_to(REPO)}")


def write_result(args: argparse.Namespace, rows: list[dict], source: str) -> Path:
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {args.threads} threads)"
    result = {
        "device": device,
        "shape": args.shape,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "weights": source,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    out = REPO / "benchmarks" / "results" / f"generate_throughput_{result_tag(device if cuda else None)}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
