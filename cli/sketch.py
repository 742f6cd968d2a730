"""`curator sketch`, `curator index build`, `curator search` and `curator fidelity`."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from curator.cli.common import OutputFormat, WorkspaceOption, console, print_frame, workspace_from

Method = Enum("Method", {k: k for k in ("query-subspace", "whitened-subspace", "eigen", "random")}, type=str)
Precision = Enum("Precision", {k: k for k in ("float16", "float32")}, type=str)

index_app = typer.Typer(help="FAISS indexes over sketch stores.", no_args_is_help=True)


def _fidelity_table(result: dict, title: str) -> None:
    import polars as pl

    frame = pl.DataFrame([{"query": q, **v} for q, v in result["per_query"].items()])
    print_frame(frame, OutputFormat.table, title=title, formats={c: ".3f" for c in frame.columns[1:]},
                footer={"query": "mean", **result["mean"]})


def sketch(
    suite: Annotated[str, typer.Option(help="Queries whose preconditioned gradients span the bases (selector: "
                                            "tasks, query sets or ids).", show_default=False)],
    method: Annotated[Method, typer.Option(help="query-subspace (default; built from the suite), "
                                                "whitened-subspace (the same, chosen in whitened coordinates), "
                                                "or the baselines eigen (top Fisher eigenvectors) and random.")]
    = "query-subspace",
    rank: Annotated[int | None, typer.Option(help="k per layer side: a k × k sketch per layer.",
                                             show_default=False)] = None,
    budget_bytes: Annotated[int | None, typer.Option(help="Bytes per document, spread over layers by where the "
                                                          "suite's query energy is.", show_default=False)] = None,
    dtype: Annotated[Precision, typer.Option(help="Storage precision.")] = "float16",
    holdout: Annotated[str | None, typer.Option(help="Queries not in the suite to measure fidelity on. Default: "
                                                     "the suite's tasks' other queries, if any.",
                                                show_default=False)] = None,
    fidelity_sample: Annotated[int, typer.Option(help="Documents scored exactly for the fidelity check.")] = 200,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    batch_tokens: Annotated[int, typer.Option(help="Tokens per forward+backward batch.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed for random bases and the fidelity sample.")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Compute a gradient sketch of every document for fast ad-hoc queries.

    Per tracked layer a document's sketch is Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ, streamed per token with parameters frozen.
    The store is a folder of shards plus a manifest; a killed run resumes at the first missing shard. Prints
    bytes per document, the sketch dimension and the fidelity on held-out queries (kept with the store).

    Example: curator sketch --suite arithmetic-s0,slope-s0,linear-s0 --budget-bytes 65536
    """
    from curator.catalog.database import Catalog
    from curator.cli.passes import PassBar
    from curator.influence.factors import get_factors, load_model_for
    from curator.sketch.fidelity import fidelity
    from curator.catalog.queries import select_queries
    from curator.sketch.build import SketchConfig, record_fidelity
    from curator.sketch.build import sketch as run_sketch

    ws = workspace_from(workspace)
    config = SketchConfig(suite=suite, method=method.value, rank=rank, budget_bytes=budget_bytes,
                          dtype=dtype.value, device=device, batch_tokens=batch_tokens, seed=seed)
    with Catalog.open(ws) as catalog:
        suite_queries = select_queries(catalog, suite)
        if holdout:
            held = select_queries(catalog, holdout)
        else:
            tasks = ",".join(sorted({q.task for q in suite_queries}))
            held = [q for q in select_queries(catalog, tasks) if q.id not in {s.id for s in suite_queries}]
        record = get_factors(catalog)
    loaded = load_model_for(ws, record, device=device)
    with PassBar() as bar:
        store = run_sketch(ws, config, loaded=loaded, progress=bar)
    console.print(f"Store [bold]{store.id}[/]: {store.documents:,} documents, {store.dim:,} dimensions, "
                  f"{store.bytes_per_doc:,} bytes per document ({store.method}, {len(store.suite)} suite queries).")
    if store.seconds.get("documents"):
        console.print(f"Bases {store.seconds.get('bases', 0):.1f} s; documents {store.seconds['documents']:.1f} s, "
                      f"{store.tokens / store.seconds['documents']:,.0f} tokens/s.")
    if held:
        result = fidelity(ws, store, loaded, held, sample=fidelity_sample, seed=seed)
        record_fidelity(ws, store, result)
        _fidelity_table(result, f"Fidelity on {result['queries']} held-out queries × {result['documents']} "
                                f"documents (reference: exact EK-FAC {result['reference']})")
    else:
        console.print("No held-out queries of the suite's tasks: fidelity not measured (see --holdout).")


@index_app.command("build")
def index_build(
    factory: Annotated[str, typer.Option(help="FAISS index-factory string: Flat (exact), HNSW32, IVF1024,PQ32, "
                                              "…")] = "Flat",
    store: Annotated[str | None, typer.Option(help="Sketch store id (or prefix). Default: the latest.",
                                              show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Index name. Default: STORE-FACTORY.", show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Build a FAISS inner-product index over a sketch store; the catalog maps its rows to documents."""
    from curator.sketch.search import build_index
    from curator.sketch.build import load_store

    ws = workspace_from(workspace)
    result = build_index(ws, load_store(ws, store), factory, name)
    console.print(f"Index [bold]{result['name']}[/]: {result['rows']:,} documents → {result['path']}")


def search(
    prompt: Annotated[str | None, typer.Option(help="An ad-hoc query's prompt.", show_default=False)] = None,
    completion: Annotated[str | None, typer.Option(help="Its completion (the tokens whose likelihood counts).",
                                                   show_default=False)] = None,
    queries: Annotated[str | None, typer.Option("--queries", "-q", help="Or stored queries (selector).",
                                                show_default=False)] = None,
    top: Annotated[int, typer.Option(help="How many most helpful documents to show.")] = 10,
    bottom: Annotated[int, typer.Option(help="How many most harmful documents to show.")] = 5,
    rerank: Annotated[int, typer.Option(help="Re-score the N best index candidates exactly and rank by exact "
                                             "score (0: off).")] = 0,
    index: Annotated[str | None, typer.Option(help="Index name. Default: the latest.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    workspace: WorkspaceOption = None,
) -> None:
    """Find the documents that most help (and most hurt) a query's completion, from the sketch index.

    Example: curator search --prompt "What is the slope of the line through (2, 3) and (4, 7)?" --completion
    "The slope is (7 - 3) / (4 - 2) = 2." --rerank 200
    """
    import polars as pl

    from curator.catalog.database import Catalog
    from curator.influence.factors import get_factors, load_model_for
    from curator.catalog.queries import Query, select_queries
    from curator.sketch.search import open_index, top_and_bottom
    from curator.sketch.search import rerank as run_rerank
    from curator.sketch.build import load_store, sketch_queries

    ws = workspace_from(workspace)
    faiss_index, doc_ids, store_id = open_index(ws, index)
    store = load_store(ws, store_id)
    with Catalog.open(ws) as catalog:
        if queries:
            chosen = select_queries(catalog, queries)
        elif prompt and completion:
            chosen = [Query(id="ad-hoc", task="ad-hoc", prompt=prompt, completion=completion)]
        else:
            raise typer.BadParameter("give --prompt and --completion, or --queries")
        record = get_factors(catalog, store.factors_id)
    loaded = load_model_for(ws, record, device=device)
    vectors, _ = sketch_queries(ws, store, loaded, chosen)
    found = top_and_bottom(faiss_index, doc_ids, vectors, max(top, rerank), bottom)
    if rerank:
        exact = run_rerank(ws, store, loaded, chosen, [[d for d, _ in f["top"][:rerank]] for f in found])
        for f, ranked in zip(found, exact, strict=True):
            f["top"] = ranked
    with Catalog.open(ws) as catalog:
        for query, f in zip(chosen, found, strict=True):
            console.print(f"\n[bold]{query.id}[/]: {query.prompt[:100]!r}", highlight=False)
            for side, label in (("top", f"top {top}" + (f" (exact re-rank of {rerank})" if rerank else "")),
                                ("bottom", f"bottom {bottom}")):
                items = f[side][:top if side == "top" else bottom]
                if not items:
                    continue
                rows = catalog.sql(
                    "SELECT id, source, regexp_replace(left(text, 200), '\\s+', ' ', 'g') FROM documents "
                    "WHERE id IN (SELECT unnest(?))", [[d for d, _ in items]])
                info = {r[0]: r[1:] for r in rows}
                frame = pl.DataFrame([{"doc_id": d, "source": info[d][0], "score": s, "snippet": info[d][1][:80]}
                                      for d, s in items])
                print_frame(frame, OutputFormat.table, title=label, formats={"score": ".4g"})


def fidelity(
    queries: Annotated[str, typer.Option("--queries", "-q", help="Held-out queries (not in the store's suite).",
                                         show_default=False)],
    sample: Annotated[int, typer.Option(help="Documents to score exactly as the reference.")] = 1000,
    store: Annotated[str | None, typer.Option(help="Sketch store (id or prefix). Default: the latest.",
                                              show_default=False)] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the document sample.")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Compare sketch scores with exact EK-FAC scores on sampled documents for queries outside the suite:
    Pearson, Spearman, top-10/100 overlap and the recall of the exact top 10 in the sketch's top 1% and 5%."""
    from curator.catalog.database import Catalog
    from curator.influence.factors import get_factors, load_model_for
    from curator.sketch.fidelity import fidelity as run_fidelity
    from curator.catalog.queries import select_queries
    from curator.sketch.build import load_store, record_fidelity

    ws = workspace_from(workspace)
    chosen_store = load_store(ws, store)
    with Catalog.open(ws) as catalog:
        chosen = select_queries(catalog, queries)
        record = get_factors(catalog, chosen_store.factors_id)
    loaded = load_model_for(ws, record, device=device)
    result = run_fidelity(ws, chosen_store, loaded, chosen, sample=sample, seed=seed)
    record_fidelity(ws, chosen_store, result)
    _fidelity_table(result, f"{chosen_store.id} ({chosen_store.method}, {chosen_store.bytes_per_doc:,} bytes/doc): "
                            f"{result['queries']} held-out queries × {result['documents']} documents "
                            f"(reference: exact EK-FAC {result['reference']})")
