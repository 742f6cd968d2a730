"""Streaming a catalog's documents to the model, and what a model pass writes back.

Long jobs read documents through one read-only connection (other readers keep
working) and write their records at the end through a short write-open.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from curator.catalog.database import Catalog
from curator.errors import CuratorError
from curator.model.loading import ModelInfo
from curator.model.tokens import Window, tokenize_documents


def document_ids(catalog: Catalog, limit: int | None = None, seed: int = 0) -> list[int]:
    """All document ids in order, or a seeded sample of `limit` of them (in id order)."""
    if limit is None:
        ids = [r[0] for r in catalog.sql("SELECT id FROM documents ORDER BY id")]
    else:
        if limit < 1:
            raise CuratorError("--max-docs must be at least 1")
        ids = sorted(r[0] for r in catalog.sql(
            "SELECT id FROM documents ORDER BY hash(id, ?), id LIMIT ?", [seed, limit]))
    if not ids:
        raise CuratorError("the catalog has no documents; ingest a corpus first (`curator ingest`)")
    return ids


def read_texts(catalog: Catalog, ids: Sequence[int], chunk: int = 256) -> Iterator[list[tuple[int, str]]]:
    """(id, text) rows for the given ids, in that order, `chunk` at a time."""
    for start in range(0, len(ids), chunk):
        part = list(ids[start:start + chunk])
        rows = dict(catalog.sql("SELECT id, text FROM documents WHERE id IN (SELECT unnest(?))", [part]))
        yield [(doc_id, rows[doc_id]) for doc_id in part if doc_id in rows]


def document_windows(catalog: Catalog, tokenizer, ids: Sequence[int], max_len: int,
                     counts: dict[int, int], chunk: int = 256
                     ) -> Iterator[tuple[int, list[Window]]]:
    """(number of documents, their windows) per chunk; fills `counts` with token counts."""
    for rows in read_texts(catalog, ids, chunk):
        windows, chunk_counts = tokenize_documents(tokenizer, rows, max_len)
        counts.update(chunk_counts)
        yield len(rows), windows


def record_model(catalog: Catalog, info: ModelInfo) -> None:
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
