"""Shared test helpers: real files, real catalogs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import zstandard

from curator.catalog import Catalog
from curator.ingest import IngestOptions, ingest
from curator.workspace import Workspace


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
