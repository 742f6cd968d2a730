"""Recorded work: fits and scoring runs, as tables and records."""

from __future__ import annotations

import json

from pydantic import BaseModel

from curator.catalog.database import Catalog
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
    columns = "id, kind, method, model_id, factors_id, query_ids, settings, out_path, stats"
    if run_id is None:
        rows = catalog.sql(f"SELECT {columns} FROM runs ORDER BY finished_at DESC, id LIMIT 1")
        if not rows:
            raise CuratorError("the workspace has no scoring runs; run `curator score` first")
    else:
        rows = catalog.sql(f"SELECT {columns} FROM runs WHERE starts_with(id, ?)", [run_id])
        if len(rows) != 1:
            known = [r[0] for r in catalog.sql("SELECT id FROM runs ORDER BY finished_at")]
            what = "no" if not rows else "more than one"
            raise CuratorError(f"{what} run matches {run_id!r} (runs: {', '.join(known) or 'none'})")
    row = rows[0]
    return RunRecord(id=row[0], kind=row[1], method=row[2], model_id=row[3], factors_id=row[4],
                     query_ids=json.loads(row[5]), settings=json.loads(row[6]), out_path=row[7],
                     stats=json.loads(row[8]))


def runs_table(catalog: Catalog):
    import polars as pl

    rows = catalog.sql(
        "SELECT r.id, r.method, m.name, r.factors_id, json_array_length(r.query_ids), "
        "CAST(json_extract(r.stats, '$.documents') AS BIGINT), "
        "CAST(json_extract(r.stats, '$.docs_per_second') AS DOUBLE), r.finished_at, r.out_path "
        "FROM runs r LEFT JOIN models m ON m.id = r.model_id ORDER BY r.finished_at")
    return pl.DataFrame(rows, orient="row", schema=["run", "method", "model", "factors", "queries", "documents",
                                                    "docs/s", "finished", "scores"])


def factors_table(catalog: Catalog):
    import polars as pl

    rows = catalog.sql(
        "SELECT f.id, m.name, json_extract_string(f.settings, '$.modules'), "
        "json_extract_string(f.settings, '$.layers'), json_array_length(f.modules), "
        "json_extract_string(f.settings, '$.fisher'), CAST(json_extract(f.stats, '$.documents') AS BIGINT), "
        "CAST(json_extract(f.stats, '$.tokens') AS BIGINT), f.created_at "
        "FROM factors f LEFT JOIN models m ON m.id = f.model_id ORDER BY f.created_at")
    return pl.DataFrame(rows, orient="row", schema=["fit", "model", "modules", "blocks", "layers", "fisher",
                                                    "documents", "tokens", "created"])
