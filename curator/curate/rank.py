"""`curator rank`: one reasoning score per document from a scored run.

Two explicit steps, each a choice the user names:

normalise each (query, document) score
  raw        the influence I(q, d) as scored;
  per-nat    I(q, d) / ℓ(q): divided by the completion's information in nats
             (Ruis et al.), so queries with long or surprising completions do
             not dominate;
  per-token  per-nat, divided again by the document's token count, so a long
             document does not win by length alone.
aggregate over the selected queries
  mean-z     standardise each query's scores over documents (z-scores), then
             average: every query has the same say whatever its scale;
  mean       the plain average;
  max        the best query's score: a document that strongly helps any one query;
  rank-vote  each query's percentile rank of the document (0 = worst, 1 = best),
             averaged: a Borda count, robust to outliers.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, get_args

from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, get_run, load_run_scores
from curator.catalog.workspace import Workspace
from curator.constants import REASONING_TASKS, Aggregate, Normalize
from curator.errors import CuratorError

if TYPE_CHECKING:
    import polars as pl

AGGREGATES = get_args(Aggregate)
NORMALIZATIONS = get_args(Normalize)


class RankConfig(BaseModel):
    name: str = Field(min_length=1)
    run: str | None = Field(None, description="scoring run id (or prefix); default: the latest")
    tasks: list[str] = Field(default_factory=lambda: list(REASONING_TASKS))
    aggregate: Aggregate = "mean-z"
    normalize: Normalize = "per-nat"


class RankResult(BaseModel):
    name: str
    run_id: str
    query_ids: list[str]
    documents: int


def normalized_scores(scores, normalize: str, tokens=None):
    """(query_id, doc_id, value) from a run's (query_id, doc_id, score, score_per_nat) frame."""
    import polars as pl

    if normalize == "raw":
        return scores.select("query_id", "doc_id", pl.col("score").cast(pl.Float64).alias("value"))
    frame = scores.select("query_id", "doc_id", pl.col("score_per_nat").cast(pl.Float64).alias("value"))
    if normalize == "per-nat":
        return frame
    if normalize == "per-token":
        frame = frame.join(tokens.select("doc_id", "tokens"), on="doc_id", how="left")
        missing = frame.filter(pl.col("tokens").is_null())
        if missing.height:
            raise CuratorError(f"no token count for document {missing['doc_id'][0]}; score the run again to "
                               f"count its tokens")
        return frame.select("query_id", "doc_id",
                            (pl.col("value") / pl.col("tokens").clip(lower_bound=1)).alias("value"))
    raise CuratorError(f"--normalize {normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")


def aggregate_scores(values, aggregate: str):
    """(doc_id, score, rank) from (query_id, doc_id, value); rank 1 is the most helpful document."""
    import polars as pl

    if aggregate == "mean-z":
        mean = pl.col("value").mean().over("query_id")
        std = pl.col("value").std(ddof=0).over("query_id")
        per_query = pl.when(std > 0).then((pl.col("value") - mean) / std).otherwise(0.0)
        combine = pl.col("x").mean()
    elif aggregate == "mean":
        per_query, combine = pl.col("value"), pl.col("x").mean()
    elif aggregate == "max":
        per_query, combine = pl.col("value"), pl.col("x").max()
    elif aggregate == "rank-vote":
        count = pl.len().over("query_id")
        rank = pl.col("value").rank(method="average").over("query_id")
        per_query = pl.when(count > 1).then((rank - 1) / (count - 1)).otherwise(0.5)
        combine = pl.col("x").mean()
    else:
        raise CuratorError(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    combined = (values.with_columns(per_query.alias("x")).group_by("doc_id").agg(combine.alias("score"))
                .sort(["score", "doc_id"], descending=[True, False]))
    return combined.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"))


def rank(ws: Workspace, config: RankConfig, *, replace: bool = False) -> RankResult:
    import polars as pl

    with Catalog.open(ws) as catalog:
        run = get_run(catalog, config.run)
        queries = _run_queries(catalog, run, config.tasks)
        tokenizer_id = catalog.one("SELECT tokenizer_id FROM models WHERE id = ?", [run.model_id])[0]
        tokens = catalog.frame("SELECT doc_id, tokens FROM token_counts WHERE tokenizer = ?", [tokenizer_id])
        exists = catalog.one("SELECT 1 FROM rankings WHERE name = ?", [config.name])
    if exists and not replace:
        raise CuratorError(f"a ranking named {config.name!r} exists; choose another --name or pass --replace")
    scores = load_run_scores(run, query_ids=queries)
    if tokens.is_empty():
        tokens = pl.DataFrame(schema={"doc_id": pl.Int64, "tokens": pl.Int64})
    ranked = aggregate_scores(normalized_scores(scores, config.normalize, tokens), config.aggregate)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        catalog.sql("DELETE FROM ranking_scores WHERE ranking = ?", [config.name])
        catalog.sql("DELETE FROM rankings WHERE name = ?", [config.name])
        catalog.sql(
            "INSERT INTO rankings (name, run_id, tasks, query_ids, aggregate, normalize, tokenizer_id, documents) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [config.name, run.id, json.dumps(config.tasks), json.dumps(queries), config.aggregate,
             config.normalize, tokenizer_id, ranked.height])
        table = ranked.with_columns(pl.lit(config.name).alias("ranking")).select(
            "ranking", "doc_id", "score", "rank").to_arrow()
        catalog.insert_arrow("ranking_scores", table)
        catalog.sql("COMMIT")
    return RankResult(name=config.name, run_id=run.id, query_ids=queries, documents=ranked.height)


def _run_queries(catalog: Catalog, run: RunRecord, tasks: list[str]) -> list[str]:
    rows = catalog.sql("SELECT id, task FROM queries WHERE id IN (SELECT unnest(?)) ORDER BY id", [run.query_ids])
    chosen = [qid for qid, task in rows if task in tasks]
    if not chosen:
        present = sorted({task for _, task in rows})
        raise CuratorError(f"run {run.id} scored no query of the tasks {', '.join(tasks)} "
                           f"(its tasks: {', '.join(present) or 'none'})")
    return chosen


def ranked_documents(ws: Workspace, name: str, limit: int, bottom: bool = False) -> pl.DataFrame:
    """The top (or bottom) `limit` documents of a ranking with rank, source, kind, score and a one-line
    snippet (the first 300 characters, whitespace collapsed)."""
    with Catalog.open(ws) as catalog:
        if catalog.one("SELECT 1 FROM rankings WHERE name = ?", [name]) is None:
            known = [r[0] for r in catalog.sql("SELECT name FROM rankings ORDER BY name")]
            raise CuratorError(f"no ranking named {name!r} (rankings: {', '.join(known) or 'none'})")
        order = "DESC" if bottom else "ASC"
        return catalog.frame(
            "SELECT r.rank, r.doc_id, d.source, d.kind, r.score, "
            "regexp_replace(left(d.text, 300), '\\s+', ' ', 'g') AS snippet "
            "FROM ranking_scores r JOIN documents d ON d.id = r.doc_id WHERE r.ranking = ? "
            f"ORDER BY r.rank {order} LIMIT ?", [name, limit])
