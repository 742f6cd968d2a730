"""Looking documents up in the catalog."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from pydantic import BaseModel

from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
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


def document_ids(catalog: Catalog, limit: int | None = None, seed: int = 0) -> list[int]:
    """All document ids in order, or a seeded sample of `limit` of them (in id order)."""
    if limit is not None and limit < 1:
        raise CuratorError("--max-docs must be at least 1")
    if limit is None:
        ids = [r[0] for r in catalog.sql("SELECT id FROM documents ORDER BY id")]
    else:   # the same order as `seeded_sample`
        ids = sorted(r[0] for r in catalog.sql(
            "SELECT id FROM documents ORDER BY hash(id, ?), id LIMIT ?", [seed, limit]))
    if not ids:
        raise CuratorError("the catalog has no documents; ingest a corpus first (`curator ingest`)")
    return ids


def seeded_sample(catalog: Catalog, ids: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """`limit` of `ids`, in id order: the same seed picks the same ones, and a sample of the whole
    catalog is the same whichever list it is drawn from (ordered by a seeded hash of the id, which
    is deterministic, unlike DuckDB's parallel sampling)."""
    import pyarrow as pa

    catalog.con.register("sample_candidates", pa.table({"id": pa.array(ids, pa.int64())}))
    try:
        return sorted(r[0] for r in catalog.sql(
            "SELECT id FROM sample_candidates ORDER BY hash(id, ?), id LIMIT ?", [seed, limit]))
    finally:
        catalog.con.unregister("sample_candidates")


def chunk_sizes(catalog: Catalog, chunks: Sequence[Sequence[int]]) -> list[int]:
    """The UTF-8 bytes of each chunk of documents: what balances chunks over ranks before any
    token is counted (tokens are about proportional to bytes for one tokenizer and corpus)."""
    numbers = [n for n, chunk in enumerate(chunks) for _ in chunk]
    ids = [doc_id for chunk in chunks for doc_id in chunk]
    sizes = dict(catalog.sql(
        "SELECT m.chunk, sum(d.bytes) FROM (SELECT unnest(?::BIGINT[]) AS id, unnest(?::BIGINT[]) AS chunk) m "
        "JOIN documents d ON d.id = m.id GROUP BY m.chunk", [ids, numbers]))
    return [int(sizes.get(n, 0)) for n in range(len(chunks))]


def read_texts(catalog: Catalog, ids: Sequence[int], chunk: int = 256) -> Iterator[list[tuple[int, str]]]:
    """(id, text) rows for the given ids, in that order, `chunk` at a time."""
    for start in range(0, len(ids), chunk):
        part = list(ids[start:start + chunk])
        rows = dict(catalog.sql("SELECT id, text FROM documents WHERE id IN (SELECT unnest(?))", [part]))
        yield [(doc_id, rows[doc_id]) for doc_id in part if doc_id in rows]


def show_document(ws: Workspace, doc_id: int) -> Document:
    with Catalog.open(ws) as catalog:
        return get_document(catalog, doc_id)


def sample_from(ws: Workspace, source: str | None, n: int, seed: int = 0) -> list[Document]:
    with Catalog.open(ws) as catalog:
        return sample_documents(catalog, source, n, seed)


def snippets(catalog: Catalog, doc_ids: Sequence[int], chars: int = 200) -> dict[int, tuple[str, str]]:
    """doc id → (source, the start of its text on one line)."""
    rows = catalog.sql("SELECT id, source, regexp_replace(left(text, ?), '\\s+', ' ', 'g') FROM documents "
                       "WHERE id IN (SELECT unnest(?::BIGINT[]))", [chars, list(doc_ids)])
    return {r[0]: (r[1], r[2]) for r in rows}
