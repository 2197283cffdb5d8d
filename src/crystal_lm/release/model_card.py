"""The release's model card: README.md with Hugging Face front matter, written from the bundle itself."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from crystal_lm.config import Recipe, StageConfig
from crystal_lm.report.report import CODE_TASKS, describe_setting, headline_metric, select_series
from crystal_lm.train.metrics import read_jsonl


def _param_count(release: Path) -> int:
    from crystal_lm.interop.llm360 import from_hf_config
    from crystal_lm.model import build_model

    model_cfg, mup = from_hf_config(json.loads((release / "config.json").read_text()))
    return sum(p.numel() for p in build_model(model_cfg, mup, device="meta").parameters())


def _tokens(n: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _starting_checkpoint(release: Path) -> list[str]:
    """The card's words on `init_from.json`: what training started from, when not from scratch."""
    path = release / "init_from.json"
    if not path.is_file():
        return []
    init = json.loads(path.read_text())
    hashes = init.get("weights_sha256") or {}
    weights = (
        ", ".join(f"`{name}` sha256 `{digest}`" for name, digest in sorted(hashes.items()))
        if hashes
        else "weights hash not recorded"
    )
    return [
        "## Starting checkpoint",
        "",
        f"Training did not start from scratch: stage 1 started from the checkpoint `{init['init_from']}` (as "
        f"given to `--init-from`; resolved: `{init.get('resolved', 'not recorded')}`), its weights "
        f"{'and optimizer state' if init.get('optimizer') else 'only (a fresh optimizer)'}; {weights}. "
        "Recorded in `init_from.json`.",
        "",
    ]


def _tokenizer_words(release: Path, recipe: Recipe) -> str:
    from crystal_lm.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(release / "tokenizer.json")
    origin = (
        "a byte-level BPE trained on the recipe's sources"
        if recipe.data.tokenizer.path is None
        else f"the tokenizer `{Path(recipe.data.tokenizer.path).name}`"
    )
    return origin + (", Crystal's special-token layout incl. FIM" if tokenizer.has_fim else ", no FIM tokens")


def _mixture_words(stage: StageConfig) -> str:
    """The stage's normalised weights, with the part of a source it reads (`subsets`)."""
    total = sum(stage.mixture.values())
    words = []
    for name, weight in stage.mixture.items():
        if not weight:
            continue
        subset = stage.subsets.get(name)
        words.append(
            f"{name} {weight / total:.0%}" + (f" (samples {subset[0]:g}–{subset[1]:g})" if subset else "")
        )
    return ", ".join(words)


def _fim_words(recipe: Recipe, stage: StageConfig) -> str:
    """The stage's FIM rate per source it FIMs ("–" for none); one figure when every such source shares it."""
    rates = {
        name: stage.fim.rate_for(name, recipe.data.sources[name].domain)
        for name, weight in stage.mixture.items()
        if weight
    }
    fimmed = {name: r for name, r in rates.items() if r > 0}
    if not fimmed:
        return "–"
    if len(set(fimmed.values())) == 1:
        return f"{next(iter(fimmed.values())):g} ({', '.join(fimmed)})"
    return ", ".join(f"{name} {r:g}" for name, r in fimmed.items())


def _training_data(recipe: Recipe, manifest: dict) -> list[str]:
    """Where each of the recipe's sources came from: the embedded corpus parts it uses, with their upstream
    packages and licences, and the user's own files (whose licences the card cannot know)."""
    corpus = manifest.get("corpus") or {}
    lines = ["| recipe source | domain | data | version | licence |", "|---|---|---|---|---|"]
    for name, source in recipe.data.sources.items():
        if source.embedded:
            for up in corpus.get("sources", []):
                if up.get("part") == source.embedded:
                    lines.append(
                        f"| {name} | {source.domain} | {up['name']} ({up['registry']}) | {up['version']} | "
                        f"{up['licence']} |"
                    )
        else:
            fmt = f", {source.format}" if source.format else ""
            lines.append(
                f"| {name} | {source.domain} | `{source.path}`{fmt} | – | the source's own (not recorded) |"
            )
    return lines


def model_card(release: Path, recipe: Recipe, license: str = "apache-2.0") -> str:
    summary = json.loads((release / "logs" / "summary.json").read_text())
    checkpoints = json.loads((release / "checkpoints" / "index.json").read_text())
    manifest = json.loads((release / "data" / "manifest.json").read_text())
    m = recipe.model
    params = _param_count(release)
    final = checkpoints[-1]
    front = {
        "license": license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["crystal-lm", "llm360", "crystalcoder", "code", "fill-in-the-middle", "mup"],
        "language": ["en"],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {recipe.name}",
        "",
        f"A {params / 1e6:,.1f}M-parameter language-and-code model trained with "
        f"crystal-lm on the multi-stage recipe of LLM360's Crystal: "
        f"{len(recipe.stages)} stages whose code/text mixture and fill-in-the-middle rate change from stage to "
        f"stage, {_tokens(summary['tokens_seen'])} tokens in all. Everything needed to inspect or continue "
        "it is released here: every checkpoint, the recipe as run, the exact data order, the logs and the "
        "evaluations.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {params:,} |",
        f"| layers / width / heads | {m.n_layers} / {m.d_model} / {m.n_heads} |",
        f"| FFN (SwiGLU) | {m.ffn_dim} |",
        f"| vocabulary | {m.vocab_size:,} ({_tokenizer_words(release, recipe)}) |",
        f"| context | {recipe.data.seq_len:,} tokens |",
        f"| architecture | Crystal: LayerNorm with biases, GPT-J rotary on {m.rotary_pct:.0%} of head dims, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings |",
        f"| muP | base width {recipe.mup.base_width}, input ×{recipe.mup.embeddings_scale}, "
        f"output ×{recipe.mup.output_alpha}/m_d |",
        "",
        "## Recipe",
        "",
        "| stage | steps | tokens | mixture (normalised weights) | FIM rate | LR (warmup → peak → end) | optimizer |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for i, (stage, s) in enumerate(zip(recipe.stages, summary["stages"], strict=True)):
        lr = stage.lr
        if lr.continue_previous:
            sched = f"{lr.warmup_steps} warmup, continues stage {i}'s decay"
        else:  # an unset end decays to 0 (train/schedule.py)
            sched = f"{lr.warmup_steps} → {lr.peak:g} → {lr.end or 0:g}"
        opt = "fresh" if i == 0 or stage.reset_optimizer else "carried over"
        lines.append(
            f"| {stage.name} | {s['steps']:,} | {s['tokens']:,} | {_mixture_words(stage)} | "
            f"{_fim_words(recipe, stage)} | {sched} | {opt} |"
        )
    lines += ["", f"Batch {recipe.train.batch_size} × {recipe.data.seq_len} tokens; seed {recipe.seed}.", ""]
    lines += _starting_checkpoint(release)

    lines += ["## Evaluation at the final checkpoint", ""]
    last_stage = summary["stages"][-1]
    if last_stage.get("val_loss"):
        vl = last_stage["val_loss"]
        lines += [
            "Held-out loss per domain and source: " + ", ".join(f"{k} {v:.3f}" for k, v in vl.items()) + ".",
            "",
        ]
    results = read_jsonl(release / "eval" / "results.jsonl")
    # The final checkpoint's score in the setting the report's table shows for the task; where that setting
    # has no result for it, its latest result. Either way the card says which setting a score is from.
    series = select_series(results)[0]
    final_records: dict[str, dict] = {}
    for r in [*results, *series]:
        if r["checkpoint"] == final["checkpoint"] and r["task"] != "val_loss":
            final_records[r["task"]] = r
    tasks = sorted(final_records, key=lambda t: (t == "memorization", t in CODE_TASKS, t))
    if final_records:
        lines += ["| benchmark | setting | metric | score |", "|---|---|---|---:|"]
        for t in tasks:
            name, value = headline_metric(t, final_records[t]["metrics"])
            if value is not None:
                setting = describe_setting(final_records[t], [r for r in results if r["task"] == t])
                lines.append(f"| {t} | {setting} | {name} | {value:.3f} |")
        lines += ["", "Every checkpoint's scores: `eval/results.jsonl`; the table in `report/report.md`.", ""]
    else:
        lines += ["No benchmark sweep was run before release (`crystal eval RUN_DIR --tasks ...`).", ""]

    lines += ["## Trajectories", ""]
    for png, title in (
        ("train_loss.png", "training loss"),
        ("val_loss.png", "validation loss per domain"),
        ("benchmarks.png", "benchmarks across checkpoints"),
        ("language_vs_code.png", "language vs code average"),
        ("memorization.png", "memorization"),
    ):
        if (release / "report" / png).is_file():
            lines += [f"![{title}](report/{png})", ""]

    lines += [
        "## Checkpoints",
        "",
        f"{len(checkpoints)} checkpoints, each a Hugging Face model folder under `checkpoints/` (and a branch of "
        "the same name when pushed to a hub, as LLM360 published Crystal's):",
        "",
        "| checkpoint | stage | step | tokens |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{c['name']}` | {c['stage']} | {c['step']:,} | {c['tokens']:,} |" for c in checkpoints]
    lines += ["", "## Training data", "", *_training_data(recipe, manifest)]
    lines += [
        "",
        f"Tokenizer sha256 `{manifest['tokenizer']['sha256'][:16]}…`; every shard's sha256 is in "
        "`data/manifest.json`. The data order is a pure function of the recipe and the shards: any step's "
        "batch is recomputed with",
        "",
        "```bash",
        "crystal data order RELEASE_DIR --stage 2 --start 1024 --count 16 --json  # which documents",
        "crystal data sample RELEASE_DIR --stage 2 --index 1030 --json            # the exact token ids",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import crystal_lm.interop.hf_model  # registers the crystalcoder model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("RELEASE_DIR")  # or RELEASE_DIR/checkpoints/<name>',
        'tokenizer = AutoTokenizer.from_pretrained("RELEASE_DIR")',
        'ids = tokenizer("<s>def fibonacci(n):", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=48)[0]))",
        "```",
        "",
        "Continue training from any checkpoint (weights, and the optimizer state where released):",
        "",
        "```bash",
        f"crystal train RECIPE.yaml --out RUN_DIR --init-from RELEASE_DIR/checkpoints/{final['name']}",
        "crystal verify RELEASE_DIR   # every hash, every checkpoint loads, the data order recomputes",
        "```",
        "",
    ]
    return "\n".join(lines)
