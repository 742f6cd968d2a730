"""Recorded work: fits and scoring runs, as tables and records."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError


class RunRecord(BaseModel):
    id: str
    kind: str
    method: str
    model_id: str
    factors_id: str | None
    query_ids: list[str]
    settings: dict
    out_path: str
    stats: dict


def get_run(catalog: Catalog, run_id: str | None = None) -> RunRecord:
    """A run by id (a unique prefix is enough), or the latest one."""
    row = find_record(catalog, "runs", run_id, what="scoring run", create_hint="run `curator score` first",
                      columns="id, kind, method, model_id, factors_id, query_ids, settings, out_path, stats",
                      order_column="finished_at")
    return RunRecord(id=row[0], kind=row[1], method=row[2], model_id=row[3], factors_id=row[4],
                     query_ids=json.loads(row[5]), settings=json.loads(row[6]), out_path=row[7],
                     stats=json.loads(row[8]))


def rescore_command(run: RunRecord) -> str:
    """The command that writes a run's scores again."""
    import shlex

    s = run.settings
    parts = ["curator", "score", "--queries", s.get("queries") or ",".join(run.query_ids), "--out", run.out_path]
    if run.method == "sketch":
        parts += ["--method", "sketch", "--store", str(s.get("store"))]
    else:
        parts += ["--factors", str(run.factors_id), "--query-rank", str(s.get("query_rank", "auto"))]
        for flag, key in (("--max-docs", "max_docs"), ("--max-seq-len", "max_seq_len"), ("--dtype", "dtype")):
            if s.get(key) is not None:
                parts += [flag, str(s[key])]
    return shlex.join(parts) + " --force"


def score_files(path: str | Path) -> list[str]:
    """The Parquet files of a run's scores, for DuckDB's `read_parquet` and polars' `scan_parquet`.

    A run writes a score dataset: a folder of Parquet parts (per query batch and chunk of documents,
    written by whichever rank scored them, joined when there are many), every part with the columns
    query_id, doc_id, score, score_per_nat, and a manifest listing the parts. The parts are taken
    from the manifest, which is replaced atomically: a reader never sees a part twice or half of a
    publish or a join (curator/influence/score_dataset.py). A folder without one is read by its
    Parquet files; runs written as a single file (sketch scores, older runs) as that file.
    """
    path = Path(path)
    if not path.is_dir():
        return [str(path)]
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            parts = json.loads(manifest.read_text()).get("parts")
        except (OSError, ValueError, AttributeError):
            parts = None
        if isinstance(parts, list) and parts:
            return [str(path / name) for name in parts]
    return [str(p) for p in sorted(path.glob("*.parquet"))]


def sql_files(files: list[str]) -> str:
    """A list of paths as a DuckDB list literal (for `read_parquet` and `parquet_metadata`)."""
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def load_run_scores(run: RunRecord, columns: list[str] | None = None, query_ids: list[str] | None = None):
    """A run's scores as a polars LazyFrame (nothing is read until the caller collects or streams it),
    optionally only some columns and queries; a missing or damaged dataset is one error naming it and
    the command that writes it again. The stages after the model read scores through DuckDB in bounded
    memory (curator/curate/scores.py); this is for callers that want a polars plan."""
    import polars as pl

    from curator.artifacts import reading

    path = Path(run.out_path)
    with reading(path, f"score file of run {run.id}", rescore_command(run)):
        frame = pl.scan_parquet(score_files(path))
        frame.collect_schema()      # reads the footers only: a damaged file fails here, inside `reading`
    if query_ids is not None:
        frame = frame.filter(pl.col("query_id").is_in(query_ids))
    return frame.select(columns) if columns else frame


def runs_table(ws: Workspace):
    import polars as pl

    with Catalog.open(ws) as catalog:
        rows = catalog.sql(
            "SELECT r.id, r.method, m.name, r.factors_id, json_array_length(r.query_ids), "
            "CAST(json_extract(r.stats, '$.documents') AS BIGINT), "
            "CAST(json_extract(r.stats, '$.docs_per_second') AS DOUBLE), r.finished_at, r.out_path "
            "FROM runs r LEFT JOIN models m ON m.id = r.model_id ORDER BY r.finished_at")
    return pl.DataFrame(rows, orient="row", schema=["run", "method", "model", "factors", "queries", "documents",
                                                    "docs/s", "finished", "scores"])


def factors_table(ws: Workspace):
    import polars as pl

    with Catalog.open(ws) as catalog:
        rows = catalog.sql(
            "SELECT f.id, m.name, json_extract_string(f.settings, '$.modules'), "
            "json_extract_string(f.settings, '$.layers'), json_array_length(f.modules), "
            "json_extract_string(f.settings, '$.fisher'), CAST(json_extract(f.stats, '$.documents') AS BIGINT), "
            "CAST(json_extract(f.stats, '$.tokens') AS BIGINT), f.created_at "
            "FROM factors f LEFT JOIN models m ON m.id = f.model_id ORDER BY f.created_at")
    return pl.DataFrame(rows, orient="row", schema=["fit", "model", "modules", "blocks", "layers", "fisher",
                                                    "documents", "tokens", "created"])


# Recorded work listed as rows (`curator stores`, `curator index list`, `curator rankings` and the
# service's routes): the catalog table and its columns, listed oldest first. JSON columns come back parsed.
LISTINGS = {
    "stores": ("sketch_stores", ("id", "path", "factors_id", "method", "manifest", "created_at")),
    "indexes": ("sketch_indexes", ("name", "store_id", "factory", "path", "rows", "created_at")),
    "rankings": ("rankings", ("name", "run_id", "tasks", "query_ids", "aggregate", "normalize", "tokenizer_id",
                              "documents", "created_at")),
    "exports": ("exports", ("path", "mixture", "format", "manifest", "created_at")),
}
_JSON_COLUMNS = {"manifest", "tasks", "query_ids"}


def listing(catalog: Catalog, what: str, key: str | None = None) -> list[dict]:
    """The rows of one kind of record (LISTINGS), or the one whose first column is `key`."""
    table, columns = LISTINGS[what]
    where = f" WHERE {columns[0]} = ?" if key is not None else ""
    rows = catalog.sql(f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY created_at",
                       [key] if key is not None else None)
    items = [dict(zip(columns, row, strict=True)) for row in rows]
    for item in items:
        for name in _JSON_COLUMNS & item.keys():
            item[name] = json.loads(item[name])
    return items


def list_recorded(ws: Workspace, what: str) -> list[dict]:
    with Catalog.open(ws) as catalog:
        return listing(catalog, what)


def record_model(catalog: Catalog, info) -> None:
    """Insert or refresh a model's row from its ModelInfo (curator.model.loading)."""
    catalog.sql(
        "INSERT INTO models (id, name, format, location, tokenizer_id, info) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, location = excluded.location",
        [info.id, info.name, info.format, info.location, info.tokenizer_id, info.model_dump_json()],
    )


def store_token_counts(catalog: Catalog, tokenizer_id: str, counts: dict[int, int]) -> None:
    """Cache per-document token counts for a tokenizer (INSERT OR REPLACE: counts never change)."""
    if not counts:
        return
    import pyarrow as pa

    table = pa.table({
        "doc_id": pa.array(list(counts), pa.int64()),
        "tokenizer": pa.array([tokenizer_id] * len(counts), pa.string()),
        "tokens": pa.array(list(counts.values()), pa.int64()),
    })
    catalog.insert_arrow("token_counts", table, replace=True)


# -- one way to name a recorded thing: a unique id prefix, or the latest ----------------------

def find_record(catalog: Catalog, table: str, key: str | None, *, columns: str, what: str, create_hint: str,
                id_column: str = "id", order_column: str = "created_at") -> tuple:
    """The row of `table` whose id starts with `key` (it must be the only one), or the latest row.

    `what` names the thing in errors ("run", "fit", "sketch store"); `create_hint` says how to make one.
    """
    if key is None:
        row = catalog.one(f"SELECT {columns} FROM {table} ORDER BY {order_column} DESC, {id_column} DESC LIMIT 1")
        if row is None:
            raise CuratorError(f"the workspace has no {what}; {create_hint}")
        return row
    rows = catalog.sql(f"SELECT {columns} FROM {table} WHERE starts_with({id_column}, ?)", [key])
    exact = [r for r in rows if r[0] == key]
    if len(rows) == 1 or len(exact) == 1:
        return (exact or rows)[0]
    known = [r[0] for r in catalog.sql(f"SELECT {id_column} FROM {table} ORDER BY {order_column}")]
    listed = ", ".join(known[-10:]) or "none"
    amount = "no" if not rows else "more than one"
    raise CuratorError(f"{amount} {what} matches {key!r} (known: {listed})")
