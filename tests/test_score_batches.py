"""Exact scoring split into several query batches, and the bfloat16 path end to end.

`ScoreConfig.query_memory_mb` is the budget for preconditioned queries per pass over the
documents; a suite that does not fit is scored in batches, one document pass each. With the
query form pinned (`query_rank="dense"` or a fixed rank, so "auto" cannot trade batches for a
lower rank), a budget of 2.5 queries' worth splits five queries into batches of 2, 2 and 1,
which must give the scores of one batch. At a fixed rank the small budget also leaves the
rank-r factors un-multiplied, so the two runs take different scoring routes.

Measured: split and one-batch scores agree to 2e-7 of the largest score (dense and rank 4,
three batches each; asserted 1e-5). bfloat16 against float32, fit and scores both in
bfloat16: A differs by 0.2–0.7% per layer, the queries' losses by 0.1–0.5%, and the scores
correlate at Pearson 0.993 / Spearman 0.985 over all (query, document) pairs, Spearman
0.972–0.993 per query. Asserted: > 0.98 / > 0.95 overall and > 0.9 per query; differences
above 1e-4 (bfloat16 rounding happened: float32 reproduces itself to ~1e-7) and below 5%.

How each check was seen to fail (on a scratch copy of the library, never the working tree):
  - chunk files named by their documents only (not their queries): later batches find the
    first batch's chunks "finished", and the split run's table is wrong (both ranks);
  - the second batch scored with the first batch's preconditioned queries: the scores differ;
    (reusing them for the last, smaller batch too: a shape error);
  - `wrap_model` ignoring dtype="bfloat16" (float32 throughout): A equals float32's exactly,
    under the floor that shows bfloat16 rounding;
  - under bfloat16 only, each query's P handed to the document pass of another query (rolled
    by one): Pearson 0.003, Spearman 0.0006.
Rounding P to float8, or keeping the loss's logits in bfloat16, does not move the correlations
(measured on a wider model): bfloat16's own forward and backward dominate. The correlations
guard gross errors; the rounding floors guard that bfloat16 ran at all.
"""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest
import torch

from curator.catalog.database import Catalog, create_workspace
from curator.catalog.ingest import IngestOptions, ingest
from curator.catalog.queries import Query, store_queries
from curator.influence.factors import load_tensors
from curator.influence.fit import FitConfig, fit
from curator.influence.score import ScoreConfig, score
from curator.model.loading import wrap_model
from curator.catalog.records import score_files
from tinylm import tiny_llama, word_tokenizer

WORDS = ("the a one two three four five six seven eight nine ten plus minus times is equals answer "
         "slope line point solve for x y capital of france paris river nile city and step first then").split()
MAX_LEN = 16
N_DOCS = 40
QUERIES = [
    Query(id="q-sum", task="arithmetic", prompt="the answer of two plus three", completion="is five"),
    Query(id="q-times", task="arithmetic", prompt="solve four times two", completion="first four times two is eight"),
    Query(id="q-slope", task="slope", prompt="the slope of the line", completion="equals two minus one"),
    Query(id="q-capital", task="factual", prompt="the capital of france", completion="is paris"),
    Query(id="q-river", task="factual", prompt="the river of the city", completion="is the nile"),
]


def documents() -> list[str]:
    rng = random.Random(1)
    docs: set[str] = set()
    while len(docs) < N_DOCS:
        docs.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))))   # some span two windows
    return sorted(docs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    ws, _ = create_workspace(root / "ws")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents()))
    ingest(ws, [str(root / "docs.jsonl")], IngestOptions(source="words"))
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, QUERIES)
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama(vocab_size=len(tokenizer), hidden=16, intermediate=64)
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = wrap_model(model, tokenizer, name=str(folder))
    record = fit(ws, FitConfig(model=str(folder), max_seq_len=MAX_LEN), loaded=lm).record
    single = score(ws, ScoreConfig(factors=record.id, query_rank="dense"), loaded=lm)
    return ws, lm, folder, record, single


def scores_of(result) -> pl.DataFrame:
    return pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])


@pytest.mark.parametrize("rank", ["dense", 4])
def test_several_query_batches_give_the_scores_of_one(setup, tmp_path, rank):
    ws, lm, _, record, _ = setup
    shapes = [tuple(t["corrected"].shape) for t in load_tensors(ws.root / record.path)[0].values()]
    # One query's P in float32: d_out × d_in per layer dense, (d_out + d_in) × r as rank-r factors.
    per_query = 4 * sum(d_out * d_in if rank == "dense" else (d_out + d_in) * rank for d_out, d_in in shapes)
    one = score(ws, ScoreConfig(factors=record.id, query_rank=rank), loaded=lm, out=tmp_path / "one.parquet")
    split = score(ws, ScoreConfig(factors=record.id, query_rank=rank, query_memory_mb=2.5 * per_query / 2**20),
                  loaded=lm, out=tmp_path / "split.parquet")
    assert not split.reused
    assert one.stats["query_batches"] == 1
    assert split.stats["query_batches"] > 1                 # 3 today: 2, 2 and 1 queries
    assert one.stats["query_rank"] == split.stats["query_rank"] == (None if rank == "dense" else rank)
    a, b = scores_of(one), scores_of(split)
    assert a.height == len(QUERIES) * N_DOCS
    assert a.select(["query_id", "doc_id"]).equals(b.select(["query_id", "doc_id"]))
    scale = float(a["score"].abs().max())
    assert scale > 0
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(b["score_per_nat"].to_numpy(), a["score_per_nat"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * float(a["score_per_nat"].abs().max()))
    assert split.stats["query_losses"] == pytest.approx(one.stats["query_losses"], rel=1e-5)


def test_bfloat16_fit_and_scores_follow_float32(setup):
    ws, lm, folder, record, single = setup
    # Loaded by curator from the saved folder, as `curator fit --dtype bfloat16` would.
    half = fit(ws, FitConfig(model=str(folder), max_seq_len=MAX_LEN, dtype="bfloat16")).record
    assert half.id != record.id and half.model_id == record.model_id and half.settings["dtype"] == "bfloat16"
    half_factors, _ = load_tensors(ws.root / half.path)
    full_factors, _ = load_tensors(ws.root / record.path)
    for name, t in half_factors.items():
        assert all(bool(torch.isfinite(v).all()) for v in t.values()), name
        # Rounded at bfloat16's 8 bits, so the model really ran in bfloat16 (float32 differs by ~1e-7),
        # and no worse than that.
        error = float((t["a_cov"] - full_factors[name]["a_cov"]).norm() / full_factors[name]["a_cov"].norm())
        assert 1e-4 < error < 5e-2, (name, error)

    result = score(ws, ScoreConfig(factors=half.id, model=str(folder), dtype="bfloat16", query_rank="dense"))
    # The scoring pass ran the model in bfloat16 too: the queries' losses carry its rounding.
    for query_id, loss in single.stats["query_losses"].items():
        error = abs(result.stats["query_losses"][query_id] - loss) / loss
        assert 1e-4 < error < 5e-2, (query_id, error)
    a, b = scores_of(single), scores_of(result)
    assert a.select(["query_id", "doc_id"]).equals(b.select(["query_id", "doc_id"]))
    x, y = a["score"].to_numpy().astype(np.float64), b["score"].to_numpy().astype(np.float64)
    assert np.isfinite(y).all()
    assert not np.allclose(x, y, rtol=1e-4, atol=0)        # bfloat16 arithmetic, not a float32 rerun
    pearson = float(np.corrcoef(x, y)[0, 1])
    spearman = float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])
    assert pearson > 0.98 and spearman > 0.95, (pearson, spearman)
    for query in QUERIES:                                    # each query ranks the documents alike
        xq = a.filter(pl.col("query_id") == query.id)["score"].to_numpy()
        yq = b.filter(pl.col("query_id") == query.id)["score"].to_numpy()
        rho = float(np.corrcoef(np.argsort(np.argsort(xq)), np.argsort(np.argsort(yq)))[0, 1])
        assert rho > 0.9, (query.id, rho)
