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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
from pydantic import BaseModel, Field

from curator.arrays import arrow_of, numpy_of
from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, get_run
from curator.catalog.workspace import Workspace
from curator.constants import REASONING_TASKS, Aggregate, Normalize
from curator.curate.scores import (arrow_batches, bounded, query_rows, reading_scores, scores_view, spill_folder,
                                   sql_text, summarised_parts)
from curator.errors import CuratorError
from curator.influence.score_dataset import PartSummary

if TYPE_CHECKING:
    import polars as pl

AGGREGATES = get_args(Aggregate)
NORMALIZATIONS = get_args(Normalize)
STREAMED = ("mean-z", "mean", "max")     # linear or max aggregates: one pass into per-document arrays
DENSE_SPAN = 32 * 2**20                  # doc-id span of those arrays: 16 bytes per id, 512 MiB each at most
RANK_THREADS = 2                         # threads summing score parts, each with its own such arrays (1 GiB)


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


def streamed_ranking(catalog: Catalog, values: str, aggregate: str, out: Path, every_query: str | None = None) -> bool:
    """Write what `aggregate_sql` computes for "mean-z", "mean" or "max" to the Parquet file `out` (doc_id,
    score, rank) without a grouping by document: for mean-z one aggregate scan gives each query's mean and
    standard deviation, then one streaming pass adds every value (a z-score for mean-z) into arrays indexed
    by doc id (numpy's bincount). A grouping of 10⁸ rows into millions of documents is a hash table DuckDB
    must build and spill; the arrays are 16 bytes per id. False (nothing written) when a doc id is negative
    or reaches DENSE_SPAN, where the SQL grouping is the better tool.

    `every_query`: `values` for every query of the run, unselected; the z-score pass joins it with the
    selected queries' statistics, which selects them too (one join in place of a filter and a join)."""
    if aggregate == "mean-z":
        stats = query_stats(catalog, values)
        if not stats:
            return False
        ids, means, deviations = zip(*stats, strict=True)
        catalog.sql("CREATE OR REPLACE TEMP TABLE rank_stats AS SELECT unnest(?::VARCHAR[]) AS query_id, "
                    "unnest(?::DOUBLE[]) AS m, unnest(?::DOUBLE[]) AS sd", [list(ids), list(means), list(deviations)])
        query = (f"SELECT v.doc_id, CASE WHEN s.sd > 0 THEN (v.value - s.m) / s.sd ELSE 0.0 END AS x "
                 f"FROM {every_query or values} v JOIN rank_stats s USING (query_id)")
    else:
        query = f"SELECT doc_id, value AS x FROM {values}"
    per_document = _per_document(catalog, query, aggregate == "max")
    if per_document is None:
        return False
    _write_ranking(*per_document, aggregate == "max", out)
    return True


def _write_ranking(totals: np.ndarray, counts: np.ndarray, maximum: bool, out: Path) -> None:
    """The Parquet file (doc_id, score, rank) from per-doc-id sums (or maxima) and counts; rank 1 is the
    best score, ties by the smaller id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    doc_ids = np.flatnonzero(counts)
    score = totals[doc_ids] if maximum else totals[doc_ids] / counts[doc_ids]
    order = np.argsort(-score, kind="stable")        # best first, ties by the smaller id (doc_ids ascend)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    # Rows in doc-id order, as the catalog's readers join them to documents.
    pq.write_table(pa.table({"doc_id": arrow_of(doc_ids, "int64"), "score": arrow_of(score, "double"),
                             "rank": arrow_of(rank, "int64")}), out)


def summarised_ranking(parts: list[PartSummary], queries: list[str], normalize: str, aggregate: str,
                       out: Path) -> bool:
    """What `streamed_ranking` writes, from parts that carry a summary (`summarised_parts`): each query's
    count, sum and sum of squares are in the summaries, so mean-z needs no statistics scan, and one pass
    reads only the score column of the selected queries' row groups, adding each document's values
    (z-scores for mean-z) into arrays indexed by doc id. A part's rows are every one of its documents for
    each of its queries, so a query's values add into the documents' slots in one vector operation.
    False (nothing written) for per-token values (their sums are not in the summaries), rank-vote, or
    doc ids outside [0, DENSE_SPAN)."""
    if normalize == "per-token" or aggregate not in STREAMED:
        return False
    column = "score" if normalize == "raw" else "score_per_nat"
    wanted = {q: i for i, q in enumerate(queries)}
    ends = [(p.first_doc, p.first_doc + p.documents - 1) if p.first_doc is not None else None for p in parts]
    doc_ids = [None if end else p.doc_ids() for p, end in zip(parts, ends, strict=True)]
    ends = [end or ((int(ids.min()), int(ids.max())) if len(ids) else (0, -1))
            for end, ids in zip(ends, doc_ids, strict=True)]
    if any(low < 0 or high >= DENSE_SPAN for low, high in ends):
        return False
    means = deviations = None
    if aggregate == "mean-z":
        means, deviations = _summed_stats(parts, column, wanted)
    size = max(high for _, high in ends) + 1 if ends else 0
    work = list(zip(parts, doc_ids, ends, strict=True))
    if any(ids is not None and len(np.unique(ids)) != len(ids) for _, ids, _ in work):
        return False              # not parts as `write_part` writes them: let DuckDB read the rows

    def add(share: list) -> tuple[np.ndarray, np.ndarray]:
        """Sums (or maxima) and counts of a share of the parts, into arrays of its own."""
        totals = np.full(size, -np.inf) if aggregate == "max" else np.zeros(size)
        counts = np.zeros(size, dtype=np.int64)
        for part, ids, (low, high) in share:
            at = slice(low, high + 1) if ids is None else ids
            for positions, start, stop in query_rows(part, wanted):
                values = part.block(column, start, stop)
                if aggregate == "max":            # float32 → float64 is exact, so the maximum can come first
                    totals[at] = np.maximum(totals[at], values.max(axis=0))
                elif means is None:
                    totals[at] += values.sum(axis=0, dtype=np.float64)
                else:                             # (value − mean) / deviation, in float64, in place
                    z = np.subtract(values, means[positions][:, None], dtype=np.float64)
                    spread = deviations[positions]
                    z[spread == 0] = 0.0          # a constant query: every z-score 0, as the SQL's CASE
                    z /= np.where(spread > 0, spread, 1.0)[:, None]
                    totals[at] += z.sum(axis=0)
                counts[at] += stop - start
        return totals, counts

    # Parts are read and summed on RANK_THREADS threads (pyarrow's reads and numpy's arithmetic release the
    # GIL), each into its own arrays, added together at the end.
    with ThreadPoolExecutor(RANK_THREADS) as pool:
        shares = list(pool.map(add, [work[i::RANK_THREADS] for i in range(RANK_THREADS)]))
    totals, counts = shares[0]
    for more, more_counts in shares[1:]:
        if aggregate == "max":
            np.maximum(totals, more, out=totals)
        else:
            totals += more
        counts += more_counts
    _write_ranking(totals, counts, aggregate == "max", out)
    return True


def _summed_stats(parts: list[PartSummary], column: str, wanted: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each wanted query's mean and population standard deviation from the parts' summed counts, values
    and squares, as `query_stats` computes them from a scan; where the squares' sum would lose digits to
    cancellation, the deviation comes from a second read of that query's values (Σ(x − mean)²)."""
    sums = np.zeros((len(wanted), 3))
    for part in parts:
        for query_id, row in zip(part.queries, part.sums[column], strict=True):
            if query_id in wanted:
                sums[wanted[query_id]] += row
    n = np.maximum(sums[:, 0], 1)
    means = sums[:, 1] / n
    variance = np.maximum(sums[:, 2] / n - means * means, 0.0)
    unstable = {q: i for q, i in wanted.items() if variance[i] <= 1e-6 * means[i] ** 2 and means[i] != 0}
    if unstable:
        squares = np.zeros(len(wanted))
        for part in parts:
            for positions, start, stop in query_rows(part, unstable):
                values = part.block(column, start, stop).astype(np.float64) - means[positions][:, None]
                squares[positions] += (values * values).sum(axis=1)
        for i in unstable.values():
            variance[i] = squares[i] / n[i]
    return means, np.sqrt(variance)


def query_stats(catalog: Catalog, values: str) -> list[tuple[str, float, float]]:
    """(query_id, mean, population standard deviation) of each query's values. Sums of values and of their
    squares cost one scan (DuckDB's stddev_pop, a running update per value, costs two to three); where
    the squares' sum would lose digits to cancellation (a mean a thousand deviations from zero, or
    more), the query's deviation is computed again with stddev_pop."""
    rows = catalog.sql(f"SELECT query_id, count(value), sum(value), sum(value * value) FROM {values} "
                       f"GROUP BY query_id")
    stats, unstable = [], []
    for query_id, n, total, squares in rows:
        mean = total / n
        variance = max(squares / n - mean * mean, 0.0)
        if variance <= 1e-6 * mean * mean and mean != 0:
            unstable.append(query_id)
        stats.append((query_id, mean, variance ** 0.5))
    if unstable:
        exact = dict(catalog.sql(f"SELECT query_id, stddev_pop(value) FROM {values} WHERE query_id IN "
                                 f"(SELECT unnest(?::VARCHAR[])) GROUP BY query_id", [unstable]))
        stats = [(q, m, exact.get(q, sd)) for q, m, sd in stats]
    return stats


def _per_document(catalog: Catalog, query: str, maximum: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(sum or max of x, number of values) indexed by doc id, from the rows (doc_id, x) of `query`; the
    arrays grow to the largest id seen. None as soon as an id is negative or reaches DENSE_SPAN."""
    totals, counts = np.zeros(0), np.zeros(0, dtype=np.int64)
    for batch in arrow_batches(catalog, query, rows=1_000_000):
        at = numpy_of(batch.column("doc_id"))
        if not len(at):
            continue
        low, high = int(at.min()), int(at.max())
        if low < 0 or high >= DENSE_SPAN:
            return None
        if high >= len(counts):      # grow to the next power of two: few copies however the ids arrive
            size = 1 << high.bit_length()
            totals = np.concatenate([totals, np.full(size - len(totals), -np.inf if maximum else 0.0)])
            counts = np.concatenate([counts, np.zeros(size - len(counts), dtype=np.int64)])
        x = numpy_of(batch.column("x"))
        at_low = at - low                # a batch usually holds a narrow range of ids
        counts[low:high + 1] += np.bincount(at_low, minlength=high + 1 - low)
        if maximum:
            np.maximum.at(totals, at, x)
        else:
            totals[low:high + 1] += np.bincount(at_low, weights=x, minlength=high + 1 - low)
    return totals, counts


def _every_query(normalize: str) -> str | None:
    """The run's values for every query as a relation, for normalisations that need no join."""
    if normalize == "per-token":
        return None
    column = "score" if normalize == "raw" else "score_per_nat"
    return f"(SELECT query_id, doc_id, CAST({column} AS DOUBLE) AS value FROM scores)"


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
        parts = summarised_parts(run)
        with reading_scores(run):
            written = parts is not None and summarised_ranking(parts, queries, config.normalize, config.aggregate,
                                                               staged)
            if not written and not (config.aggregate in STREAMED and streamed_ranking(
                    catalog, values, config.aggregate, staged, _every_query(config.normalize))):
                catalog.sql(f"COPY ({aggregate_sql(config.aggregate, values)}) TO '{sql_text(staged)}' "
                            f"(FORMAT parquet)")
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
