"""Index builds, searches and blocked sketch scoring over a sketch store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curator.catalog.database import Catalog
from curator.errors import CuratorError
from curator.indexes import faiss_index
from curator.sketch.build import SketchStore, iter_shards
from curator.catalog.workspace import Workspace


def build_index(ws: Workspace, store: SketchStore, factory: str = "Flat", name: str | None = None) -> dict:
    import pyarrow as pa

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
    """(index, row → doc id array, store id) for an index name, or the latest index."""
    with Catalog.open(ws) as catalog:
        row = (catalog.one("SELECT name, store_id, path FROM sketch_indexes ORDER BY created_at DESC LIMIT 1")
               if name is None else
               catalog.one("SELECT name, store_id, path FROM sketch_indexes WHERE name = ?", [name]))
        if row is None:
            raise CuratorError("no index" + (f" named {name!r}" if name else "; run `curator index build`"))
        doc_ids = np.array([r[0] for r in catalog.sql(
            "SELECT doc_id FROM index_rows WHERE index_name = ? ORDER BY row", [row[0]])], dtype=np.int64)
    return faiss_index.load(ws.root / row[2]), doc_ids, row[1]


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


def blocked_scores(ws: Workspace, store: SketchStore, query_vectors: np.ndarray):
    """(doc ids, documents × queries scores) by one matrix product per shard."""
    ids, blocks = [], []
    for shard_ids, vectors in iter_shards(ws, store):
        ids.append(shard_ids)
        blocks.append(vectors @ query_vectors.T)
    return np.concatenate(ids), np.concatenate(blocks)


def write_sketch_scores(path: Path, doc_ids: np.ndarray, scores: np.ndarray, query_ids: list[str],
                        losses: dict[str, float]) -> None:
    """The same Parquet layout as exact scoring: query_id, doc_id, score, score_per_nat."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_docs = len(doc_ids)
    per_nat = scores / np.array([losses[q] for q in query_ids])[None, :]
    table = pa.table({
        "query_id": pa.array(np.repeat(np.array(query_ids, dtype=object), n_docs), pa.string()),
        "doc_id": pa.array(np.tile(doc_ids, len(query_ids)), pa.int64()),
        "score": pa.array(scores.T.reshape(-1).astype(np.float32)),
        "score_per_nat": pa.array(per_nat.T.reshape(-1).astype(np.float32)),
    })
    part = path.with_name(path.name + ".tmp")
    pq.write_table(table, part)
    part.replace(path)


def sketch_score(ws: Workspace, config, *, out: Path | None = None, loaded=None, force: bool = False):
    """`curator score --method sketch`: every document × query from the store, one product per shard."""
    import hashlib
    import json
    import time

    from curator.influence.factors import get_factors, load_model_for
    from curator.catalog.queries import select_queries
    from curator.influence.score import ScoreResult, record_run
    from curator.sketch.build import load_store, sketch_queries

    started = time.perf_counter()
    store = load_store(ws, config.store)
    with Catalog.open(ws) as catalog:
        queries = select_queries(catalog, config.queries)
        record = get_factors(catalog, store.factors_id)
    digest = hashlib.blake2b(json.dumps([store.id, [q.model_dump() for q in queries]], sort_keys=True).encode(),
                             digest_size=6)
    run_id = f"score-{digest.hexdigest()}"
    out = Path(out) if out else ws.artifact_dir("scores") / f"{run_id}.parquet"
    loaded = loaded or load_model_for(ws, record, model=config.model, device=config.device)
    vectors, losses = sketch_queries(ws, store, loaded, queries, config.batch_tokens)
    scoring = time.perf_counter()
    doc_ids, scores = blocked_scores(ws, store, vectors)
    elapsed = time.perf_counter() - scoring
    write_sketch_scores(out, doc_ids, scores, [q.id for q in queries], losses)
    stats = {"documents": len(doc_ids), "queries": len(queries), "store": store.id, "query_losses": losses,
             "tokens": 0, "seconds": {"total": round(time.perf_counter() - started, 3),
                                      "blocked product": round(elapsed, 3)},
             "docs_per_second": round(len(doc_ids) / max(elapsed, 1e-9), 2)}
    config = config.model_copy(update={"store": store.id})
    record_run(ws, run_id, config, loaded, store.factors_id, queries, out, stats)
    return ScoreResult(run_id=run_id, factors_id=store.factors_id, out_path=str(out.resolve()), stats=stats)


def rerank(ws: Workspace, store: SketchStore, loaded, queries, candidates: list[list[int]],
           batch_tokens: int = 4096) -> list[list[tuple[int, float]]]:
    """Exact scores of each query's candidate documents, best first (two-stage search)."""
    import tempfile

    import polars as pl

    from curator.influence.score import ScoreConfig, score

    config = ScoreConfig(factors=store.factors_id, batch_tokens=batch_tokens, chat_template=store.chat_template,
                         max_seq_len=store.max_seq_len, device=str(loaded.device))
    union = sorted({d for c in candidates for d in c})
    with tempfile.TemporaryDirectory() as tmp:
        result = score(ws, config, out=Path(tmp) / "rerank.parquet", loaded=loaded, queries=queries,
                       doc_ids=union, record=False)
        table = pl.read_parquet(result.out_path)
    ranked = []
    for query, docs in zip(queries, candidates, strict=True):
        mine = table.filter(pl.col("query_id") == query.id).filter(pl.col("doc_id").is_in(docs))
        ranked.append([(int(d), float(s)) for d, s in mine.sort("score", descending=True)
                       .select("doc_id", "score").iter_rows()])
    return ranked
