"""Shared test helpers: real files, real catalogs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import zstandard

from curator.catalog.database import Catalog
from curator.catalog.ingest import IngestOptions, ingest
from curator.catalog.workspace import Workspace


def write_jsonl(path: Path, records: list, compression: str | None = None) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_ingest(ws: Workspace, paths, **options):
    options.setdefault("source", "src")
    return ingest(ws, [str(p) for p in paths], IngestOptions(**options))


def catalog_rows(ws: Workspace, query: str, params=None):
    with Catalog.open(ws) as catalog:
        return catalog.sql(query, params)


def snapshot(ws: Workspace) -> dict:
    """Everything a failed ingest must leave untouched."""
    with Catalog.open(ws) as catalog:
        return {
            "rows": catalog.sql("SELECT * EXCLUDE (metadata), metadata::VARCHAR FROM document_rows ORDER BY id"),
            "batches": catalog.sql("SELECT id, source, status, inserted FROM ingest_batches ORDER BY id"),
            "sources": catalog.sql("SELECT name, kind FROM sources ORDER BY name"),
        }


# The console script installed beside the interpreter running the tests (a venv
# need not be activated); its absence is a packaging failure, not a reason to skip.
CURATOR = str(Path(sys.executable).with_name("curator"))


def curator(*args, cwd=None, env=None, check=True):
    run_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    run_env.pop("CURATOR_WORKSPACE", None) if env is None or "CURATOR_WORKSPACE" not in env else None
    result = subprocess.run([CURATOR, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=run_env)
    if check and result.returncode != 0:
        raise AssertionError(f"curator {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def plant_run(ws, tmp_path, scores, losses: dict[str, float], run_id="score-test", tokenizer="tok-test"):
    """A scored run as `curator score` records it: Parquet, run row, model row."""
    import polars as pl

    path = tmp_path / f"{run_id}.parquet"
    scores.with_columns(
        (pl.col("score") / pl.col("query_id").replace_strict(losses)).alias("score_per_nat")
    ).write_parquet(path)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("INSERT OR REPLACE INTO models (id, name, format, location, tokenizer_id, info) "
                    "VALUES ('m', 'tiny', 'hf', '/nowhere', ?, '{}')", [tokenizer])
        catalog.sql("INSERT INTO runs (id, kind, method, model_id, factors_id, query_ids, settings, out_path, stats) "
                    "VALUES (?, 'score', 'exact', 'm', NULL, ?, '{}', ?, ?)",
                    [run_id, json.dumps(sorted(losses)), str(path), json.dumps({"query_losses": losses})])
    return path
