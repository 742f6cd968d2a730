"""`curator --server URL --token T COMMAND`: read commands and search answered by a running server."""

from __future__ import annotations

import functools
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
