"""`curator fidelity`: how well a sketch store ranks documents for queries it was not built from.

Exact EK-FAC scores on a seeded sample of documents are the reference. Per
query: Pearson and Spearman over the sample, the overlap of the exact and
sketch top-k (k = 10, 100), and the share of the exact top 10 that the sketch
ranks within its top 1% and 5% (what a two-stage search with re-ranking finds).
"""

from __future__ import annotations

import numpy as np

from curator.catalog import Catalog
from curator.queries import Query
from curator.workspace import Workspace


def ranking_agreement(exact: np.ndarray, approx: np.ndarray) -> dict:
    """Agreement of two score vectors over the same documents."""
    import polars as pl

    n = len(exact)
    order_exact = np.argsort(-exact, kind="stable")
    order_approx = np.argsort(-approx, kind="stable")
    out = {"pearson": float(np.corrcoef(exact, approx)[0, 1]),
           "spearman": float(np.corrcoef(pl.Series(exact).rank().to_numpy(),
                                         pl.Series(approx).rank().to_numpy())[0, 1])}
    for k in (10, 100):
        k_eff = min(k, n)
        out[f"top{k}_overlap"] = len(set(order_exact[:k_eff]) & set(order_approx[:k_eff])) / k_eff
    best = set(order_exact[:min(10, n)])
    for percent in (1, 5):
        cut = max(1, int(np.ceil(n * percent / 100)))
        out[f"top10_recall_at_{percent}pct"] = len(best & set(order_approx[:cut])) / len(best)
    return out


def fidelity(ws: Workspace, store, loaded, queries: list[Query], sample: int = 1000, seed: int = 0) -> dict:
    from curator.corpus import document_ids
    from curator.score import ScoreConfig, score
    from curator.search import blocked_scores
    from curator.sketch import sketch_queries

    held_out = [q for q in queries if q.id not in set(store.suite)]
    if not held_out:
        from curator.errors import CuratorError

        raise CuratorError("every selected query is in the store's suite; fidelity is measured on others")
    with Catalog.open(ws) as catalog:
        ids = document_ids(catalog, min(sample, store.documents), seed)
    import tempfile
    from pathlib import Path

    import polars as pl

    with tempfile.TemporaryDirectory() as tmp:
        exact = score(ws, ScoreConfig(factors=store.factors_id, chat_template=store.chat_template,
                                      max_seq_len=store.max_seq_len, device=str(loaded.device)),
                      out=Path(tmp) / "exact.parquet", loaded=loaded, queries=held_out, doc_ids=ids, record=False)
        table = pl.read_parquet(exact.out_path)
    vectors, _ = sketch_queries(ws, store, loaded, held_out)
    doc_ids, products = blocked_scores(ws, store, vectors)
    position = {int(d): i for i, d in enumerate(doc_ids)}
    per_query = {}
    for column, query in enumerate(held_out):
        mine = table.filter(pl.col("query_id") == query.id).sort("doc_id")
        rows = [position[int(d)] for d in mine["doc_id"]]
        per_query[query.id] = ranking_agreement(mine["score"].to_numpy().astype(np.float64),
                                                products[rows, column].astype(np.float64))
    keys = next(iter(per_query.values())).keys()
    mean = {k: float(np.mean([v[k] for v in per_query.values()])) for k in keys}
    return {"store": store.id, "documents": len(ids), "queries": len(held_out),
            "bytes_per_doc": store.bytes_per_doc, "dim": store.dim, "per_query": per_query, "mean": mean}
