"""`recipes/crystal-7b.yaml`'s data section on a small sample in SlimPajama's and StarCoderData's published
formats: every source reads its part, and each stage's shares are crystal-spec §3.1's within 1%."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from ..conftest import REPO

SETS = {
    "RedPajamaCommonCrawl": "prose",
    "RedPajamaC4": "prose",
    "RedPajamaGithub": "python",
    "RedPajamaArXiv": "technical",
    "RedPajamaBook": "prose",
    "RedPajamaWikipedia": "technical",
    "RedPajamaStackExchange": "technical",
}
LANGUAGES = {"python": "python", "html": "web", "javascript": "web", "css": "web", "java": "python"}


def _texts(corpus, part: str) -> list[str]:
    with open(corpus.part_path(part)) as f:
        return [json.loads(line)["text"][:3000] for line in f][:40]


def test_crystal_recipe_reads_published_formats_with_the_papers_shares(prepared, tmp_path):
    from crystal_lm.config import load_recipe
    from crystal_lm.data.order import stage_stats
    from crystal_lm.data.prepare import prepare_data

    _, data = prepared
    root = tmp_path / "data"
    texts = {p: _texts(data.corpus, p) for p in ("prose", "technical", "python", "web")}
    for chunk in range(1, 5):  # SlimPajama: train/chunkN/example_train_K.jsonl.zst, all sets mixed
        folder = root / "SlimPajama-627B" / "train" / f"chunk{chunk}"
        folder.mkdir(parents=True)
        lines = []
        for k, (name, part) in enumerate(SETS.items()):
            for j in range(3):
                text = texts[part][(chunk * 7 + k * 3 + j) % len(texts[part])]
                lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": name}}))
        blob = zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode())
        (folder / "example_train_0.jsonl.zst").write_bytes(blob)
    for lang, part in LANGUAGES.items():  # StarCoderData: <language>/train-*.parquet, column `content`
        folder = root / "starcoderdata" / lang
        folder.mkdir(parents=True)
        rows = texts[part][:6]
        table = pa.table({"content": rows, "id": [f"{lang}-{i}" for i in range(len(rows))]})
        pq.write_table(table, folder / "train-00000-of-00001.parquet")
    (root / "crystal").mkdir()
    shutil.copyfile(data.tokenizer.path, root / "crystal" / "tokenizer.json")
    (tmp_path / "recipes").mkdir()
    shutil.copyfile(REPO / "recipes" / "crystal-7b.yaml", tmp_path / "recipes" / "crystal-7b.yaml")

    recipe = load_recipe(str(tmp_path / "recipes" / "crystal-7b.yaml"))
    recipe.data.cache_dir = str(tmp_path / "cache")
    recipe.data.workers = 1
    built = prepare_data(recipe)
    docs = {n: built.train[n].index["n_documents"] + built.val[n].index["n_documents"] for n in built.train}
    assert docs["sp1_arxiv"] == docs["sp2_arxiv"] == 6 and docs["sp_arxiv"] == 12  # even / odd / all chunks
    assert docs["python"] == 6 and docs["starcoder"] == 6 * len(LANGUAGES)  # languages filter / all
    rows = stage_stats(recipe, built)
    for si, stage in enumerate(recipe.stages):
        total = sum(stage.mixture.values())
        for r in (r for r in rows if r["stage"] == si + 1):
            want = stage.mixture[r["source"]] / total
            got = r["sample_share"]  # the windows' share, as the mixture sets it
            assert abs(got - want) <= 0.01 * want, (stage.name, r["source"], got, want)
    code = {
        stage.name: sum(
            r["sample_share"]
            for r in rows
            if r["stage"] == si + 1 and recipe.data.sources[r["source"]].domain == "code"
        )
        for si, stage in enumerate(recipe.stages)
    }
    # crystal-spec §3.1: code is ~5.0% of stage 1, ~64.7% of stage 2, ~83.3% of stage 3.
    assert abs(code["stage1"] - 0.0496) < 0.001 and abs(code["stage2"] - 0.6466) < 0.001
    assert abs(code["stage3"] - 0.8331) < 0.001
    fim = {(r["stage"], r["source"]): r["fim_rate"] for r in rows}
    assert fim[2, "starcoder"] == 0.9 and fim[3, "python"] == 0.3 and fim[3, "starcoder"] == 0.9
    assert fim[3, "sp_c4"] == 0.0
