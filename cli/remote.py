"""`curator --server URL --token T COMMAND`: read commands and search answered by a running server.

Each function here is the twin of a local command (same options) and prints what it prints."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

from curator.cli.common import OutputFormat, console, print_frame


class Remote:
    url: str | None = None
    token: str | None = None


def client():
    from curator.client import Client

    return Client(Remote.url, Remote.token or os.environ.get("CURATOR_TOKEN"))


def either(local: Callable, remote: Callable) -> Callable:
    """The local command, or its remote twin when --server is given (same options, same signature)."""
    @functools.wraps(local)
    def command(**kwargs):
        return (remote if Remote.url else local)(**kwargs)
    return command


def _frame(rows: list[dict], output, title: str | None = None) -> None:
    import polars as pl

    print_frame(pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame(), output or
                OutputFormat.table, title=title)


def sources(output=OutputFormat.table, tokenizer=None, **_) -> None:
    with client() as api:
        _frame(api.sources(tokenizer), output, "Corpus composition")


def runs(output=OutputFormat.table, **_) -> None:
    with client() as api:
        items = api.runs(limit=500)["items"]
    rows = [{"run": r["id"], "method": r["method"], "factors": r["factors_id"], "queries": len(r["query_ids"]),
             "documents": r["stats"].get("documents"), "scores": r["out_path"]} for r in items]
    _frame(rows, output, f"{len(rows)} scoring runs")


def factors(output=OutputFormat.table, **_) -> None:
    with client() as api:
        items = api.fits(limit=500)["items"]
    rows = [{"fit": f["id"], "model": f["model_id"][:12], "layers": len(f["modules"]),
             "documents": f["stats"].get("documents")} for f in items]
    _frame(rows, output, f"{len(rows)} fits")


def mixes(output=OutputFormat.table, **_) -> None:
    with client() as api:
        rows = api.mixtures()
    _frame(rows, output, f"{len(rows)} mixtures")


def search(prompt=None, completion=None, queries=None, top=10, bottom=5, rerank=0, index=None, device="cpu",
           dtype=None, **_) -> None:
    import typer

    if not queries and not (prompt and completion):
        raise typer.BadParameter("give --prompt and --completion, or --queries")
    with client() as api:
        results = api.search(prompt=prompt, completion=completion, queries=queries, top=top, bottom=bottom,
                             rerank=rerank, index=index, device=device,
                             dtype=getattr(dtype, "value", dtype) or "float32")
    for result in results:
        console.print(f"\n[bold]{result['query_id']}[/]: {result['prompt'][:100]!r}", highlight=False)
        for side in ("top", "bottom"):
            rows = [{"doc_id": h["doc_id"], "source": h["source"], "score": h["score"], "snippet": h["snippet"][:80]}
                    for h in result[side]]
            if rows:
                _frame(rows, OutputFormat.table, side)


def _all_pages(fetch, limit: int = 500) -> list[dict]:
    items, offset = [], 0
    while True:
        page = fetch(limit=limit, offset=offset)
        items += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return items


def stores(output=OutputFormat.table, **_) -> None:
    from curator.cli.records import show, store_rows

    with client() as api:
        rows = store_rows(_all_pages(api.stores))
    show(rows, output, f"{len(rows)} sketch stores", "No sketch stores on the server yet.")


def index_list(output=OutputFormat.table, **_) -> None:
    from curator.cli.records import index_rows, show

    with client() as api:
        rows = index_rows(api.indexes())
    show(rows, output, f"{len(rows)} indexes", "No indexes on the server yet.")


def rankings(output=OutputFormat.table, **_) -> None:
    from curator.cli.records import ranking_rows, show

    with client() as api:
        rows = ranking_rows(api.rankings())
    show(rows, output, f"{len(rows)} rankings", "No rankings on the server yet.")


def queries_list(queries="all", output=OutputFormat.table, **_) -> None:
    with client() as api:
        items = _all_pages(lambda limit, offset: api.queries(queries, limit=limit, offset=offset))
    rows = [{"id": q["id"], "task": q["task"], "set": q.get("query_set"), "answer": q.get("answer"),
             "prompt": q["prompt"].replace("\n", " ")[:70 if output in (None, OutputFormat.table) else None]}
            for q in items]
    _frame(rows, output, f"{len(rows)} queries")


def docs_show(doc_id, full=False, **_) -> None:
    from curator.catalog.documents import Document
    from curator.cli.docs import _show

    with client() as api:
        doc = Document(**api.document(doc_id))
    _show(doc, None if full else 4000)


def docs_sample(source=None, n=5, seed=0, chars=400, **_) -> None:
    from curator.catalog.documents import Document
    from curator.cli.docs import _show

    with client() as api:
        docs = [Document(**d) for d in api.sample(n=n, seed=seed, source=source)]
    if not docs:
        console.print("No documents to sample.")
    for doc in docs:
        _show(doc, chars)


def audit(out=None, json_out=None, run=None, **_) -> None:
    """Run the audit as a job on the server and download its report; with a read token (which cannot
    submit jobs), download the latest report the server has."""
    from pathlib import Path

    from curator.client import ServerError

    out = Path(out or "audit.html")
    with client() as api:
        try:
            job = api.submit({"kind": "audit", "run": run})
        except ServerError as exc:
            if exc.status != 403:
                raise
            console.print("A read token cannot submit jobs: downloading the server's latest audit report.")
        else:
            console.print(f"Auditing on the server (job {job['id']}) ...")
            final = api.wait(job["id"])
            if final["state"] != "done":
                raise ServerError(409, f"the audit job {job['id']} ended {final['state']}: {final.get('error')}")
        out.write_bytes(api.audit_report())
        if json_out:
            Path(json_out).write_text(json.dumps(api.audit_data(), indent=2))
    console.print(f"Wrote {out}" + (f" and {json_out}" if json_out else "") + f" from {Remote.url}.")
