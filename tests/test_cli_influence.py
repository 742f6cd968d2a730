"""fit, queries and score as a user runs them, on a tiny model saved to a folder."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers import curator, write_jsonl
from tinylm import TRAINING_TEXT, save_tiny
from curator.catalog.records import score_files


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ws = root / "ws"
    curator("init", ws)
    write_jsonl(root / "docs.jsonl", [{"text": t * k} for t in TRAINING_TEXT for k in (1, 3)])
    curator("ingest", root / "docs.jsonl", "--source", "mixed", "-w", ws)
    model = save_tiny(root / "tiny", seed=2)
    fitted = curator("fit", "--model", model, "--layers", "last:1", "--max-seq-len", "32", "-w", ws)
    curator("queries", "generate", "--task", "arithmetic", "--n", "3", "-w", ws)
    curator("queries", "generate", "--task", "slope", "--n", "2", "--seed", "4", "-w", ws)
    return root, ws, model, fitted


def test_fit_records_factors_and_token_counts(pipeline):
    root, ws, model, fitted = pipeline
    assert "Fitted fit-" in fitted.stdout and "3 layers on 12 documents" in fitted.stdout
    again = curator("fit", "--model", model, "--layers", "last:1", "--max-seq-len", "32", "-w", ws)
    assert "exist already" in again.stdout
    sources = json.loads(curator("sources", "-o", "json", "-w", ws).stdout)
    assert sources[0]["tokens"] > 0


def test_queries_generate_add_and_list(pipeline, tmp_path):
    root, ws, _, _ = pipeline
    listed = json.loads(curator("queries", "list", "-o", "json", "-w", ws).stdout)
    assert {q["set"] for q in listed} == {"arithmetic-s0", "slope-s4"} and len(listed) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "task": "factual", "prompt": "p"}\n')
    result = curator("queries", "add", bad, "-w", ws, check=False)
    assert result.returncode == 1 and "bad.jsonl:1: field 'completion'" in result.stderr
    table = curator("queries", "list", "-q", "slope", "-w", ws).stdout
    assert "slope-s4-0001" in table and "arithmetic" not in table


def test_score_writes_one_row_per_pair_and_records_the_run(pipeline):
    root, ws, _, _ = pipeline
    out = root / "scores"
    result = curator("score", "--queries", "arithmetic,slope-s4", "--out", out, "-w", ws)
    assert "5 queries × 12 documents" in result.stdout
    table = pl.read_parquet(score_files(out))
    assert table.columns == ["query_id", "doc_id", "score", "score_per_nat"]
    assert table.height == 60 and table.select(["query_id", "doc_id"]).is_duplicated().sum() == 0
    assert not (out / "pending").exists() and len(list(out.glob("*.parquet"))) >= 1
    again = curator("score", "--queries", "arithmetic,slope-s4", "--out", out, "-w", ws)
    assert "exists already" in again.stdout and not (out / "pending").exists()
    runs = json.loads(curator("runs", "-o", "json", "-w", ws).stdout)
    assert [(r["queries"], r["documents"], r["scores"]) for r in runs] == [(5, 12, str(out))]
    fits = json.loads(curator("factors", "-o", "json", "-w", ws).stdout)
    assert [(f["blocks"], f["layers"], f["fisher"]) for f in fits] == [("last:1", 3, "sampled")]


def test_score_refuses_factors_of_another_model(pipeline, tmp_path):
    root, ws, _, _ = pipeline
    other = save_tiny(tmp_path / "other", seed=9)
    result = curator("score", "--model", other, "-w", ws, check=False)
    assert result.returncode == 1
    assert "were fitted for" in result.stderr and "config or weights differ" in result.stderr
    result = curator("score", "--modules", "attn-mlp", "-w", ws, check=False)
    assert result.returncode == 1 and "--modules 'attn-mlp' selects 7" in result.stderr


def test_unknown_model_and_missing_queries_are_clear_errors(pipeline):
    root, ws, _, _ = pipeline
    result = curator("fit", "--model", root / "nowhere", "-w", ws, check=False)
    assert result.returncode == 1 and "no model" in result.stderr and "Traceback" not in result.stderr
    result = curator("score", "--queries", "linear", "-w", ws, check=False)
    assert result.returncode == 1 and "no query matches 'linear'" in result.stderr


def test_rank_mix_and_export_from_the_command_line(pipeline):
    root, ws, _, _ = pipeline
    curator("score", "--queries", "arithmetic,slope-s4", "-w", ws)
    ranked = curator("rank", "--tasks", "arithmetic,slope", "--normalize", "per-token", "--name", "r",
                     "--show", "3", "-w", ws)
    assert "Top 3" in ranked.stdout and "Bottom 3" in ranked.stdout and "mixed" in ranked.stdout
    mixed = curator("mix", "m", "--rank", "r", "--budget-tokens", "300", "--strategy", "sample", "--seed", "1",
                    "-w", ws)
    assert "Mixture m:" in mixed.stdout and "corpus share" in mixed.stdout
    assert curator("mix", "show", "m", "-w", ws).stdout.splitlines()[0] == mixed.stdout.splitlines()[0]
    bad = curator("mix", "m2", "--rank", "r", "--budget-tokens", "300", "--quota", "nowhere=0.5:", "-w", ws,
                  check=False)
    assert bad.returncode == 1 and "nowhere" in bad.stderr
    weights = root / "weights.json"
    curator("mix-weights", "--rank", "r", "--out", weights, "-w", ws)
    assert json.loads(weights.read_text())["weights"] == {"mixed": 1.0}
    exported = curator("export", "m", "--shard-format", "jsonl.zst", "--out", root / "shards", "-w", ws)
    assert "Exported m as jsonl.zst" in exported.stdout
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["documents"] == json.loads(curator("mixes", "-o", "json", "-w", ws).stdout)[0]["documents"]


def test_sketch_index_search_and_fidelity_from_the_command_line(pipeline):
    root, ws, _, _ = pipeline
    sketched = curator("sketch", "--suite", "arithmetic-s0-0000,arithmetic-s0-0001", "--rank", "4",
                       "--fidelity-sample", "12", "-w", ws)
    assert "bytes per document" in sketched.stdout and "held-out queries" in sketched.stdout
    assert "arithmetic-s0-0002" in sketched.stdout          # the held-out query of the suite's task
    built = curator("index", "build", "-w", ws)
    assert "12 documents" in built.stdout
    found = curator("search", "--prompt", "Calculate the answer: (2 + 2) * 3", "--completion", "4 * 3 = 12.",
                    "--top", "3", "--bottom", "2", "--rerank", "6", "-w", ws)
    assert "top 3 (exact re-rank of 6)" in found.stdout and "bottom 2" in found.stdout
    stored = curator("search", "-q", "slope", "--top", "2", "--bottom", "0", "-w", ws)
    assert "slope-s4-0000" in stored.stdout and "slope-s4-0001" in stored.stdout
    checked = curator("fidelity", "-q", "slope", "--sample", "12", "-w", ws)
    assert "spearman" in checked.stdout and "top10_recall_at_5pct" in checked.stdout
    out = root / "sketch-scores.parquet"
    curator("score", "--method", "sketch", "--queries", "slope", "--out", out, "-w", ws)
    assert pl.read_parquet(out).height == 2 * 12
