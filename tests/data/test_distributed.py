"""Shard units built by datatrove's local executor equal a local build, and prepare_data only merges them."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

pytest.importorskip("datatrove", reason="datatrove (requirements-dev.lock) runs the distributed path")


def test_datatrove_local_executor_builds_the_same_shards(recipe_dict, prepared, tmp_path, monkeypatch):
    from datatrove.executor import LocalPipelineExecutor

    from crystal_lm.config import load_recipe
    from crystal_lm.data import build as build_mod
    from crystal_lm.data.distributed import datatrove_steps
    from crystal_lm.data.prepare import prepare_data

    _, data = prepared
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, part in enumerate(("technical", "web")):
        with open(data.corpus.part_path(part)) as src, open(corpus / f"{part}.jsonl", "w") as out:
            for line in src:
                d = json.loads(line)
                out.write(json.dumps({"id": f"{k}/{d['id']}", "text": d["text"]}) + "\n")
    d = copy.deepcopy(recipe_dict)
    d["data"].update(
        sources={
            "docs": {"domain": "text", "path": str(corpus)},
            "web": {"domain": "code", "embedded": "web"},
        },
        tokenizer={"path": str(data.tokenizer.path)},
        unit_bytes=100_000,
        normalize="nfc",
        cache_dir=str(tmp_path / "engine-cache"),
    )
    for st in d["stages"]:
        st["mixture"] = {"docs": 0.5, "web": 0.5}
        st.get("fim", {}).pop("sources", None)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(d))

    LocalPipelineExecutor(
        pipeline=datatrove_steps(recipe_path), tasks=3, workers=2, logging_dir=str(tmp_path / "logs")
    ).run()
    built = []
    monkeypatch.setattr(build_mod, "build_unit", lambda *a: built.append(a) or None)
    engine = prepare_data(load_recipe(str(recipe_path)))
    assert built == []  # every unit was built by the engine; prepare_data only merged them

    monkeypatch.undo()
    d["data"]["cache_dir"] = str(tmp_path / "local-cache")
    local_path = tmp_path / "local.yaml"
    local_path.write_text(yaml.safe_dump(d))
    local = prepare_data(load_recipe(str(local_path)))
    for name in ("docs", "web"):
        for a, b in ((engine.train[name], local.train[name]), (engine.val[name], local.val[name])):
            assert [s["sha256"] for s in a.index["shards"]] == [s["sha256"] for s in b.index["shards"]]
            assert list(a.documents()) == list(b.documents())
    assert len(engine.train["docs"].index["units"]) > 3
