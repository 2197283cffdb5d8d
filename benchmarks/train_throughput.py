"""Training throughput: our training step against the closest stock model a user would pick, same run.

On a GPU (`--device cuda`, the ~1.3B Crystal shape: hidden 2048, 24 layers, 16 heads, FFN 5461, vocab 32032,
sequence 2048): our model (muP, tied head, fused linear cross-entropy, SDPA, bf16 autocast, fused AdamW,
`torch.compile` per block) against transformers' `StableLmForCausalLM` of the same shape (LayerNorm, 25%
rotary, SwiGLU, q/k/v biases, SDPA, bf16 autocast, fused AdamW, `torch.compile`). On CPU (`--device cpu`,
the demo shape of recipes/tiny.yaml, fp32): ours against transformers' `LlamaForCausalLM` of that shape.
Prints a table and writes benchmarks/results/train_throughput_<gpu name | cpu>.json with tokens/s, MFU
(FLOPs per token 6·N + 12·L·H·Q·T over the device's bf16 peak), peak memory and the ratio to the peer.

    .venv/bin/python benchmarks/train_throughput.py --device cpu
    python benchmarks/train_throughput.py --device cuda --shape 1.3b --batch 8 --compile [--with-loader]

`--with-loader` also times our step fed by the trainer's loader against the same batches made beforehand:
the data time's share of a real step (benchmarks/NOTES.md, data pipeline).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import (  # benchmarks/common.py: run as a script, benchmarks/ is on sys.path
    SHAPES,
    result_tag,
    tiny_recipe,
    tiny_stage,
)

REPO = Path(__file__).resolve().parents[1]


def ours(shape: tuple, device: str, compile_: bool):
    from crystal_lm.config import ModelConfig, MupConfig, TrainConfig
    from crystal_lm.model import build_model, param_groups
    from crystal_lm.train.parallel import World, parallelize

    d, layers, heads, ff, vocab, seq = shape
    model = build_model(
        ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, d_ff=ff, max_seq_len=seq),
        MupConfig(base_width=256),
        device=device,  # initialised where it trains: 1.3B parameters on 2 CPU threads take minutes
    )
    train_model = parallelize(model, TrainConfig(batch_size=1, compile=compile_), World(device=device))
    groups = param_groups(model, 0.1, model.width_multiplier)
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-9, fused=device == "cuda")

    def step(
        ids: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> float:
        if labels is None:  # random tokens of length seq + 1
            ids, labels = ids[:, :-1], ids[:, 1:]
        mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = train_model(ids, labels=labels, loss_mask=mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.resident_bytes = lambda: resident_bytes(model, opt)
    return model, step


def peer(shape: tuple, device: str, compile_: bool):
    import transformers

    d, layers, heads, ff, vocab, seq = shape
    if device == "cuda":
        config = transformers.StableLmConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=seq,
            partial_rotary_factor=0.25,
            use_qkv_bias=True,
            tie_word_embeddings=True,
            use_cache=False,  # training: no KV cache built at every forward
        )
        model = transformers.StableLmForCausalLM._from_config(config, attn_implementation="sdpa")
        name = "transformers StableLmForCausalLM"
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=ff,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=seq,
            tie_word_embeddings=True,
            use_cache=False,
        )
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
        name = "transformers LlamaForCausalLM"
    model.to(device).train()
    if compile_:
        # Per decoder layer, as ours per block. Compiling the whole model traces transformers' causal-mask
        # code, which then passes SDPA an explicit mask, and on CUDA that rules out the flash kernel.
        for layer in model.model.layers:
            layer.forward = torch.compile(layer.forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-9, fused=device == "cuda")

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.resident_bytes = lambda: resident_bytes(model, opt)
    return model, step, name


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: weights, gradients still held, and the optimizer's state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(step, shape: tuple, device: str, batch: int, warmup: int, steps: int) -> dict:
    vocab, seq = shape[4], shape[5]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    for i in range(warmup):
        step(batches[i % 4])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # Both models live on the GPU: the other's resident memory is not this one's peak.
        others = torch.cuda.memory_allocated() - step.resident_bytes()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 4])
    float(loss)  # waits for the device
    seconds = time.perf_counter() - t0
    out = {"tokens_per_s": batch * seq * steps / seconds, "step_s": seconds / steps}
    if device == "cuda":
        out["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - others) / 2**30
    return out


def plan_check(shape: tuple, batch: int, compiled: bool, measured: dict) -> dict:
    """`crystal plan`'s estimate for this run (one GPU, unsharded, no activation checkpointing) against the
    memory measured: its model states + activations + loss chunk against our peak allocated bytes, and its
    total (with the fixed 2 GiB for context and slack) against that peak plus the CUDA context and the
    allocator's reserve, which is what `nvidia-smi` shows."""
    from crystal_lm.train.plan import GIB, OVERHEAD_BYTES, plan

    d, layers, heads, ff, vocab, seq = shape

    def edit(raw: dict) -> None:
        raw["model"] = {
            "vocab_size": vocab,
            "d_model": d,
            "n_layers": layers,
            "n_heads": heads,
            "d_ff": ff,
            "max_seq_len": seq,
        }
        raw["data"]["seq_len"] = seq
        raw["train"] |= {"batch_size": batch, "precision": "bf16", "compile": compiled}

    recipe = tiny_recipe(edit)
    layout = next(lay for lay in plan(recipe, gpus=1, gpu_memory_gib=80) if lay.name == "one GPU")
    planned_total, planned_body = layout.memory_gib, layout.memory_gib - OVERHEAD_BYTES / GIB
    peak, seen = measured["peak_mem_gib"], measured["device_used_gib"]
    return {
        "layout": layout.name,
        "planned_gib": planned_total,
        "planned_without_overhead_gib": planned_body,
        "measured_peak_allocated_gib": peak,
        "measured_device_gib": seen,
        "error_pct_allocated": 100 * (planned_body - peak) / peak,
        "error_pct_device": 100 * (planned_total - seen) / seen,
    }


def loader_overhead(step, shape: tuple, device: str, batch: int, steps: int, repeats: int) -> dict:
    """Our step fed by the trainer's loader (`StageData.batches`, process and thread) against the same step
    fed by the same batches made beforehand: what the loader costs the step, GIL contention included. Data:
    stage 2 of recipes/tiny.yaml (FIM 0.9 on code) at the shape's sequence length, `batch` rows a step."""
    stage = tiny_stage(shape[5], batch)
    made = [stage.batch(k) for k in range(steps)]

    def run(source) -> float:
        """Seconds per step after the first batch (the pipeline fills once per stage, as in training)."""
        source = iter(source)
        _, b = next(source)
        loss = step(b.input_ids.to(device), b.labels.to(device), b.loss_mask.to(device))
        float(loss)
        t0 = time.perf_counter()
        for _, b in source:
            loss = step(b.input_ids.to(device), b.labels.to(device), b.loss_mask.to(device))
        float(loss)  # waits for the device
        return (time.perf_counter() - t0) / (steps - 1)

    run(enumerate(made[:3]))  # warm-up (and compile) on real batches
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name in ("made beforehand", "process", "thread"):
            src = enumerate(made) if name == "made beforehand" else stage.batches(0, steps, worker=name)
            best[name] = min(best.get(name, float("inf")), run(src))
    base = best["made beforehand"]
    return {
        "step_s": best,
        "overhead_pct": {k: 100 * (v - base) / base for k, v in best.items() if k != "made beforehand"},
        "steps": steps,
        "batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), help="default: demo on cpu, 1.3b on cuda")
    parser.add_argument("--batch", type=int, help="sequences per step (default: 16 cpu, 8 cuda)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both (default on cuda)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (on --device cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; best kept")
    parser.add_argument(
        "--with-loader",
        action="store_true",
        help="also time our step fed by the trainer's data loader against pre-made batches (needs the tiny "
        "recipe's corpus and tokenizer under .cache/crystal-lm)",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if not cuda:  # on a GPU host every core helps build and initialise the peer
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape or ("1.3b" if cuda else "demo")]
    batch = args.batch or (8 if cuda else 16)
    compile_ = args.compile or cuda
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    from crystal_lm.train.parallel import flops_per_token, peak_tflops

    built = {}
    alone = None  # our memory before the peer shares the GPU: what `crystal plan` estimates
    for label in ("crystal-lm", "peer"):
        torch.manual_seed(0)
        if label == "crystal-lm":
            model, step = ours(shape, args.device, compile_)
            name = "crystal-lm CrystalModel"
            if cuda:
                alone = measure(step, shape, args.device, batch, args.warmup, 2)
                free, total = torch.cuda.mem_get_info()
                # what nvidia-smi shows: the CUDA context and kernels, plus the allocator's peak reserve
                outside_allocator = total - free - torch.cuda.memory_reserved()
                alone["device_used_gib"] = (outside_allocator + torch.cuda.max_memory_reserved()) / 2**30
        else:
            model, step, name = peer(shape, args.device, compile_)
        built[label] = (model, step, name)
    # Alternate the two, `repeats` times each, and keep each one's best: background load hits both alike.
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for label, (_, step, _) in built.items():
            r = measure(step, shape, args.device, batch, args.warmup, args.steps)
            print(f"{label}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)  # kept in the log if cut short
            if label not in best or r["tokens_per_s"] > best[label]["tokens_per_s"]:
                best[label] = r
    results = {}
    for label, (model, _, name) in built.items():
        r = best[label]
        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(n_params, shape[1], shape[2], shape[0] // shape[2], shape[5])
        r |= {"model": name, "params": n_params, "tflops": flops * r["tokens_per_s"] / 1e12}
        peak = peak_tflops(None, "cuda:0") if cuda else None
        if peak:
            r |= {"mfu": r["tflops"] / peak, "peak_tflops": peak}
        results[label] = r

    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    ratio = results["crystal-lm"]["tokens_per_s"] / results["peer"]["tokens_per_s"]
    print(f"training throughput on {device_name}: shape {shape}, batch {batch}, compile {compile_}")
    print(
        f"{'':>12} | {'model':<36} | {'params':>13} | {'tokens/s':>10} | {'TFLOP/s':>8} | {'MFU':>6} | peak GiB"
    )
    for label, r in results.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "–"
        print(
            f"{label:>12} | {r['model']:<36} | {r['params']:>13,} | {r['tokens_per_s']:>10,.0f} | "
            f"{r['tflops']:>8.3f} | {mfu:>6} | {mem}"
        )
    print(f"ratio crystal-lm / peer: {ratio:.2f}x")
    ours_r = results["crystal-lm"]
    body = {
        "device": device_name,
        "torch": torch.__version__,
        "shape": dict(
            zip(("d_model", "n_layers", "n_heads", "d_ff", "vocab", "seq_len"), shape, strict=True)
        ),
        "batch": batch,
        "compile": compile_,
        "repeats": args.repeats,
        "steps": args.steps,
        "threads": args.threads if not cuda else None,
        "tokens_per_s": ours_r["tokens_per_s"],
        "mfu": ours_r.get("mfu"),
        "peak_mem_gib": ours_r.get("peak_mem_gib"),
        "peer": results["peer"],
        "ratio_vs_peer": ratio,
        "results": results,
        "plan": None,
        "loader": None,
    }
    tag = result_tag(device_name if cuda else None)
    out = REPO / "benchmarks" / "results" / f"train_throughput_{tag}.json"
    out.write_text(json.dumps(body, indent=1) + "\n")  # the throughput figures are kept if what follows fails
    if alone:
        body["plan"] = plan = plan_check(shape, batch, compile_, alone)
        print(
            f"crystal plan ({plan['layout']}): {plan['planned_gib']:.1f} GiB against "
            f"{plan['measured_device_gib']:.1f} GiB on the device ({plan['error_pct_device']:+.1f}%); without "
            f"its 2 GiB overhead {plan['planned_without_overhead_gib']:.1f} against "
            f"{plan['measured_peak_allocated_gib']:.1f} GiB allocated ({plan['error_pct_allocated']:+.1f}%)"
        )
        out.write_text(json.dumps(body, indent=1) + "\n")
    if args.with_loader:
        body["loader"] = loader = loader_overhead(
            built["crystal-lm"][1], shape, args.device, batch, args.steps * 2, args.repeats
        )
        for name, s in loader["step_s"].items():
            extra = (
                f" ({loader['overhead_pct'][name]:+.2f}% vs made beforehand)"
                if name in loader["overhead_pct"]
                else ""
            )
            print(f"step fed by batches {name}: {1000 * s:.1f} ms{extra}")
        out.write_text(json.dumps(body, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
