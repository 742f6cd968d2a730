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
import uuid
from typing import TYPE_CHECKING, get_args

from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, get_run
from curator.catalog.workspace import Workspace
from curator.constants import REASONING_TASKS, Aggregate, Normalize
from curator.curate.scores import bounded, reading_scores, scores_view, spill_folder, sql_text
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


def normalized_values(catalog: Catalog, queries: list[str], normalize: str, tokenizer_id: str) -> str:
    """Define the temporary view `run_values` (query_id, doc_id, value): the selected queries' scores,
    normalised; returns its name. Nothing is read yet: the ranking query streams it."""
    if normalize not in NORMALIZATIONS:
        raise CuratorError(f"--normalize {normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
    catalog.sql("CREATE OR REPLACE TEMP TABLE rank_queries AS SELECT unnest(?::VARCHAR[]) AS query_id", [queries])
    column = "score" if normalize == "raw" else "score_per_nat"
    chosen = f"SELECT query_id, doc_id, CAST({column} AS DOUBLE) AS value FROM scores " \
             f"WHERE query_id IN (SELECT query_id FROM rank_queries)"
    if normalize == "per-token":
        catalog.sql("CREATE OR REPLACE TEMP TABLE rank_tokens AS "
                    "SELECT doc_id, tokens FROM token_counts WHERE tokenizer = ?", [tokenizer_id])
        missing = catalog.one(f"SELECT v.doc_id FROM ({chosen}) v ANTI JOIN rank_tokens t USING (doc_id) LIMIT 1")
        if missing:
            raise CuratorError(f"no token count for document {missing[0]}; score the run again to count its tokens")
        chosen = f"SELECT v.query_id, v.doc_id, v.value / greatest(t.tokens, 1) AS value " \
                 f"FROM ({chosen}) v JOIN rank_tokens t USING (doc_id)"
    catalog.sql(f"CREATE OR REPLACE TEMP VIEW run_values AS {chosen}")
    return "run_values"


def aggregate_sql(aggregate: str, values: str = "run_values") -> str:
    """SQL for (doc_id, score, rank) from the relation `values` (query_id, doc_id, value); rank 1 is the
    most helpful document, ties broken by the smaller id. DuckDB streams the groupings and spills the
    sorts, so the whole query × document table is never in memory."""
    if aggregate == "mean-z":   # population standard deviation: every query's z-scores have variance 1
        combined = (f"WITH stats AS (SELECT query_id, avg(value) AS m, stddev_pop(value) AS sd FROM {values} "
                    f"GROUP BY query_id) SELECT v.doc_id, avg(CASE WHEN s.sd > 0 THEN (v.value - s.m) / s.sd "
                    f"ELSE 0.0 END) AS score FROM {values} v JOIN stats s USING (query_id) GROUP BY v.doc_id")
    elif aggregate in ("mean", "max"):
        combined = f"SELECT doc_id, {'avg' if aggregate == 'mean' else 'max'}(value) AS score FROM {values} " \
                   f"GROUP BY doc_id"
    elif aggregate == "rank-vote":   # ties share the average of their ranks, as a Borda count does
        combined = (f"SELECT doc_id, avg(CASE WHEN n > 1 THEN (low - 1 + (ties - 1) / 2) / (n - 1) ELSE 0.5 END) "
                    f"AS score FROM (SELECT doc_id, rank() OVER (PARTITION BY query_id ORDER BY value) AS low, "
                    f"count(*) OVER (PARTITION BY query_id, value) AS ties, "
                    f"count(*) OVER (PARTITION BY query_id) AS n FROM {values}) GROUP BY doc_id")
    else:
        raise CuratorError(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    return (f"SELECT doc_id, score, row_number() OVER (ORDER BY score DESC, doc_id) AS rank "
            f"FROM ({combined})")


def rank(ws: Workspace, config: RankConfig, *, replace: bool = False) -> RankResult:
    """Rank the run's documents into the catalog's `ranking_scores`. The ranking is computed through a
    read-only connection into a Parquet file in DuckDB's spill folder, then inserted in one short write."""
    with Catalog.open(ws) as catalog:
        run = get_run(catalog, config.run)
        queries = _run_queries(catalog, run, config.tasks)
        tokenizer_id = catalog.one("SELECT tokenizer_id FROM models WHERE id = ?", [run.model_id])[0]
        if catalog.one("SELECT 1 FROM rankings WHERE name = ?", [config.name]) and not replace:
            raise CuratorError(f"a ranking named {config.name!r} exists; choose another --name or pass --replace")
        scores_view(catalog, run)
        values = normalized_values(catalog, queries, config.normalize, tokenizer_id)
        staged = spill_folder(catalog) / f"ranking-{uuid.uuid4().hex}.parquet"
        staged.parent.mkdir(parents=True, exist_ok=True)
        with reading_scores(run):
            catalog.sql(f"COPY ({aggregate_sql(config.aggregate, values)}) TO '{sql_text(staged)}' (FORMAT parquet)")
    try:
        with Catalog.open(ws, write=True) as catalog:
            bounded(catalog)
            catalog.sql("BEGIN")
            catalog.sql("DELETE FROM ranking_scores WHERE ranking = ?", [config.name])
            catalog.sql("DELETE FROM rankings WHERE name = ?", [config.name])
            catalog.sql("INSERT INTO ranking_scores (ranking, doc_id, score, rank) "
                        "SELECT ?, doc_id, score, rank FROM read_parquet(?)", [config.name, str(staged)])
            documents = catalog.one("SELECT count(*) FROM ranking_scores WHERE ranking = ?", [config.name])[0]
            catalog.sql(
                "INSERT INTO rankings (name, run_id, tasks, query_ids, aggregate, normalize, tokenizer_id, "
                "documents) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [config.name, run.id, json.dumps(config.tasks), json.dumps(queries), config.aggregate,
                 config.normalize, tokenizer_id, documents])
            catalog.sql("COMMIT")
    finally:
        staged.unlink(missing_ok=True)
    return RankResult(name=config.name, run_id=run.id, query_ids=queries, documents=documents)


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
