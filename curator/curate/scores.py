"""A run's scores, read in bounded memory.

A run's scores can be far larger than memory (a million documents × a hundred
queries is 10⁸ rows), so nothing after the model holds them in Python. The
stages read them through DuckDB, which streams Parquet and spills what it must
hold (sorts, hash tables) to a folder inside the workspace:

  memory    DuckDB's `memory_limit`, $CURATOR_DUCKDB_MEMORY (default 2GB, the
            catalog's connection setting);
  spill     $CURATOR_DUCKDB_TEMP, default `<workspace>/duckdb.tmp/`; DuckDB
            removes its files when the connection closes.

`scores` is the run's dataset as a view: a folder of Parquet parts or, for older
runs and sketch scores, one file (`curator.catalog.records.score_files`).

Parts written by `curator score` carry a summary (curator/influence/score_dataset.py):
their queries, documents and per-query sums. `summarised_parts` hands those to the
stages that can use them: rank takes each query's mean and deviation from the sums
(no statistics scan) and, like the audit, reads only the score column of each part,
a few queries at a time, instead of handing every (query, document, score) row
from DuckDB to numpy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from curator.artifacts import reading
from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, rescore_command, score_files, sql_files
from curator.errors import CuratorError
from curator.influence.score_dataset import PartSummary, part_summaries

TEMP_ENV = "CURATOR_DUCKDB_TEMP"
SCORE_COLUMNS = ("query_id", "doc_id", "score", "score_per_nat")


def spill_folder(catalog: Catalog) -> Path:
    """Where DuckDB writes what does not fit in its memory limit: inside the workspace by default."""
    return Path(os.environ.get(TEMP_ENV) or catalog.path.with_name("duckdb.tmp"))


def bounded(catalog: Catalog) -> Catalog:
    """Let a catalog connection spill to the workspace and stream results without keeping row order
    where a query does not ask for it (DuckDB then needs no buffer to restore it)."""
    folder = spill_folder(catalog)
    catalog.sql(f"SET temp_directory = '{sql_text(folder)}'")
    catalog.sql("SET preserve_insertion_order = false")
    return catalog


@contextmanager
def reading_scores(run: RunRecord) -> Iterator[None]:
    """A missing or unreadable score dataset becomes one error naming it and the command that
    writes it again (DuckDB's I/O errors included)."""
    with reading(Path(run.out_path), f"score file of run {run.id}", rescore_command(run)):
        try:
            yield
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            raise OSError(str(exc).splitlines()[0]) from None


def scores_view(catalog: Catalog, run: RunRecord, name: str = "scores") -> str:
    """Register the run's score dataset as the temporary view `name` and check its columns."""
    bounded(catalog)
    with reading_scores(run):
        catalog.sql(f"CREATE OR REPLACE TEMP VIEW {name} AS "
                    f"SELECT * FROM read_parquet({sql_files(score_files(run.out_path))}, union_by_name = true)")
        columns = [row[0] for row in catalog.sql(f"DESCRIBE {name}")]
    missing = [c for c in SCORE_COLUMNS if c not in columns]
    if missing:
        raise CuratorError(f"the scores of run {run.id} ({run.out_path}) lack the column(s) {', '.join(missing)}; "
                           f"rewrite them with `{rescore_command(run)}`")
    return name


def summarised_parts(run: RunRecord) -> list[PartSummary] | None:
    """The summaries of every part of the run's dataset (the files the `scores` view reads; footers
    only), or None when one part has none: then the stage reads the rows through DuckDB."""
    with reading_scores(run):
        files = [Path(f) for f in score_files(run.out_path)]
        return part_summaries(files) if files else None


def query_rows(part: PartSummary, wanted, documents_per_block: int = 2**23):
    """(positions in `wanted`, start, stop): runs of the part's queries that are in `wanted` (a dict
    query id → position), each short enough that its block holds at most `documents_per_block` values."""
    step = max(1, documents_per_block // max(1, part.documents))
    start = None
    for i, query_id in enumerate([*part.queries, None]):
        inside = query_id is not None and query_id in wanted
        if start is not None and (not inside or i - start == step):
            yield [wanted[q] for q in part.queries[start:i]], start, i
            start = None
        if inside and start is None:
            start = i


def arrow_batches(catalog: Catalog, query: str, params: list | None = None, rows: int = 100_000):
    """A query's result as Arrow record batches of at most `rows` rows, produced as DuckDB computes them
    (a relation streams; a DB-API result would be materialised first)."""
    return catalog.con.sql(query, params=params or None).to_arrow_reader(rows)


def sql_text(path: str | Path) -> str:
    """A path or name inside a single-quoted SQL string."""
    return str(path).replace("'", "''")
