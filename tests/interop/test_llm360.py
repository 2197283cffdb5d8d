"""LLM360's Hugging Face layout in and out: exact conversion, a spec-written float64 reference on a checkpoint
built here in their layout, transformers loading, folded muP, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from crystal_lm.config import ModelConfig, MupConfig, load_recipe
from crystal_lm.data.tokenizer import Tokenizer
from crystal_lm.eval.generate import Sampling, generate_batch, load_checkpoint
from crystal_lm.interop.llm360 import (
    InteropError,
    export_hf,
    from_hf_config,
    import_hf,
    to_hf_config,
)
from crystal_lm.model import build_model, count_parameters
from crystal_lm.train.checkpoint import CheckpointError, load_model_weights, load_tensors

from ..conftest import REPO
from ..model.test_model import reference_forward

D, LAYERS, HEADS, FF, VOCAB = 48, 2, 3, 128, 512


def _llm360_config(**over) -> dict:
    cfg = {
        "model_type": "crystalcoder",
        "architectures": ["CrystalCoderLMHeadModel"],
        "vocab_size": VOCAB,
        "n_positions": 64,
        "n_embd": D,
        "n_layer": LAYERS,
        "n_head": HEADS,
        "n_inner": FF,
        "activation_function": "swiglu",
        "layer_norm_epsilon": 1e-5,
        "position_embedding_type": "rotary",
        "rotary_dim": 4,
        "scale_attn_weights": True,
        "mup_scale_qk_dot_by_d": True,
        "mup_embeddings_scale": 14.6,
        "mup_output_alpha": 2.22,
        "mup_width_scale": 0.25,
        "tie_word_embeddings": True,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "auto_map": {"AutoConfig": "configuration_crystalcoder.CrystalCoderConfig"},
    }
    return cfg | over


def _llm360_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with LLM360's names and GPT-2 Conv1D [in, out] shapes (independent of our model code)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    t = {"transformer.wte.weight": r(VOCAB, D, s=0.073)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        t |= {
            p + "ln_1.weight": 1 + r(D, s=0.1),
            p + "ln_1.bias": r(D, s=0.1),
            p + "attn.c_attn.weight": r(D, 3 * D),
            p + "attn.c_attn.bias": r(3 * D),
            p + "attn.c_proj.weight": r(D, D),
            p + "attn.c_proj.bias": r(D),
            p + "ln_2.weight": 1 + r(D, s=0.1),
            p + "ln_2.bias": r(D, s=0.1),
            p + "mlp.c_fc.weight": r(D, FF),
            p + "mlp.c_fc.bias": r(FF),
            p + "mlp.c_fc2.weight": r(D, FF),
            p + "mlp.c_fc2.bias": r(FF),
            p + "mlp.c_proj.weight": r(FF, D),
            p + "mlp.c_proj.bias": r(D),
        }
    return t | {"transformer.ln_f.weight": 1 + r(D, s=0.1), "transformer.ln_f.bias": r(D, s=0.1)}


def _write_llm360_bin_shards(folder, tensors, tokenizer_path=None, config=None):
    """The layout of LLM360's branch checkpoints: fp32 .bin shards with an index, lm_head stored, mask buffers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or _llm360_config()))
    full = dict(tensors) | {"lm_head.weight": tensors["transformer.wte.weight"].clone()}
    for i in range(LAYERS):
        full[f"transformer.h.{i}.attn.bias"] = torch.ones(64, 64, dtype=torch.bool).tril()[None, None]
        full[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    names = sorted(full)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(halves, start=1):
        fname = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: full[n] for n in part}, folder / fname)
        weight_map |= {n: fname for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer_path is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    return folder


@pytest.fixture()
def llm360_dir(tmp_path, prepared):
    _, data = prepared
    return _write_llm360_bin_shards(tmp_path / "llm360", _llm360_tensors(), data.tokenizer.path)


def test_reference_forward_agrees_with_import_and_transformers(llm360_dir, tmp_path):
    tensors = _llm360_tensors()
    cfg, mup = from_hf_config(_llm360_config())
    tokens = [1, 17, 42, 5, 300, 1, 60, 7, 33, 2, 19, 511]
    ref = reference_forward(tensors, tokens, cfg, mup)

    ckpt = import_hf(llm360_dir, tmp_path / "ckpt")
    ours, _ = load_checkpoint(ckpt)
    ours_logits = ours(torch.tensor([tokens]))[0].double()
    assert torch.allclose(ours_logits, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())

    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401  (registers crystalcoder)

    export_hf(ckpt, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(hf).__name__ == "CrystalCoderLMHeadModel"
    with torch.no_grad():
        hf_logits = hf(torch.tensor([tokens])).logits[0].double()
    assert torch.allclose(hf_logits, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trips_are_bit_exact(tmp_path, dtype):
    src = tmp_path / "src"
    src.mkdir()
    tensors = {k: v.to(dtype) for k, v in _llm360_tensors(1).items()}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_llm360_config()))
    ckpt = import_hf(src, tmp_path / "ckpt")  # export(import(y)) == y
    out = export_hf(ckpt, tmp_path / "out", max_shard_bytes=40_000)  # several shards
    assert (out / "model.safetensors.index.json").is_file()
    back = import_hf(out, tmp_path / "ckpt2")  # import(export(x)) == x
    a, b = load_tensors(ckpt), load_tensors(back)
    assert set(a) == set(tensors) == set(b)
    for k in tensors:
        assert a[k].dtype == dtype and torch.equal(a[k], tensors[k]) and torch.equal(b[k], tensors[k])
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "crystalcoder" and exported["mup_width_scale"] == 0.25
    assert exported["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_transformers_generate_matches_ours_with_cache_and_left_padding(llm360_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401

    ckpt = import_hf(llm360_dir, tmp_path / "ckpt")
    export_hf(ckpt, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ours, _ = load_checkpoint(ckpt)
    prompts = [[1, 5, 9, 2, 77, 31, 4], [1, 12, 3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    ours_out = generate_batch(ours, prompts, Sampling(max_new_tokens=6, temperature=0), stop_ids=set())
    assert out[:, width:].tolist() == ours_out
    alone = hf.generate(torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert alone[0, len(prompts[1]) :].tolist() == ours_out[1]  # the padded row is unaffected by padding


@pytest.mark.parametrize("qk_by_d", [True, False])
def test_folded_mup_export_computes_the_same_function(tmp_path, qk_by_d):
    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401

    # qk_by_d False: muP multipliers with standard 1/sqrt(d_head) attention, whose keys must not be folded.
    config = _llm360_config(mup_scale_qk_dot_by_d=qk_by_d)
    ckpt = import_hf(
        _write_llm360_bin_shards(tmp_path / "llm360", _llm360_tensors(), config=config), tmp_path / "ckpt"
    )
    export_hf(ckpt, tmp_path / "mup")
    folded = export_hf(ckpt, tmp_path / "sp", fold=True)
    config = json.loads((folded / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["mup_scale_qk_dot_by_d"] is False
    assert (
        config["mup_embeddings_scale"] == 1.0
        and config["mup_output_alpha"] * config["mup_width_scale"] == 1.0
    )
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "mup")(x).logits
        b = AutoModelForCausalLM.from_pretrained(folded)(x).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_7b_shape_survives_config_round_trip(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "crystal-7b.yaml")
    hf = to_hf_config(recipe.model, recipe.mup, torch.bfloat16, None)
    assert (hf["n_inner"], hf["rotary_dim"], hf["mup_width_scale"]) == (10922, 32, 0.0625)
    model_cfg, mup = from_hf_config(json.loads(json.dumps(hf)))
    assert count_parameters(build_model(model_cfg, mup, device="meta")) == 6_575_278_720
    assert model_cfg == recipe.model and mup.base_width == 256


def test_a_config_without_mup_or_rotary_keys_reads_the_same_in_import_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401

    cfg = _llm360_config()
    for key in ("mup_scale_qk_dot_by_d", "mup_embeddings_scale", "mup_output_alpha", "mup_width_scale"):
        del cfg[key]
    del cfg["rotary_dim"]
    model_cfg, mup = from_hf_config(cfg)
    # Standard parametrisation, as the remote code's config class defaults; a quarter of the head rotates.
    assert (model_cfg.qk_scale, mup.embeddings_scale, mup.output_alpha, mup.base_width) == (
        "sqrt_d_head",
        1,
        1,
        D,
    )
    assert model_cfg.rotary_dim == (D // HEADS) // 4
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(_llm360_tensors(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    ckpt = import_hf(folder, tmp_path / "ckpt")
    saved = json.loads((ckpt / "config.json").read_text())
    ours = build_model(ModelConfig(**saved["model"]), MupConfig(**saved["mup"]), init=False)
    load_model_weights(ckpt, ours)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    x = torch.tensor([[1, 17, 42, 5, 300]])
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x).logits)


def test_rotary_dim_round_trips_exactly_and_bad_values_are_named(tmp_path):
    cfg = _llm360_config(n_embd=264, n_head=3, rotary_dim=30)  # head dim 88: 30/88 is not exact in binary
    model_cfg, mup = from_hf_config(cfg)
    assert model_cfg.rotary_dim == 30
    assert to_hf_config(model_cfg, mup, torch.float32, None)["rotary_dim"] == 30
    for bad in (3, 90, -2, "8"):
        with pytest.raises(InteropError, match=rf"config\.json: rotary_dim .*{bad}"):
            from_hf_config(cfg | {"rotary_dim": bad})


def test_config_values_of_the_wrong_kind_or_unsupported_are_named():
    for key, value in (("n_embd", "forty"), ("n_layer", 2.5), ("tie_word_embeddings", "false")):
        with pytest.raises(InteropError, match=f"config.json: {key} must be"):
            from_hf_config(_llm360_config(**{key: value}))
    # Unscaled attention would silently be scaled: refused, in import and in transformers alike.
    with pytest.raises(InteropError, match="scale_attn_weights False is not supported"):
        from_hf_config(_llm360_config(scale_attn_weights=False))
    from crystal_lm.interop.hf_model import CrystalCoderConfig, CrystalCoderLMHeadModel

    hf_cfg = CrystalCoderConfig(**(_llm360_config(scale_attn_weights=False)))
    with pytest.raises(InteropError, match="scale_attn_weights"):
        CrystalCoderLMHeadModel(hf_cfg)


# ------------------------------------------------------------------------------------------ bad input


def _expect(folder, tmp_path, match):
    with pytest.raises(InteropError, match=match):
        import_hf(folder, tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing written half-way


def test_shape_disagreeing_with_config_names_the_tensor(tmp_path):
    folder = _write_llm360_bin_shards(tmp_path / "m", _llm360_tensors(), config=_llm360_config(n_inner=100))
    _expect(folder, tmp_path, r"tensor transformer\.h\.0\.mlp\.c_fc\.\w+ has shape .*config\.json implies")


def test_missing_and_truncated_shards(tmp_path):
    folder = _write_llm360_bin_shards(tmp_path / "m", _llm360_tensors())
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:200])
    _expect(folder, tmp_path, r"pytorch_model-00002-of-00002\.bin: unreadable or truncated")
    shard.unlink()
    _expect(folder, tmp_path, r"pytorch_model-00002-of-00002\.bin: shard listed .* is missing")


def test_unknown_dtype_and_unknown_tensor(tmp_path):
    tensors = _llm360_tensors()
    bad = dict(tensors) | {"transformer.h.0.ln_1.bias": torch.zeros(D, dtype=torch.int32)}
    _expect(_write_llm360_bin_shards(tmp_path / "a", bad), tmp_path, r"ln_1\.bias has dtype torch\.int32")
    extra = dict(tensors) | {"transformer.h.0.attn.q_norm.weight": torch.ones(D)}
    _expect(
        _write_llm360_bin_shards(tmp_path / "b", extra),
        tmp_path,
        r"unknown tensor 'transformer\.h\.0\.attn\.q_norm",
    )
    missing = {k: v for k, v in tensors.items() if "ln_f" not in k}
    _expect(
        _write_llm360_bin_shards(tmp_path / "c", missing), tmp_path, r"missing tensors \['transformer\.ln_f"
    )


def test_vocabulary_smaller_than_the_tokenizer(tmp_path, prepared):
    _, data = prepared
    small = _llm360_tensors()
    small["transformer.wte.weight"] = small["transformer.wte.weight"][:256]
    folder = _write_llm360_bin_shards(
        tmp_path / "m", small, data.tokenizer.path, _llm360_config(vocab_size=256)
    )
    assert Tokenizer(folder / "tokenizer.json").max_id >= 256
    _expect(folder, tmp_path, r"vocab_size 256 is smaller than the tokenizer's largest id")


def test_unsupported_architecture_key(tmp_path):
    folder = _write_llm360_bin_shards(
        tmp_path / "m", _llm360_tensors(), config=_llm360_config(activation_function="gelu")
    )
    _expect(folder, tmp_path, r"activation_function 'gelu' is not supported")


def test_export_refuses_to_overwrite(llm360_dir, tmp_path):
    ckpt = import_hf(llm360_dir, tmp_path / "ckpt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InteropError, match="--overwrite"):
        export_hf(ckpt, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_export_refuses_values_beyond_float16(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = _llm360_tensors()
    tensors["transformer.h.1.mlp.c_proj.bias"][0] = 1e6
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_llm360_config()))
    ckpt = import_hf(src, tmp_path / "ckpt")
    with pytest.raises(InteropError, match=r"tensor transformer\.h\.1\.mlp\.c_proj\.bias .*bfloat16"):
        export_hf(ckpt, tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()
    export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")


def test_malformed_index_weights_config_and_target_are_named(tmp_path):
    def folder(name):
        return _write_llm360_bin_shards(tmp_path / name, _llm360_tensors())

    index = "pytorch_model.bin.index.json"
    for name, text in (("list", "[1, 2]"), ("int", '{"weight_map": {"a": 3}}')):
        f = folder(name)
        (f / index).write_text(text)
        _expect(f, tmp_path, rf"{index}: not a weight index")
    shard = "pytorch_model-00001-of-00002.bin"
    f = folder("cut")
    (f / shard).write_bytes((f / shard).read_bytes()[:2])
    _expect(f, tmp_path, rf"{shard}: unreadable or truncated")
    f = folder("list_bin")
    torch.save([torch.zeros(2)], f / shard)
    _expect(f, tmp_path, rf"{shard}: holds a list, not a dict")
    f = folder("bad_json")
    (f / "config.json").write_text("{not json")
    _expect(f, tmp_path, r"config\.json: not valid JSON")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InteropError, match="a_file: exists and is a file"):
        import_hf(folder("ok"), tmp_path / "a_file")


def test_export_of_a_run_folder_takes_its_newest_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(_llm360_tensors(), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_llm360_config()))
    run = tmp_path / "run"
    import_hf(src, run / "checkpoints" / "phase1_checkpoint_000002")
    newest = import_hf(src, run / "checkpoints" / "phase2_checkpoint_000001")
    (newest / "COMPLETE").unlink()  # interrupted while saving: skipped
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["n_embd"] == D
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        export_hf(tmp_path, tmp_path / "hf2")


def test_export_loads_in_a_process_that_never_imported_crystal_lm(llm360_dir, tmp_path):
    import subprocess
    import sys

    ckpt = import_hf(llm360_dir, tmp_path / "ckpt")
    export = export_hf(ckpt, tmp_path / "export")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(export)!r})\n"
        "ids = torch.tensor([[1, 17, 42, 5]])\n"
        "print(type(m).__name__, m(ids).logits[0, -1, :3].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name, logits = out.stdout.strip().splitlines()[-1].split(" ", 1)
    ours, _ = load_checkpoint(ckpt)
    expected = ours(torch.tensor([[1, 17, 42, 5]]))[0, -1, :3].tolist()
    assert name == "CrystalCoderLMHeadModel" and json.loads(logits) == pytest.approx(expected, rel=1e-6)


def test_a_folder_saved_by_the_transformers_model_loads_in_a_fresh_process(tmp_path):
    """save_pretrained kept the export's auto_map but not the code files it names: OSError on loading."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    import crystal_lm.interop.hf_model  # noqa: F401

    src = tmp_path / "src"
    src.mkdir()
    save_file(_llm360_tensors(), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(_llm360_config()))
    export = export_hf(import_hf(src, tmp_path / "ckpt"), tmp_path / "export")
    x = torch.tensor([[1, 17, 42, 5]])
    hf = AutoModelForCausalLM.from_pretrained(export)
    hf.save_pretrained(tmp_path / "saved")
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True)\n"
        f"print(m(torch.tensor({x.tolist()})).logits[0, -1, :3].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        expected = hf(x).logits[0, -1, :3].tolist()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-6)


def test_out_that_is_holds_or_lies_in_the_source_is_refused_and_nothing_is_lost(llm360_dir, tmp_path):
    """`export SRC --out SRC --overwrite` deleted the checkpoint (or the run); `import HF --out HF
    --overwrite` replaced the download. Refused, symlinks resolved, with the source left as it was."""
    run = tmp_path / "run"
    ckpt = import_hf(llm360_dir, run / "checkpoints" / "phase1_checkpoint_000002")
    before = {p: p.read_bytes() for p in [*ckpt.iterdir(), *llm360_dir.iterdir()]}
    (tmp_path / "link").symlink_to(ckpt)
    for src, out, where in (
        (ckpt, ckpt, "is"),
        (ckpt, tmp_path / "link", "is"),
        (run, run, "is"),
        (ckpt, run, "contains"),
        (run, ckpt / "hf", "lies inside"),
    ):
        with pytest.raises(InteropError, match=rf"--out {out} {where} the source"):
            export_hf(src, out, overwrite=True)
    for out, where in ((llm360_dir, "is"), (tmp_path, "contains"), (llm360_dir / "ckpt", "lies inside")):
        with pytest.raises(InteropError, match=rf"--out {out} {where} the source"):
            import_hf(llm360_dir, out, overwrite=True)
    assert {p: p.read_bytes() for p in before} == before
    assert export_hf(ckpt, tmp_path / "hf", overwrite=True).is_dir()  # a folder beside it is fine
    assert export_hf(run, run / "hf").is_dir()  # and inside the run, outside the checkpoint read


def test_import_places_a_branch_in_its_training_from_its_name_or_the_options(llm360_dir, tmp_path):
    """LLM360 names branches `CrystalCoder_phase{N}_checkpoint_{step}` (the step counted within the phase):
    phase and step come from that name, said in the output; tokens only when given or, for Crystal's own
    run, derived from its batch and stage lengths (crystal-spec §4), never guessed."""
    import shutil

    from crystal_lm.interop.llm360 import crystal_position, import_position
    from crystal_lm.train.checkpoint import load_state

    branch = tmp_path / "CrystalCoder_phase2_checkpoint_000006"
    shutil.copytree(llm360_dir, branch)
    said = []
    ckpt = import_hf(branch, tmp_path / "p2", log=said.append)
    state = load_state(ckpt)
    assert (state.stage_index, state.step, state.tokens_seen) == (1, 6, 0)
    imported = json.loads((ckpt / "config.json").read_text())["imported"]
    assert imported["phase"] == 2 and imported["step"] == 6 and imported["tokens"] is None  # a tiny model
    assert any("phase 2, step 6, tokens unknown (phase and step from the folder name" in m for m in said)
    ckpt = import_hf(branch, tmp_path / "given", step=9, tokens=12_345)
    state = load_state(ckpt)
    assert (state.stage_index, state.step, state.tokens_seen) == (1, 9, 12_345)
    said.clear()
    import_hf(llm360_dir, tmp_path / "unknown", log=said.append)
    assert any("position in training unknown (give --phase N --step S" in m for m in said)
    with pytest.raises(InteropError, match="give --phase and --step together"):
        import_hf(llm360_dir, tmp_path / "half", phase=2)
    # Crystal's own branches: cumulative tokens from 2112 x 2048 per step, stages of 79,721 / 214,387 steps.
    assert crystal_position(1, 55_500) == (55_500, 55_500 * 4_325_376)
    assert crystal_position(2, 214_387) == (294_108, 294_108 * 4_325_376)  # 1.27 T, as the spec derives
    assert crystal_position(3, 27_728)[1] == (79_721 + 214_387 + 27_728) * 4_325_376
    seven_b = load_recipe(REPO / "recipes" / "crystal-7b.yaml").model
    state, record = import_position(tmp_path / "CrystalCoder_phase2_checkpoint_214387", seven_b)
    assert state.tokens_seen == 294_108 * 4_325_376 and state.global_step == 294_108
    assert "Crystal's 2112 × 2048-token steps" in record["from"]
    cfg, _ = from_hf_config(_llm360_config())  # another model under that name: tokens not invented
    assert import_position(tmp_path / "CrystalCoder_phase2_checkpoint_214387", cfg)[1]["tokens"] is None


def test_import_without_a_tokenizer_warns_and_takes_one_given(tmp_path, prepared):
    _, data = prepared
    bare = _write_llm360_bin_shards(tmp_path / "bare", _llm360_tensors())
    said = []
    ckpt = import_hf(bare, tmp_path / "ckpt", log=said.append)
    assert any("has no tokenizer.json" in m and "--tokenizer PATH" in m for m in said)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json .*--tokenizer PATH"):
        load_checkpoint(ckpt)
    said.clear()
    ckpt = import_hf(bare, tmp_path / "with", tokenizer=data.tokenizer.path, log=said.append)
    assert not said or not any("warning" in m for m in said)
    assert load_checkpoint(ckpt)[1].sha256 == data.tokenizer.sha256
    with pytest.raises(InteropError, match=r"--tokenizer .*no such file"):
        import_hf(bare, tmp_path / "x", tokenizer=tmp_path / "none.json")


def test_import_pointed_at_the_wrong_thing_says_what_it_is(llm360_dir, tmp_path):
    import shutil

    ckpt = import_hf(llm360_dir, tmp_path / "ckpt")
    branches = tmp_path / "branches"
    for name in ("CrystalCoder_phase1_checkpoint_000003", "CrystalCoder_phase2_checkpoint_000006"):
        shutil.copytree(llm360_dir, branches / name)
    (branches / "notes").mkdir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for source, message in (
        (tmp_path / "nowhere", "nowhere: does not exist"),
        (llm360_dir / "config.json", rf"a file; pass the folder that holds config\.json .*\({llm360_dir}\)"),
        (ckpt, "already a crystal-lm checkpoint"),
        (run, "a crystal-lm run folder"),
        (
            branches,
            r"holds 2 LLM360-layout checkpoint folder\(s\): CrystalCoder_phase1_checkpoint_000003, "
            r"CrystalCoder_phase2_checkpoint_000006; import each one, e\.g\. `crystal import .*--out OUT`",
        ),
    ):
        with pytest.raises(InteropError, match=message):
            import_hf(source, tmp_path / "out")
        assert not (tmp_path / "out").exists()
