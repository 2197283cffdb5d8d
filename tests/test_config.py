"""Recipes: the shipped ones load, the 7B parameter count is Crystal's, and bad recipes fail naming the key."""

from __future__ import annotations

import copy

import pytest

from crystal_lm.config import RecipeError, check_paths, load_recipe, recipe_from_dict
from crystal_lm.model import build_model, count_parameters

from .conftest import REPO


def test_crystal_7b_parameter_count_on_meta_device():
    recipe = load_recipe(REPO / "recipes" / "crystal-7b.yaml")
    model = build_model(recipe.model, recipe.mup, device="meta")
    assert count_parameters(model) == 6_575_278_720
    assert recipe.tokens_per_step == 2112 * 2048
    assert [recipe.stage_steps(s) for s in recipe.stages] == [79_721, 214_387, 27_728]


def test_tiny_recipe_is_shaped_like_crystal():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    domain = {n: s.domain for n, s in recipe.data.sources.items()}

    def code_share(stage):
        total = sum(stage.mixture.values())
        return sum(w for n, w in stage.mixture.items() if domain[n] == "code") / total

    s1, s2, s3 = recipe.stages
    assert code_share(s1) <= 0.1
    assert code_share(s2) == pytest.approx(0.63, abs=0.02) and s2.fim.rate == 0.9
    assert code_share(s3) == pytest.approx(0.80, abs=0.02) and s3.fim.rate == 0.3
    assert s2.lr.continue_previous and not s2.reset_optimizer
    assert s3.reset_optimizer and s3.lr.peak < s1.lr.peak


def _error(d: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(d, "r.yaml")
    return str(exc.value)


def test_unknown_key_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["model"]["n_layer"] = 3
    msg = _error(d)
    assert "r.yaml" in msg and "model.n_layer" in msg and "unknown key" in msg and "n_layers" in msg


def test_mistyped_value_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][1]["lr"]["warmup_steps"] = "ten"
    assert "stages[1].lr.warmup_steps" in _error(d)


def test_unknown_source_in_mixture_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["mixture"]["pyton"] = 0.1
    msg = _error(d)
    assert "stages[0].mixture.pyton" in msg and "python" in msg


def test_negative_and_empty_weights_rejected(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["mixture"]["prose"] = -0.5
    assert "stages[0].mixture.prose" in _error(d) and "negative" in _error(d)
    d = copy.deepcopy(recipe_dict)
    d["stages"][2]["mixture"] = {}
    assert "stages[2].mixture" in _error(d) and "empty" in _error(d)
    d = copy.deepcopy(recipe_dict)
    d["stages"][2]["mixture"] = {"python": 0.0}
    assert "sum to zero" in _error(d)


def test_missing_required_key_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    del d["stages"][0]["tokens"]
    assert "stages[0].tokens: required key is missing" in _error(d)


def test_missing_data_path_names_source_and_file(recipe_dict, tmp_path):
    d = copy.deepcopy(recipe_dict)
    d["data"]["sources"]["mine"] = {"domain": "text", "path": str(tmp_path / "nope.jsonl")}
    recipe = recipe_from_dict(d, "r.yaml")
    with pytest.raises(RecipeError) as exc:
        check_paths(recipe)
    assert "data.sources.mine.path" in str(exc.value) and "nope.jsonl" in str(exc.value)


def test_missing_tokenizer_file_is_named(recipe_dict, tmp_path):
    d = copy.deepcopy(recipe_dict)
    d["data"]["tokenizer"] = {"path": str(tmp_path / "tok.json")}
    with pytest.raises(RecipeError, match=r"data\.tokenizer\.path.*tok\.json"):
        check_paths(recipe_from_dict(d, "r.yaml"))


def test_continue_previous_needs_a_previous_stage(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["lr"] = {"continue_previous": True}
    assert "stages[0].lr.continue_previous" in _error(d)


def test_continuing_a_stage_that_decayed_to_zero_is_refused(recipe_dict):
    """Stage 1 without decay_steps decays to its default end, 0, within itself: stage 2 continuing its line
    trained every step at LR 0, silently."""
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["lr"] = {"warmup_steps": 2, "peak": 0.01}
    assert "stages[1].lr.continue_previous: stage 'stage1' has already decayed to an LR of 0" in _error(d)
    d["stages"][0]["lr"]["end"] = 0.001  # stopping at a positive end, the next stage continues flat: allowed
    recipe_from_dict(d)
    # 59 steps, warmup 10: the line's float arithmetic ends at 1.7e-18, not 0: the same LR-0 stage
    d["stages"][0]["tokens"] = 59 * 4 * 64
    d["stages"][0]["lr"] = {"warmup_steps": 10, "peak": 0.012}
    assert "has already decayed to an LR of 0" in _error(d)


def test_fim_for_a_source_the_stage_does_not_draw_is_refused(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["fim"] = {"rate": 0.5, "sources": ["web"]}  # stage 1 draws prose, technical, python
    assert "stages[0].fim.sources: 'web' is not in this stage's mixture" in _error(d)


def test_a_source_named_like_a_domain_of_other_sources_is_refused(recipe_dict):
    """Validation loss keys sources and domains alike: a source `code` beside another code source summed
    its figure into the domain's."""
    d = copy.deepcopy(recipe_dict)
    sources = d["data"]["sources"]
    sources["code"] = sources.pop("python")
    for stage in d["stages"]:
        if "python" in stage["mixture"]:
            stage["mixture"]["code"] = stage["mixture"].pop("python")
    assert "data.sources.code: named like the domain 'code' of sources web, code" in _error(d)
    del sources["web"]  # the domain's only source may carry its name: one figure, reported once
    for stage in d["stages"]:
        stage["mixture"].pop("web", None)
    recipe_from_dict(d)


def test_yaml_scientific_notation_without_dot_is_a_number(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["optimizer"] = {"eps": "1e-9"}  # PyYAML reads `1e-9` as a string
    assert recipe_from_dict(d).optimizer.eps == 1e-9


def test_recipe_file_not_found(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("keep_last", 0, r"train\.keep_last: must be at least 1, got 0"),
        ("keep_every", 0, r"train\.keep_every: must be at least 1, got 0"),
        ("max_skipped_in_row", 0, r"train\.max_skipped_in_row: must be at least 1"),
        ("spike_factor", 0.5, r"train\.spike_factor: .* use > 1"),
    ],
)
def test_retention_and_guard_settings_are_checked(recipe_dict, key, value, message):
    d = copy.deepcopy(recipe_dict)
    d["train"][key] = value
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(d)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_chars", -100),
        ("chunk_chars", 0),
        ("mixture_block", 0),
        ("mixture_block", -3),
        ("unit_bytes", 0),
        ("workers", 0),
    ],
)
def test_data_sizes_must_be_positive_and_the_key_is_named(recipe_dict, key, value):
    d = copy.deepcopy(recipe_dict)
    d["data"][key] = value
    with pytest.raises(RecipeError, match=rf"r\.yaml: data\.{key}: must be a positive integer.*got {value}"):
        recipe_from_dict(d, "r.yaml")
    d["data"][key] = 64 if key == "mixture_block" else 1  # a block of 1 would draw from one source only
    recipe_from_dict(d, "r.yaml")


def test_duplicate_yaml_key_is_named_with_its_lines(tmp_path):
    good = (REPO / "recipes" / "tiny.yaml").read_text()
    assert load_recipe(REPO / "recipes" / "tiny.yaml")
    lines = good.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("seed:"))
    lines.insert(at + 1, "seed: 7")  # the same top-level key again, one line below
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        RecipeError,
        match=rf"dup\.yaml: .*line {at + 2}: duplicate key 'seed' \(first given at line {at + 1}\)",
    ):
        load_recipe(path)
    # A YAML merge (`<<: *base`) may still override keys.
    merged = tmp_path / "merge.yaml"
    merged.write_text("a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  x: 3\n")
    import yaml

    from crystal_lm.config import _UniqueKeyLoader

    assert yaml.load(merged.read_text(), Loader=_UniqueKeyLoader)["b"] == {"x": 3, "y": 2}


def test_glob_with_a_wildcard_folder_passes_the_path_check(recipe_dict, tmp_path):
    for part in ("a", "b"):
        (tmp_path / "globdir" / part).mkdir(parents=True)
        (tmp_path / "globdir" / part / "part.jsonl").write_text('{"text": "x"}\n')
    for pattern in ("globdir/*/part.jsonl", "**/*.jsonl", "globdir/*"):
        d = copy.deepcopy(recipe_dict)
        d["data"]["sources"]["mine"] = {"domain": "text", "path": str(tmp_path / pattern)}
        check_paths(recipe_from_dict(d, "r.yaml"))
    d["data"]["sources"]["mine"] = {"domain": "text", "path": str(tmp_path / "globdir" / "*" / "none.jsonl")}
    with pytest.raises(RecipeError, match=r"data\.sources\.mine\.path: no files match .*none\.jsonl"):
        check_paths(recipe_from_dict(d, "r.yaml"))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optimizer", "grad_clip", 0, r"optimizer\.grad_clip: .*must be positive, got 0"),
        ("optimizer", "grad_clip", -1, r"optimizer\.grad_clip: .*must be positive, got -1"),
        ("optimizer", "weight_decay", -0.1, r"optimizer\.weight_decay: must not be negative"),
        ("optimizer", "eps", -1, r"optimizer\.eps: must be positive"),
        ("optimizer", "eps", 0, r"optimizer\.eps: must be positive"),
        ("optimizer", "betas", [1.5, 0.95], r"optimizer\.betas\[0\]: must be in \[0, 1\), got 1.5"),
        ("optimizer", "betas", [0.9, -1], r"optimizer\.betas\[1\]: must be in \[0, 1\), got -1"),
        ("train", "log_every", 0, r"train\.log_every: must be a positive integer, got 0"),
        ("train", "threads", -1, r"train\.threads: must be a positive integer .*got -1"),
        ("train", "peak_tflops", 0, r"train\.peak_tflops: must be positive"),
        ("model", "d_ff", 0, r"model\.d_ff: must be a positive integer .*got 0"),
        ("model", "layer_norm_eps", 0, r"model\.layer_norm_eps: must be positive"),
        ("data", "val_max_samples", 0, r"data\.val_max_samples: must be a positive integer, got 0"),
    ],
)
def test_optimizer_train_and_model_values_are_checked_before_any_work(
    recipe_dict, section, key, value, message
):
    """Values that used to crash after data preparation (or silently train wrongly: grad_clip 0 zeroes every
    gradient, -1 reverses them) are refused up front, naming the key."""
    d = copy.deepcopy(recipe_dict)
    d.setdefault(section, {})[key] = value
    with pytest.raises(RecipeError, match=rf"r\.yaml: {message}"):
        recipe_from_dict(d, "r.yaml")


def test_a_fim_domain_no_source_has_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][1]["fim"]["domains"] = ["cod"]  # a typo used to turn FIM off silently
    assert "stages[1].fim.domains: no source has domain 'cod'; did you mean 'code'?" in _error(d)
    d["stages"][1]["fim"]["domains"] = ["code", "figures"]  # no source of that domain: nothing to FIM there
    recipe_from_dict(d)
    d["stages"][1]["fim"]["domains"] = ["code", "text"]
    recipe_from_dict(d)
    d["stages"][1]["fim"] = {"rate": 0.0, "domains": ["anything"]}  # no FIM: nothing to check
    recipe_from_dict(d)


def test_a_weight_too_small_for_a_slot_of_the_mixture_block_is_named(recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][0]["mixture"] = {"prose": 0.9996, "web": 0.0004}  # 0.4 of 1024 slots: never drawn
    assert "stages[0].mixture.web: weight 0.0004 is a share of 0.0004" in _error(d)
    assert "raise data.mixture_block to at least 2500" in _error(d)
    d["data"]["mixture_block"] = 4096  # 1.6 slots: drawn
    recipe_from_dict(d)
