"""`curator stores`, `curator index list` and `curator rankings`: what has been built, as tables.

The rows are made by the same functions here and through a server (`curator --server URL stores`), so
both print the same table.
"""

from __future__ import annotations

from curator.cli.common import OutputFormat, OutputOption, WorkspaceOption, print_frame, workspace_from

def store_rows(stores: list[dict]) -> list[dict]:
    """SketchStore records (manifests, or the API's stores) → one row each."""
    from curator.sketch.store import SketchStore

    rows = []
    for store in map(SketchStore.model_validate, stores):
        mean = ((store.fidelity or {}).get("mean") or {}).get("spearman")
        rows.append({"store": store.id, "method": store.method, "documents": store.documents, "dims": store.dim,
                     "bytes/doc": store.bytes_per_doc, "suite": len(store.suite), "held-out Spearman": mean,
                     "complete": store.complete})
    return rows


def index_rows(indexes: list[dict]) -> list[dict]:
    return [{"index": i["name"], "store": i["store_id"], "factory": i["factory"], "rows": i["rows"],
             "created": str(i["created_at"]).replace("T", " ")[:19]} for i in indexes]


def ranking_rows(rankings: list[dict]) -> list[dict]:
    return [{"ranking": r["name"], "run": r["run_id"], "tasks": ",".join(r["tasks"]), "queries": len(r["query_ids"]),
             "aggregate": r["aggregate"], "normalize": r["normalize"], "documents": r["documents"],
             "created": str(r["created_at"]).replace("T", " ")[:19]} for r in rankings]


def show(rows: list[dict], output: OutputFormat, title: str, empty: str) -> None:
    import polars as pl

    if not rows and output is OutputFormat.table:
        print_frame(pl.DataFrame(), output, title=empty)
        return
    print_frame(pl.DataFrame(rows, infer_schema_length=None), output, title=title,
                formats={"held-out Spearman": ".3f"})


def stores(output: OutputOption = OutputFormat.table, workspace: WorkspaceOption = None) -> None:
    """The sketch stores: method, documents, dimensions, bytes per document and the fidelity measured on
    held-out queries when the store was built (how far to trust a search without --rerank)."""
    from curator.catalog.records import list_recorded

    rows = store_rows([r["manifest"] for r in list_recorded(workspace_from(workspace), "stores")])
    show(rows, output, f"{len(rows)} sketch stores", "No sketch stores yet: run `curator sketch --suite QUERIES`.")


def index_list(output: OutputOption = OutputFormat.table, workspace: WorkspaceOption = None) -> None:
    """The FAISS indexes over sketch stores (`curator search --index NAME` picks one)."""
    from curator.catalog.records import list_recorded

    rows = index_rows(list_recorded(workspace_from(workspace), "indexes"))
    show(rows, output, f"{len(rows)} indexes", "No indexes yet: run `curator index build`.")


def rankings(output: OutputOption = OutputFormat.table, workspace: WorkspaceOption = None) -> None:
    """The rankings made by `curator rank`: their run, tasks and aggregate (mixtures are built from them)."""
    from curator.catalog.records import list_recorded

    rows = ranking_rows(list_recorded(workspace_from(workspace), "rankings"))
    show(rows, output, f"{len(rows)} rankings", "No rankings yet: run `curator rank`.")
