"""`curator fidelity`: how well a sketch store ranks documents for queries it was not built from.

Exact EK-FAC scores on a seeded sample of documents are the reference. Per
query: Pearson and Spearman over the sample, the overlap of the exact and
sketch top-k (k = 10, 100), and the share of the exact top 10 that the sketch
ranks within its top 1% and 5% (what a two-stage search with re-ranking finds).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from curator.artifacts import reading
from curator.catalog.database import Catalog
from curator.catalog.documents import seeded_sample
from curator.catalog.queries import Query, select_queries
from curator.catalog.querygen import family_of
from curator.catalog.records import score_files
from curator.model import distributed
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.influence.factors import get_factors, load_model_for
from curator.influence.score import ScoreConfig, score
from curator.sketch.build import sketch, sketch_queries
from curator.sketch.scoring import blocked_scores
from curator.sketch.store import SketchConfig, SketchStore, record_fidelity, store_doc_ids


def ranking_agreement(exact: np.ndarray, approx: np.ndarray) -> dict:
    """Agreement of two score vectors over the same documents."""
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


def stored_exact_scores(catalog: Catalog, store, queries: list[Query], doc_ids: list[int]):
    """Exact scores of these queries and documents from an earlier run, if one matches the store.

    A run matches when it used the store's factors, window length and chat
    template, kept the preconditioned queries at full rank, and covers every
    query and document. Reusing it saves a pass over the sample; returns
    (table, "run ID") or (None, None).
    """
    wanted = {q.id for q in queries}
    rows = catalog.sql("SELECT r.id, r.query_ids, r.settings, r.out_path, f.settings FROM runs r "
                       "JOIN factors f ON f.id = r.factors_id WHERE r.method = 'exact' AND r.factors_id = ? "
                       "ORDER BY r.finished_at DESC", [store.factors_id])
    for run_id, query_ids, settings, out_path, fit_settings in rows:
        settings, fit_settings = json.loads(settings), json.loads(fit_settings)
        window = settings.get("max_seq_len") or fit_settings["max_seq_len"]
        if (window != store.max_seq_len or settings.get("chat_template") != store.chat_template
                or settings.get("query_rank") not in (None, "dense") or settings.get("dtype", "float32") != "float32"
                or not wanted <= set(json.loads(query_ids)) or not Path(out_path).exists()):
            continue
        with reading(Path(out_path), "score file", f"curator score --queries {','.join(sorted(wanted))} --force"):
            table = (pl.scan_parquet(score_files(out_path))
                     .filter(pl.col("query_id").is_in(sorted(wanted)) & pl.col("doc_id").is_in(doc_ids))
                     .collect())
        if table.height == len(wanted) * len(doc_ids):
            return table, f"run {run_id}"
    return None, None


def sample_store_documents(ws: Workspace, store: SketchStore, sample: int, seed: int) -> list[int]:
    """A seeded sample of the documents the store holds (documents added to the catalog later have no
    sketch), in id order; the same seed gives the same sample."""
    with Catalog.open(ws) as catalog:
        return seeded_sample(catalog, store_doc_ids(ws, store), sample, seed)


def fidelity(ws: Workspace, store: SketchStore, loaded, queries: list[Query], sample: int = 1000,
             seed: int = 0) -> dict:
    held_out = [q for q in queries if q.id not in set(store.suite)]
    if not held_out:
        raise CuratorError("every selected query is in the store's suite; fidelity is measured on others")
    ids = sample_store_documents(ws, store, sample, seed)
    with Catalog.open(ws) as catalog:
        table, reference = stored_exact_scores(catalog, store, held_out, ids)
    if table is None:
        with tempfile.TemporaryDirectory() as tmp:
            exact = score(ws, ScoreConfig(factors=store.factors_id, chat_template=store.chat_template,
                                          max_seq_len=store.max_seq_len, device=str(loaded.device),
                                          query_rank="dense"),
                          out=Path(tmp) / "exact", loaded=loaded, queries=held_out, doc_ids=ids,
                          record=False, ranks=distributed.SINGLE)
            table = pl.read_parquet(score_files(exact.out_path))
        reference = "scored for this check"
    vectors, _ = sketch_queries(ws, store, loaded, held_out)
    doc_ids, products = blocked_scores(ws, store, vectors)
    position = {int(d): i for i, d in enumerate(doc_ids)}
    per_query = {}
    for column, query in enumerate(held_out):
        mine = table.filter(pl.col("query_id") == query.id).sort("doc_id")
        rows = [position[int(d)] for d in mine["doc_id"]]
        per_query[query.id] = ranking_agreement(mine["score"].to_numpy().astype(np.float64),
                                                products[rows, column].astype(np.float64))
    groups = family_groups(ws, store, held_out)
    return {"store": store.id, "documents": len(ids), "queries": len(held_out), "reference": reference,
            "bytes_per_doc": store.bytes_per_doc, "dim": store.dim, "per_query": per_query,
            "mean": _mean(per_query.values()),
            "groups": {name: {"queries": len(members), "families": families,
                              "mean": _mean(per_query[q] for q in members)}
                       for name, (families, members) in groups.items() if members}}


def _mean(rows) -> dict:
    rows = list(rows)
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


SAME_FAMILY, CROSS_FORMAT = "same family", "cross-format"


def family_groups(ws: Workspace, store: SketchStore, held_out: list[Query]) -> dict[str, tuple[list[str], list[str]]]:
    """Held-out queries split by whether their family of formats is one the suite was written in
    (another seed of the same generator says little) or another one (what users send)."""
    with Catalog.open(ws) as catalog:
        suite = select_queries(catalog, ",".join(store.suite))
    suite_families = {family_of(q) for q in suite}
    same = [q.id for q in held_out if family_of(q) in suite_families]
    other = [q.id for q in held_out if family_of(q) not in suite_families]
    return {SAME_FAMILY: (sorted(suite_families), same),
            CROSS_FORMAT: (sorted({family_of(q) for q in held_out} - suite_families), other)}


def default_holdout(ws: Workspace, store: SketchStore) -> list[Query]:
    """The queries of the suite's tasks that are not in the suite."""
    suite = set(store.suite)
    with Catalog.open(ws) as catalog:
        tasks = sorted({task for (task,) in catalog.sql(
            "SELECT DISTINCT task FROM queries WHERE id IN (SELECT unnest(?::VARCHAR[]))", [sorted(suite)])})
        if not tasks:
            return []
        return [q for q in select_queries(catalog, ",".join(tasks)) if q.id not in suite]


def measure_store(ws: Workspace, store: SketchStore, holdout: str | None = None, *, sample: int = 1000,
                  seed: int = 0, loaded=None, device: str = "cpu", dtype: str = "float32") -> dict | None:
    """Fidelity of a store on held-out queries (a selector, or by default the suite's tasks' other
    queries), kept with the store. None when there is no held-out query to measure on."""
    if holdout:
        with Catalog.open(ws) as catalog:
            held = select_queries(catalog, holdout)
    else:
        held = default_holdout(ws, store)
    if not held:
        return None
    if loaded is None:
        with Catalog.open(ws) as catalog:
            record = get_factors(catalog, store.factors_id)
        loaded = load_model_for(ws, record, device=device, dtype=dtype)
    result = fidelity(ws, store, loaded, held, sample=sample, seed=seed)
    record_fidelity(ws, store, result)
    return result


def sketch_and_measure(ws: Workspace, config: SketchConfig, *, holdout: str | None = None, sample: int = 200,
                       progress=None, force: bool = False) -> tuple[SketchStore, dict | None]:
    """`curator sketch`: build the store, then measure its fidelity on held-out queries (under
    torchrun: all ranks build the store, rank 0 alone measures it, in one process)."""
    ranks = distributed.current()
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog, config.factors)
    loaded = load_model_for(ws, record, model=config.model, device=ranks.device(config.device), dtype=config.dtype)
    store = sketch(ws, config, loaded=loaded, progress=progress, force=force)
    if not ranks.main:
        return store, None
    result = measure_store(ws, store, holdout, sample=sample, seed=config.seed, loaded=loaded)
    return store, result
