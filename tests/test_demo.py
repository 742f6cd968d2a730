"""End to end: `curator demo` on a tiny model and the real offline corpus (stdlib code, package Markdown,
red-trivia cards, mpmath docs), the same command lines the README's `make demo` runs on SmolLM2."""

from __future__ import annotations

import json

import duckdb
import polars as pl
import pytest
from helpers import curator
from tinylm import save_tiny

from curator.demo import DemoSettings, build_demo_corpus

TINY = ["--docs-per-source", "8", "--max-seq-len", "64", "--layers", "last:1", "--fit-docs", "16",
        "--queries-per-task", "2", "--sketch-rank", "4"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = save_tiny(root / "tiny", seed=3)
    ws = root / "ws"
    first = curator("demo", "--model", model, *TINY, "--record", root / "bench.md", "-w", ws)
    return root, ws, first


def test_the_demo_runs_every_stage_on_four_kinds_of_real_text(demo_run):
    root, ws, first = demo_run
    for command in ("curator ingest", "curator fit", "curator queries generate --task slope", "curator score",
                    "curator sketch", "curator index build", "curator search", "curator rank", "curator mix-weights",
                    "curator mix reasoning", "curator export", "curator audit"):
        assert command in first.stdout, command
    assert f"Report: {ws / 'reports' / 'audit.html'}" in first.stdout
    assert f"Shards: {ws / 'shards' / 'reasoning'}" in first.stdout
    sources = {r["source"]: r for r in json.loads(curator("sources", "-o", "json", "-w", ws).stdout)}
    assert {s: r["kind"] for s, r in sources.items()} == {"stdlib": "code", "package-docs": "markdown",
                                                          "trivia": "trivia", "mpmath-docs": "math"}
    assert all(r["documents"] == 8 and r["tokens"] > 0 for r in sources.values())
    runs = json.loads(curator("runs", "-o", "json", "-w", ws).stdout)
    # 2 per reasoning task and control (5 tasks) + 6 factual questions from the trivia.
    assert [(r["method"], r["queries"], r["documents"]) for r in runs] == [("exact", 16, 32)]


def test_factual_answers_are_in_the_corpus_and_the_audit_finds_them(demo_run):
    root, ws, _ = demo_run
    queries = json.loads(curator("queries", "list", "-q", "trivia", "-o", "json", "-w", ws).stdout)
    assert len(queries) == 6
    with duckdb.connect(str(ws / "curator.duckdb"), read_only=True) as db:
        for query in queries:
            hits = db.execute("SELECT count(*) FROM documents WHERE contains(text, ?)", [query["answer"]]).fetchone()
            assert hits[0] >= 1, query
    audit = json.loads((ws / "reports" / "audit.json").read_text())
    assert audit["missing"] == [] and audit["run"]["documents"] == 32
    occurrence = audit["answer_occurrence"]["per_query"]
    # The top 500 of a 32-document corpus is all of it: every factual answer is found.
    assert all(occurrence[q["id"]]["contains"] >= 1 for q in queries)
    assert (ws / "reports" / "audit.html").stat().st_size > 10_000


def test_the_mixture_is_exported_and_the_sketch_measured(demo_run):
    root, ws, first = demo_run
    manifest = json.loads((ws / "shards" / "reasoning" / "manifest.json").read_text())
    mixture = json.loads(curator("mixes", "-o", "json", "-w", ws).stdout)[0]
    assert manifest["documents"] == mixture["documents"] > 0
    files = [ws / "shards" / "reasoning" / f for shard in manifest["shards"] for f in shard["files"]]
    shards = pl.concat([pl.read_parquet(f) for f in files])
    assert shards["id"].n_unique() == shards.height == mixture["documents"]
    assert "Fidelity on 6 held-out queries × 32 documents (reference: exact EK-FAC run score-" in first.stdout
    record = (root / "bench.md").read_text()
    assert "<!-- demo:begin -->" in record and "| docs_per_source | 8 |" in record and "| **total** |" in record


def test_a_second_run_reuses_everything(demo_run):
    root, ws, _ = demo_run
    model = root / "tiny"
    second = curator("demo", "--model", model, *TINY, "-w", ws)
    assert second.stdout.count("Nothing to do") == 4
    assert "These factors exist already" in second.stdout and "exists already" in second.stdout
    assert len(json.loads(curator("runs", "-o", "json", "-w", ws).stdout)) == 1


def test_the_corpus_is_seeded_and_other_seeds_draw_other_documents(tmp_path):
    settings = DemoSettings(docs_per_source=5, factual_queries=3)
    first = build_demo_corpus(tmp_path / "a", settings)
    again = build_demo_corpus(tmp_path / "b", settings)
    other = build_demo_corpus(tmp_path / "c", settings.model_copy(update={"seed": 1}))
    for name in ("package-docs.jsonl", "trivia.jsonl.gz", "mpmath-docs.parquet", "factual-queries.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "package-docs.jsonl").read_bytes() != (tmp_path / "c" / "package-docs.jsonl").read_bytes()
    code = sorted(p.name for p in (tmp_path / "a" / "stdlib").glob("*.py"))
    assert len(code) == 5 and code == sorted(p.name for p in (tmp_path / "b" / "stdlib").glob("*.py"))
    assert [s.kind for s in first.sources] == [s.kind for s in other.sources] == ["code", "markdown", "trivia",
                                                                                   "math"]
    assert again.factual_queries.read_text().count("\n") == 3
