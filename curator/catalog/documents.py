"""Looking documents up in the catalog."""

from __future__ import annotations

import json

from pydantic import BaseModel

from curator.catalog.database import Catalog
from curator.errors import CuratorError


class Document(BaseModel):
    id: int
    source: str
    kind: str
    external_id: str | None
    origin: str
    chars: int
    bytes: int
    content_hash: str
    batch_id: int
    metadata: dict | None
    text: str


_COLUMNS = "id, source, kind, external_id, origin, chars, bytes, content_hash, batch_id, metadata, text"


def _to_document(row: tuple) -> Document:
    record = dict(zip([c.strip() for c in _COLUMNS.split(",")], row, strict=True))
    if isinstance(record["metadata"], str):
        record["metadata"] = json.loads(record["metadata"])
    return Document(**record)


def get_document(catalog: Catalog, doc_id: int) -> Document:
    row = catalog.one(f"SELECT {_COLUMNS} FROM documents WHERE id = ?", [doc_id])
    if row is None:
        total = catalog.one("SELECT count(*), min(id), max(id) FROM documents")
        span = f"ids {total[1]}..{total[2]}" if total[0] else "it is empty"
        raise CuratorError(f"no document with id {doc_id} in the catalog ({span})")
    return _to_document(row)


def sample_documents(catalog: Catalog, source: str | None, n: int, seed: int = 0) -> list[Document]:
    """n documents of a source (or of the whole corpus), the same ones for the same seed."""
    if source is not None:
        known = [r[0] for r in catalog.sql("SELECT name FROM sources ORDER BY name")]
        if source not in known:
            raise CuratorError(f"no source {source!r} in the catalog (sources: {', '.join(known) or 'none'})")
    # Ordering by a seeded hash is deterministic, unlike DuckDB's parallel sampling.
    rows = catalog.sql(
        f"SELECT {_COLUMNS} FROM documents WHERE ? IS NULL OR source = ? "
        "ORDER BY hash(id, ?), id LIMIT ?",
        [source, source, seed, n],
    )
    return [_to_document(r) for r in rows]
