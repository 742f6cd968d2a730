"""After another ingest, `score` and `sketch` over the whole catalog add only the new documents to the
same run or store, and the result equals a run over everything."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, loaded_tiny

from curator.catalog.database import Catalog, create_workspace
from curator.catalog.queries import Query, store_queries
from curator.catalog.records import score_files
from curator.catalog.workspace import Workspace
from curator.influence.fit import FitConfig, fit
from curator.influence.score import ScoreConfig, score
from curator.sketch.build import sketch
from curator.sketch.store import SketchConfig, iter_shards

FIRST = TRAINING_TEXT + ["x = 1", "y = x * 2"]
LATER = [t[::-1] for t in TRAINING_TEXT]
SUITE = [Query(id=f"s{i}", task="arithmetic", prompt=f"Calculate the answer: ({i} + 3) * 2",
               completion=f"{i + 3} * 2 = {2 * (i + 3)}.") for i in range(3)]


class Count:
    def __init__(self):
        self.docs = self.tokens = 0

    def stage(self, description, total_docs):
        pass

    def advance(self, docs, tokens):
        self.tokens += tokens


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A workspace scored and sketched, then grown by an ingest; and a copy of it grown first."""
    root = tmp_path_factory.mktemp("incremental")
    ws, _ = create_workspace(root / "ws")
    write_jsonl(root / "first.jsonl", [{"text": t} for t in FIRST])
    write_jsonl(root / "later.jsonl", [{"text": t} for t in LATER])
    run_ingest(ws, [root / "first.jsonl"], source="first")
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, SUITE)
    lm = loaded_tiny()
    record = fit(ws, FitConfig(model="tiny", max_seq_len=16, batch_tokens=64), loaded=lm).record
    score_config = ScoreConfig(factors=record.id, chunk_docs=3, batch_tokens=64)
    sketch_config = SketchConfig(suite="s0,s1,s2", rank=3, shard_docs=3, factors=record.id)
    first_run = score(ws, score_config, loaded=lm)
    first_store = sketch(ws, sketch_config, loaded=lm)
    # The same workspace with everything ingested before anything was scored.
    whole = Workspace(root / "whole")
    shutil.copytree(ws.root, whole.root)
    for folder in ("scores", "sketches"):
        shutil.rmtree(whole.root / folder, ignore_errors=True)
    run_ingest(ws, [root / "later.jsonl"], source="later")
    run_ingest(whole, [root / "later.jsonl"], source="later")
    return ws, whole, lm, score_config, sketch_config, first_run, first_store


def test_a_score_run_over_the_catalog_adds_only_new_documents(grown):
    ws, whole, lm, config, _, first, _ = grown
    counter = Count()
    again = score(ws, config, loaded=lm, progress=counter)
    assert again.run_id == first.run_id and again.out_path == first.out_path
    assert again.stats["documents"] == len(FIRST) + len(LATER) and again.stats["added_documents"] == len(LATER)
    everything = score(whole, config, loaded=lm)
    assert everything.run_id == first.run_id
    assert 0 < counter.tokens < everything.stats["tokens"]         # the first documents were not scored again
    a = pl.read_parquet(score_files(everything.out_path)).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(again.out_path)).sort(["query_id", "doc_id"])
    assert a.select("query_id", "doc_id").equals(b.select("query_id", "doc_id"))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-6 * float(a["score"].abs().max()))
    with Catalog.open(ws) as catalog:     # one run, recorded with the whole count
        assert catalog.sql("SELECT count(*), max(CAST(json_extract(stats, '$.documents') AS INT)) FROM runs") \
            == [(1, len(FIRST) + len(LATER))]
    assert score(ws, config, loaded=lm).reused


def test_a_sketch_store_over_the_catalog_grows_by_new_shards(grown):
    ws, whole, lm, _, config, _, first = grown
    grown_store = sketch(ws, config, loaded=lm)
    assert grown_store.id == first.id and grown_store.shards[:len(first.shards)] == first.shards
    assert grown_store.documents == len(FIRST) + len(LATER) and len(grown_store.shards) > len(first.shards)
    fresh = sketch(whole, config, loaded=lm)
    assert fresh.id == first.id

    def vectors(workspace, store):
        return {int(i): v for ids, rows in iter_shards(workspace, store) for i, v in zip(ids, rows, strict=True)}

    got, want = vectors(ws, grown_store), vectors(whole, fresh)
    assert sorted(got) == sorted(want)
    for doc_id in want:
        np.testing.assert_allclose(got[doc_id], want[doc_id], rtol=1e-3, atol=1e-3 * float(np.abs(want[doc_id]).max()))
