"""`curator docs show` and `curator docs sample`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.panel import Panel

from curator.cli.common import WorkspaceOption, console, workspace_from

app = typer.Typer(help="Look at documents in the catalog.", no_args_is_help=True)


def _show(doc, max_chars: int | None) -> None:
    text = doc.text if max_chars is None or len(doc.text) <= max_chars else (
        doc.text[:max_chars] + f"\n… ({len(doc.text) - max_chars:,} more characters; --full shows all)")
    console.print(f"[bold]document {doc.id}[/]  source [bold]{doc.source}[/] · kind {doc.kind} · "
                  f"{doc.chars:,} chars · batch {doc.batch_id}", highlight=False)
    console.print(f"origin {doc.origin}" + (f" · external id {doc.external_id}" if doc.external_id else ""),
                  markup=False, highlight=False)
    if doc.metadata:
        console.print("metadata " + json.dumps(doc.metadata, ensure_ascii=False, default=str)[:300],
                      markup=False, highlight=False)
    console.print(Panel(text, highlight=False, box=box.ROUNDED), markup=False)
    console.print()


@app.command("show")
def show(
    doc_id: Annotated[int, typer.Argument(help="Document id (as printed by `docs sample`, rankings, searches).")],
    full: Annotated[bool, typer.Option("--full", help="Print the whole text.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """One document: its source, kind, origin, metadata and text."""
    from curator.catalog.documents import show_document

    doc = show_document(workspace_from(workspace), doc_id)
    _show(doc, None if full else 4000)


@app.command("sample")
def sample(
    source: Annotated[str | None, typer.Option("--source", "-s", help="Only this source. Default: any.",
                                               show_default=False)] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="How many documents.")] = 5,
    seed: Annotated[int, typer.Option(help="Same seed, same documents.")] = 0,
    chars: Annotated[int, typer.Option(help="Characters of each text to show.")] = 400,
    workspace: WorkspaceOption = None,
) -> None:
    """A reproducible random sample of documents, with the start of each text."""
    from curator.catalog.documents import sample_from

    docs = sample_from(workspace_from(workspace), source, n, seed)
    if not docs:
        console.print("No documents to sample.")
    for doc in docs:
        _show(doc, chars)
