"""`curator search`: the documents that most help (and hurt) a new query, from a sketch index.

Two stages (DESIGN.md, "Sketches"): the index returns candidates by sketch
score; with `rerank`, the candidates are scored exactly and ranked by that.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.documents import snippets
from curator.catalog.records import score_files
from curator.catalog.queries import Query, select_queries
from curator.catalog.workspace import Workspace
from curator.constants import DEVICE_PATTERN, ModelDType
from curator.errors import CuratorError
from curator.influence.factors import get_factors, load_model_for
from curator.influence.score import ScoreConfig, score
from curator.sketch.build import sketch_queries
from curator.sketch.index import open_search, top_and_bottom
from curator.sketch.store import SketchStore, load_store


def rerank(ws: Workspace, store: SketchStore, loaded, queries, candidates: list[list[int]],
           batch_tokens: int = 4096) -> list[list[tuple[int, float]]]:
    """Exact scores of each query's candidate documents, best first (two-stage search)."""
    import tempfile

    import polars as pl

    config = ScoreConfig(factors=store.factors_id, batch_tokens=batch_tokens, chat_template=store.chat_template,
                         max_seq_len=store.max_seq_len, device=str(loaded.device), query_rank="dense")
    union = sorted({d for c in candidates for d in c})
    with tempfile.TemporaryDirectory() as tmp:
        result = score(ws, config, out=Path(tmp) / "rerank.parquet", loaded=loaded, queries=queries,
                       doc_ids=union, record=False)
        table = pl.read_parquet(score_files(result.out_path))
    ranked = []
    for query, docs in zip(queries, candidates, strict=True):
        mine = table.filter(pl.col("query_id") == query.id).filter(pl.col("doc_id").is_in(docs))
        ranked.append([(int(d), float(s)) for d, s in mine.sort("score", descending=True)
                       .select("doc_id", "score").iter_rows()])
    return ranked


class SearchRequest(BaseModel):
    """A new query (prompt + completion) or stored queries (a selector), and what to return."""

    prompt: str | None = None
    completion: str | None = None
    queries: str | None = Field(None, description="stored queries (selector) instead of prompt + completion")
    top: int = Field(10, ge=0, description="most helpful documents to return")
    bottom: int = Field(5, ge=0, description="most harmful documents to return")
    rerank: int = Field(0, ge=0, description="score the N best index candidates exactly and rank by that")
    index: str | None = Field(None, description="index name (or prefix); default: the latest")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N")
    dtype: ModelDType = "float32"


class DocumentHit(BaseModel):
    doc_id: int
    source: str
    score: float
    snippet: str


class QueryHits(BaseModel):
    query_id: str
    prompt: str
    top: list[DocumentHit]
    bottom: list[DocumentHit]
    reranked: int = 0          # how many candidates were scored exactly
    store: str
    fidelity: dict | None      # the store's measured agreement with exact scores, when known


def search(ws: Workspace, request: SearchRequest, *, loaded=None) -> list[QueryHits]:
    """Top and bottom documents for each query, with source, score and snippet."""
    index = open_search(ws, request.index)
    store = load_store(ws, index.meta.store_id)
    with Catalog.open(ws) as catalog:
        if request.queries:
            chosen = select_queries(catalog, request.queries)
        elif request.prompt and request.completion:
            chosen = [Query(id="ad-hoc", task="ad-hoc", prompt=request.prompt, completion=request.completion)]
        else:
            raise CuratorError("give a prompt and a completion, or stored queries")
        record = get_factors(catalog, store.factors_id)
    loaded = loaded or load_model_for(ws, record, device=request.device, dtype=request.dtype)
    vectors, _ = sketch_queries(ws, store, loaded, chosen)
    found = top_and_bottom(index, index.doc_ids, vectors, max(request.top, request.rerank), request.bottom)
    if request.rerank:
        exact = rerank(ws, store, loaded, chosen, [[d for d, _ in f["top"][:request.rerank]] for f in found])
        for f, ranked in zip(found, exact, strict=True):
            f["top"] = ranked
    with Catalog.open(ws) as catalog:
        info = snippets(catalog, [d for f in found for side in ("top", "bottom") for d, _ in f[side]])
    results = []
    for query, f in zip(chosen, found, strict=True):
        def hits(items):
            return [DocumentHit(doc_id=d, source=info[d][0], score=s, snippet=info[d][1]) for d, s in items]

        results.append(QueryHits(query_id=query.id, prompt=query.prompt, top=hits(f["top"][:request.top]),
                                 bottom=hits(f["bottom"][:request.bottom]), reranked=request.rerank,
                                 store=store.id, fidelity=store.fidelity))
    return results
