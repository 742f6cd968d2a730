"""FAISS indexes over sketch stores: build, open, and the top and bottom rows for query sketches.

The catalog maps an index's rows to documents (`index_rows`); the FAISS file
itself only holds vectors in insertion order (curator/indexes/faiss_index.py).
"""

from __future__ import annotations

import numpy as np

from curator.artifacts import reading
from curator.catalog.database import Catalog
from curator.catalog.records import find_record
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.indexes import faiss_index
from curator.sketch.store import iter_shards, load_store


def build_index(ws: Workspace, store_id: str | None = None, factory: str = "Flat", name: str | None = None) -> dict:
    """An inner-product index over a store (by id or prefix; default the latest), recorded in the catalog."""
    import pyarrow as pa

    store = load_store(ws, store_id)
    if not store.complete:
        raise CuratorError(f"the sketch store {store.id} is incomplete; run `curator sketch` again to finish it")
    name = name or f"{store.id}-{factory.replace(',', '_')}"
    doc_ids = np.concatenate([ids for ids, _ in iter_shards(ws, store)])
    sample = None
    if "IVF" in factory or "PQ" in factory:   # trained indexes learn from a sample of the store
        sample = np.concatenate([v for _, v in iter_shards(ws, store)])[:100_000]
    try:
        index = faiss_index.build((v for _, v in iter_shards(ws, store)), store.dim, factory, sample)
    except ValueError as exc:
        raise CuratorError(str(exc)) from None
    path = ws.artifact_dir("indexes") / f"{name}.faiss"
    faiss_index.save(index, path)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        catalog.sql("DELETE FROM index_rows WHERE index_name = ?", [name])
        catalog.sql("DELETE FROM sketch_indexes WHERE name = ?", [name])
        catalog.sql("INSERT INTO sketch_indexes (name, store_id, factory, path, rows) VALUES (?, ?, ?, ?, ?)",
                    [name, store.id, factory, str(path.relative_to(ws.root)), len(doc_ids)])
        catalog.insert_arrow("index_rows", pa.table({
            "index_name": pa.array([name] * len(doc_ids), pa.string()),
            "row": pa.array(np.arange(len(doc_ids)), pa.int64()),
            "doc_id": pa.array(doc_ids, pa.int64())}))
        catalog.sql("COMMIT")
    return {"name": name, "rows": len(doc_ids), "path": str(path)}


def open_index(ws: Workspace, name: str | None = None):
    """(index, row → doc id array, store id) for an index name (a unique prefix is enough), or the latest index."""
    with Catalog.open(ws) as catalog:
        row = find_record(catalog, "sketch_indexes", name, what="index", id_column="name",
                          create_hint="run `curator index build` first", columns="name, store_id, path, factory")
        doc_ids = np.array([r[0] for r in catalog.sql(
            "SELECT doc_id FROM index_rows WHERE index_name = ? ORDER BY row", [row[0]])], dtype=np.int64)
    path = ws.root / row[2]
    with reading(path, "FAISS index", f"curator index build --store {row[1]} --factory '{row[3]}' --name {row[0]}"):
        index = faiss_index.load(path)
        if index.ntotal != len(doc_ids):
            raise ValueError(f"{index.ntotal} rows where the catalog maps {len(doc_ids)}")
    return index, doc_ids, row[1]


def top_and_bottom(index, doc_ids: np.ndarray, query_vectors: np.ndarray, top: int, bottom: int):
    """Per query: [(doc_id, score)] of the top and of the bottom documents by inner product."""
    results = []
    for vector in query_vectors:
        best_scores, best_rows = faiss_index.search(index, vector[None], top) if top else (np.zeros((1, 0)),) * 2
        worst_scores, worst_rows = faiss_index.search(index, -vector[None], bottom) if bottom else \
            (np.zeros((1, 0)),) * 2
        results.append({
            "top": [(int(doc_ids[r]), float(s)) for r, s in zip(best_rows[0], best_scores[0], strict=True) if r >= 0],
            "bottom": [(int(doc_ids[r]), -float(s)) for r, s in zip(worst_rows[0], worst_scores[0], strict=True)
                       if r >= 0]})
    return results
