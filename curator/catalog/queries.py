"""Queries in the catalog: storing, importing from JSONL and selecting.

A query is ``{id, task, prompt, completion, answer}``; its loss is the
completion's negative log-likelihood given the prompt. Selectors name queries
for commands: ``all``, or comma-separated terms each matching a task, a query
set (one generation or import) or a query id.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from pydantic import BaseModel, Field, ValidationError

from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.errors import BadInputError, CuratorError


class Query(BaseModel):
    id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)
    answer: str | None = None
    query_set: str = "user"
    metadata: dict | None = None


class QueryImport(BaseModel):
    added: int
    unchanged: int
    query_set: str


_FIELDS = "id, task, prompt, completion, answer, query_set, metadata"


def store_queries(catalog: Catalog, queries: list[Query]) -> QueryImport:
    """Add queries; the same id with the same content is a no-op, with other content an error."""
    existing = {row[0]: row for row in catalog.sql(
        "SELECT id, task, prompt, completion, answer FROM queries WHERE id IN (SELECT unnest(?))",
        [[q.id for q in queries]])}
    added = unchanged = 0
    conflicts = []
    for query in queries:
        if query.id in existing:
            if existing[query.id][1:] == (query.task, query.prompt, query.completion, query.answer):
                unchanged += 1
            else:
                conflicts.append(query.id)
    if conflicts:
        raise CuratorError(
            f"{len(conflicts)} queries have ids that the catalog already holds with other content "
            f"(first: {conflicts[0]}); give them new ids")
    catalog.sql("BEGIN")
    for query in queries:
        if query.id not in existing:
            catalog.sql(f"INSERT INTO queries ({_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [query.id, query.task, query.prompt, query.completion, query.answer,
                         query.query_set, json.dumps(query.metadata) if query.metadata else None])
            added += 1
    catalog.sql("COMMIT")
    return QueryImport(added=added, unchanged=unchanged, query_set=queries[0].query_set if queries else "")


def read_query_file(path: Path, query_set: str | None = None) -> list[Query]:
    """Queries from a JSONL file; any bad line is an error naming file:line and the field."""
    if not path.is_file():
        raise CuratorError(f"no query file at {path}")
    query_set = query_set or path.name.split(".")[0]
    queries, seen = [], {}
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadInputError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise BadInputError(f"{where}: expected a JSON object with id, task, prompt, completion, answer")
            if record.get("answer") is not None:
                record["answer"] = str(record["answer"])
            try:
                query = Query(query_set=query_set, **{k: v for k, v in record.items() if k != "query_set"})
            except (ValidationError, TypeError) as exc:
                problems = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("?",), "msg": str(exc)}]
                first = problems[0]
                field = ".".join(str(p) for p in first["loc"])
                raise BadInputError(f"{where}: field {field!r}: {first['msg']}") from None
            if query.id in seen:
                raise BadInputError(f"{where}: id {query.id!r} already used on line {seen[query.id]}")
            seen[query.id] = number
            queries.append(query)
    if not queries:
        raise BadInputError(f"{path}: no queries in the file")
    return queries


def select_queries(catalog: Catalog, selector: str) -> list[Query]:
    """Queries matching a selector, in id order."""
    rows = catalog.sql(f"SELECT {_FIELDS} FROM queries ORDER BY id")
    queries = [Query(id=r[0], task=r[1], prompt=r[2], completion=r[3], answer=r[4], query_set=r[5],
                     metadata=json.loads(r[6]) if r[6] else None) for r in rows]
    if not queries:
        raise CuratorError("the catalog has no queries; add some with `curator queries generate` or "
                           "`curator queries add FILE.jsonl`")
    terms = [t.strip() for t in selector.split(",") if t.strip()]
    if not terms:
        raise CuratorError("empty query selector; use all, a task, a query set or query ids")
    if "all" in terms:
        return queries
    known = {"task": {q.task for q in queries}, "set": {q.query_set for q in queries}, "id": {q.id for q in queries}}
    unknown = [t for t in terms if not any(t in names for names in known.values())]
    if unknown:
        raise CuratorError(
            f"no query matches {', '.join(map(repr, unknown))}; tasks: {', '.join(sorted(known['task']))}; "
            f"sets: {', '.join(sorted(known['set']))}")
    wanted = set(terms)
    return [q for q in queries if q.task in wanted or q.query_set in wanted or q.id in wanted]


def query_table(catalog: Catalog, selector: str = "all"):
    import polars as pl

    queries = select_queries(catalog, selector)
    return pl.DataFrame([{"id": q.id, "task": q.task, "set": q.query_set, "answer": q.answer,
                          "prompt": q.prompt.replace("\n", " ")} for q in queries])


def add_queries(ws: Workspace, queries: list[Query]) -> QueryImport:
    with Catalog.open(ws, write=True) as catalog:
        return store_queries(catalog, queries)


def find_queries(ws: Workspace, selector: str) -> list[Query]:
    with Catalog.open(ws) as catalog:
        return select_queries(catalog, selector)


def queries_table(ws: Workspace, selector: str = "all"):
    with Catalog.open(ws) as catalog:
        return query_table(catalog, selector)
