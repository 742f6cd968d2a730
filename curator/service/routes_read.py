"""Read routes: the catalog's records, documents, the audit report, and search.

Records are the library's own models; lists are pages (limit ≤ MAX_PAGE, offset). Lookups by id take
a unique prefix as the CLI does; an unknown one is a 404 naming the path field.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path as PathLib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse

from curator.catalog.documents import Document, get_document, sample_documents
from curator.catalog.queries import Query as CuratorQuery
from curator.catalog.queries import select_queries
from curator.catalog.records import RunRecord, get_run, listing
from curator.errors import CuratorError
from curator.influence.factors import FactorsRecord, get_factors
from curator.service.errors import ApiError
from curator.service.models import MAX_PAGE, Page, report_paths
from curator.sketch.search import QueryHits, SearchRequest
from curator.sketch.store import SketchStore, load_store

public = APIRouter(tags=["health"])
router = APIRouter(tags=["read"])

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"at most {MAX_PAGE}")]
Offset = Annotated[int, Query(ge=0, le=2**62)]
Key = Annotated[str, Path(min_length=1, max_length=200)]
Text = Annotated[str | None, Query(max_length=1000)]


def _svc(request: Request):
    return request.app.state.service


@contextmanager
def not_found(field: str):
    """The library's "no such record" errors are a 404 about the path field."""
    try:
        yield
    except CuratorError as exc:
        raise ApiError(404, field, str(exc)) from None


def _page(items: list, total: int, limit: int, offset: int) -> dict:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def _ids(request: Request, table: str, column: str, order: str) -> list[str]:
    return [r[0] for r in _svc(request).catalog.read(
        lambda c: c.sql(f"SELECT {column} FROM {table} ORDER BY {order}, {column}"))]


@public.get("/health")
def health(request: Request) -> dict:
    """Up, and which workspace it serves. No token needed."""
    from curator import __version__

    return {"status": "ok", "version": __version__, "workspace": str(_svc(request).ws.root)}


# -- corpus ----------------------------------------------------------------------------------------

@router.get("/sources")
def sources(request: Request, tokenizer: Text = None) -> list[dict[str, Any]]:
    """Corpus composition per source and kind (as `curator sources`)."""
    from curator.catalog.composition import corpus_composition

    svc = _svc(request)
    return svc.catalog.reading(lambda: corpus_composition(svc.ws, tokenizer).to_dicts())


@router.get("/documents")
def documents(request: Request, q: Annotated[str | None, Query(max_length=1000, description=
              "only documents whose text contains this (case-insensitive)")] = None,
              source: Text = None, limit: Limit = 50, offset: Offset = 0) -> Page[dict[str, Any]]:
    """Documents (id, source, kind, chars, a snippet), optionally filtered, in id order."""
    where = "WHERE (?::VARCHAR IS NULL OR source = ?) AND (?::VARCHAR IS NULL OR contains(lower(text), lower(?)))"
    params = [source, source, q, q]

    def work(c):
        total = c.one(f"SELECT count(*) FROM documents {where}", params)[0]
        rows = c.sql(f"SELECT id, source, kind, chars, regexp_replace(left(text, 200), '\\s+', ' ', 'g') "
                     f"FROM documents {where} ORDER BY id LIMIT ? OFFSET ?", [*params, limit, offset])
        return total, rows
    total, rows = _svc(request).catalog.read(work)
    items = [dict(zip(("id", "source", "kind", "chars", "snippet"), r, strict=True)) for r in rows]
    return _page(items, total, limit, offset)


@router.get("/documents/sample")
def sample(request: Request, n: Limit = 10, seed: Annotated[int, Query(ge=0, le=2**31)] = 0,
           source: Text = None) -> list[Document]:
    """A seeded sample: the same documents for the same seed."""
    with not_found("source"):
        return _svc(request).catalog.read(lambda c: sample_documents(c, source, n, seed))


@router.get("/documents/{doc_id}")
def document(request: Request, doc_id: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> Document:
    with not_found("doc_id"):
        return _svc(request).catalog.read(lambda c: get_document(c, doc_id))


@router.get("/queries")
def queries(request: Request, selector: Annotated[str, Query(min_length=1, max_length=1000)] = "all",
            limit: Limit = 50, offset: Offset = 0) -> Page[CuratorQuery]:
    """Stored queries matching a selector (all, tasks, query sets or ids)."""
    try:
        found = _svc(request).catalog.read(lambda c: select_queries(c, selector))
    except CuratorError as exc:
        if "no quer" in str(exc).lower() and selector == "all":
            found = []
        else:
            raise ApiError(400, "selector", str(exc)) from None
    return _page(found[offset:offset + limit], len(found), limit, offset)


# -- recorded work ---------------------------------------------------------------------------------

def _records_page(request: Request, table: str, order: str, get, limit: int, offset: int):
    """One page of a catalog table's records, oldest first, each read by its id with `get`."""
    ids = _ids(request, table, "id", order)
    chosen = ids[offset:offset + limit]
    items = _svc(request).catalog.read(lambda c: [get(c, i) for i in chosen])
    return _page(items, len(ids), limit, offset)


@router.get("/fits")
def fits(request: Request, limit: Limit = 50, offset: Offset = 0) -> Page[FactorsRecord]:
    return _records_page(request, "factors", "created_at", get_factors, limit, offset)


@router.get("/fits/{fit_id}")
def fit(request: Request, fit_id: Key) -> FactorsRecord:
    with not_found("fit_id"):
        return _svc(request).catalog.read(lambda c: get_factors(c, fit_id))


@router.get("/runs")
def runs(request: Request, limit: Limit = 50, offset: Offset = 0) -> Page[RunRecord]:
    return _records_page(request, "runs", "finished_at", get_run, limit, offset)


@router.get("/runs/{run_id}")
def run(request: Request, run_id: Key) -> RunRecord:
    with not_found("run_id"):
        return _svc(request).catalog.read(lambda c: get_run(c, run_id))


@router.get("/stores")
def stores(request: Request, limit: Limit = 50, offset: Offset = 0) -> Page[SketchStore]:
    svc = _svc(request)
    ids = _ids(request, "sketch_stores", "id", "created_at")
    chosen = ids[offset:offset + limit]
    return _page(svc.catalog.reading(lambda: [load_store(svc.ws, i) for i in chosen]), len(ids), limit, offset)


@router.get("/stores/{store_id}")
def store(request: Request, store_id: Key) -> SketchStore:
    svc = _svc(request)
    with not_found("store_id"):
        return svc.catalog.reading(lambda: load_store(svc.ws, store_id))


def _table(request: Request, sql: str, names: tuple[str, ...], params: list | None = None) -> list[dict]:
    rows = _svc(request).catalog.read(lambda c: c.sql(sql, params))
    return [dict(zip(names, r, strict=True)) for r in rows]


def _one(items: list[dict], field: str, key: str, what: str) -> dict:
    if not items:
        raise ApiError(404, field, f"no {what} named {key!r}")
    return items[0]


def _listing(request: Request, what: str, key: str | None = None) -> list[dict]:
    return _svc(request).catalog.read(lambda c: listing(c, what, key))


@router.get("/indexes")
def indexes(request: Request) -> list[dict[str, Any]]:
    return _listing(request, "indexes")


@router.get("/indexes/{name}")
def index(request: Request, name: Key) -> dict[str, Any]:
    return _one(_listing(request, "indexes", name), "name", name, "index")


@router.get("/rankings")
def rankings(request: Request) -> list[dict[str, Any]]:
    return _listing(request, "rankings")


@router.get("/rankings/{name}")
def ranking(request: Request, name: Key, limit: Limit = 50, offset: Offset = 0,
            bottom: bool = False) -> dict[str, Any]:
    """A ranking and a page of its documents, best first (bottom: worst first)."""
    record = _one(_listing(request, "rankings", name), "name", name, "ranking")
    order = "DESC" if bottom else "ASC"
    docs = _table(request, "SELECT r.rank, r.doc_id, d.source, d.kind, r.score, "
                           "regexp_replace(left(d.text, 200), '\\s+', ' ', 'g') FROM ranking_scores r "
                           f"JOIN documents d ON d.id = r.doc_id WHERE r.ranking = ? ORDER BY r.rank {order} "
                           "LIMIT ? OFFSET ?", ("rank", "doc_id", "source", "kind", "score", "snippet"),
                  [name, limit, offset])
    return {**record, "page": _page(docs, record["documents"], limit, offset)}


@router.get("/mixtures")
def mixtures(request: Request) -> list[dict[str, Any]]:
    from curator.curate.mix import mixtures_table

    svc = _svc(request)
    return svc.catalog.reading(lambda: mixtures_table(svc.ws).to_dicts())


@router.get("/mixtures/{name}")
def mixture(request: Request, name: Key) -> dict[str, Any]:
    from curator.curate.mix import mixture_report

    svc = _svc(request)
    with not_found("name"):
        result, frame = svc.catalog.reading(lambda: mixture_report(svc.ws, name))
    return {"mixture": result.model_dump(mode="json"), "sources": frame.to_dicts()}


@router.get("/exports")
def exports(request: Request) -> list[dict[str, Any]]:
    return _listing(request, "exports")


@router.get("/exports/file", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def export_file(request: Request,
                path: Annotated[str, Query(min_length=1, max_length=4096, description="the export's path, as "
                                           "/v1/exports lists it")],
                name: Annotated[str, Query(min_length=1, max_length=255, description="manifest.json or a "
                                           "shard file its manifest lists")]):
    """One file of a recorded export, as a download. Only the manifest and the files it lists are served,
    and only from inside that export's folder (symlinks followed), so no other path on the server is named."""
    export = _one(_listing(request, "exports", path), "path", path, "export")
    listed = {"manifest.json"} | {str(f) for shard in export["manifest"].get("shards", [])
                                  for f in shard.get("files", [])}
    if name not in listed:
        raise ApiError(404, "name", f"{name!r} is not a file of export {path}")
    folder = PathLib(export["path"]).resolve()
    file = (folder / name).resolve()
    if not file.is_relative_to(folder) or not file.is_file():
        raise ApiError(404, "name", f"{name!r} is missing from {path} (moved or deleted since the export)")
    return FileResponse(file, filename=name, media_type="application/octet-stream")


# -- the audit report (written by the latest audit job) ------------------------------------------

def _report(request: Request, which: int):
    path = report_paths(_svc(request).ws.root)[which]
    if not path.is_file():
        raise ApiError(404, None, "no audit report yet; submit an audit job (POST /v1/jobs {\"kind\": \"audit\"})")
    return path


@router.get("/audit/report", response_class=FileResponse)
def audit_report(request: Request):
    """The latest audit report, as HTML."""
    return FileResponse(_report(request, 0), media_type="text/html")


@router.get("/audit/report.json")
def audit_data(request: Request) -> dict[str, Any]:
    """The data behind the latest audit report."""
    return json.loads(_report(request, 1).read_text())


# -- search ----------------------------------------------------------------------------------------

class SearchBody(SearchRequest):
    """A search: a new prompt + completion, or stored queries (a selector)."""

    model_config = {"extra": "forbid"}


@router.post("/search", tags=["search"])
def search(request: Request, body: SearchBody) -> list[QueryHits]:
    """Top and bottom documents for each query from the sketch index (with `rerank`, the best candidates
    scored exactly). The model and index stay loaded between searches; a running job does not stop them."""
    if not body.queries and not (body.prompt and body.completion):
        raise ApiError(422, "body.prompt", "give prompt and completion, or queries")
    for name, value, cap in (("top", body.top, MAX_PAGE), ("bottom", body.bottom, MAX_PAGE),
                             ("rerank", body.rerank, 10_000)):
        if value > cap:
            raise ApiError(422, f"body.{name}", f"at most {cap}")
    if body.device != "cpu" and not body.device.startswith("cuda"):
        raise ApiError(422, "body.device", "cpu, cuda or cuda:N")
    return _svc(request).searcher.search(body)
