"""Scores from a sketch store: every document × query by one matrix product per shard.

`curator score --method sketch` writes them in the same Parquet layout as exact
scoring (query_id, doc_id, score, score_per_nat) and records the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curator.artifacts import atomic_file, content_id
from curator.catalog.database import Catalog
from curator.catalog.queries import select_queries
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.influence.factors import get_factors, load_model_for
from curator.influence.score import ScoreConfig, ScoreResult, record_run
from curator.sketch.build import sketch_queries
from curator.sketch.store import SketchStore, iter_shards, load_store


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
    with atomic_file(path) as part:
        pq.write_table(table, part)


def sketch_score(ws: Workspace, config: ScoreConfig, *, out: Path | None = None, loaded=None,
                 force: bool = False, progress=None) -> ScoreResult:
    """`curator score --method sketch`: every document × query from the store, one product per shard."""
    from curator.model import distributed

    if distributed.current().distributed:
        raise CuratorError("score --method sketch reads the store without a model pass; run it as one process, "
                           "not under torchrun")
    import time

    started = time.perf_counter()
    store = load_store(ws, config.store)
    with Catalog.open(ws) as catalog:
        queries = select_queries(catalog, config.queries)
        record = get_factors(catalog, store.factors_id)
    run_id = content_id("score", store.id, [q.model_dump() for q in queries])
    out = Path(out) if out else ws.artifact_dir("scores") / f"{run_id}.parquet"
    loaded = loaded or load_model_for(ws, record, model=config.model, device=config.device, dtype=config.dtype)
    vectors, losses = sketch_queries(ws, store, loaded, queries, config.batch_tokens)
    scoring = time.perf_counter()
    doc_ids, scores = blocked_scores(ws, store, vectors)
    elapsed = time.perf_counter() - scoring
    write_sketch_scores(out, doc_ids, scores, [q.id for q in queries], losses)
    stats = {"documents": len(doc_ids), "queries": len(queries), "store": store.id, "query_losses": losses,
             "tokens": 0, "seconds": {"total": round(time.perf_counter() - started, 3),
                                      "blocked product": round(elapsed, 3)},
             "docs_per_second": round(len(doc_ids) / max(elapsed, 1e-9), 2)}
    config = config.model_copy(update={"store": store.id, "method": "sketch"})
    record_run(ws, run_id, config, loaded, store.factors_id, queries, out, stats)
    return ScoreResult(run_id=run_id, factors_id=store.factors_id, out_path=str(out.resolve()), stats=stats)
