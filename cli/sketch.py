"""`curator sketch`, `curator index build`, `curator search` and `curator fidelity`."""

from __future__ import annotations

from typing import Annotated

import typer

from curator import constants
from curator.cli.common import (
    BatchTokensOption,
    DeviceOption,
    DType,
    DTypeOption,
    FactorsOption,
    OutputFormat,
    WorkspaceOption,
    choices,
    values,
    console,
    print_frame,
    workspace_from,
)

Method = choices("Method", values(constants.SketchMethod))
Precision = choices("Precision", values(constants.SketchPrecision))
BudgetSplit = choices("BudgetSplit", values(constants.SketchBudgetSplit))

index_app = typer.Typer(help="FAISS indexes over sketch stores.", no_args_is_help=True)


def _fidelity_table(result: dict, title: str) -> None:
    import polars as pl

    frame = pl.DataFrame([{"query": q, **v} for q, v in result["per_query"].items()])
    print_frame(frame, OutputFormat.table, title=title, formats={c: ".3f" for c in frame.columns[1:]},
                footer={"query": "mean", **result["mean"]})
    for name, group in result.get("groups", {}).items():
        mean = group["mean"]
        console.print(f"  {name} ({', '.join(group['families'])}): Spearman {mean['spearman']:.3f}, top-10 "
                      f"overlap {mean['top10_overlap']:.2f}, exact top 10 in the sketch's top 5% "
                      f"{mean['top10_recall_at_5pct']:.2f}, over {group['queries']} queries", highlight=False)


def sketch(
    suite: Annotated[str, typer.Option(help="Queries whose preconditioned gradients span the bases (selector: "
                                            "tasks, query sets or ids). Written in several families (`curator "
                                            "queries generate --family`), it ranks queries in a format it never "
                                            "saw better (docs/sketches.md).", show_default=False)],
    method: Annotated[Method, typer.Option(help="whitened-subspace (built from the suite in whitened "
                                                "coordinates; the most faithful, docs/benchmarks.md), "
                                                "mixed (whitened-subspace's suite directions interleaved with "
                                                "directions of the documents' own gradients; measured worse on "
                                                "every kind of query, docs/sketches.md), query-subspace (the "
                                                "same in plain coordinates), or the baselines eigen (top Fisher "
                                                "eigenvectors) and random.")]
    = "whitened-subspace",
    document_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="mixed: share of each layer's directions "
                                                                          "(per side) taken from the documents' "
                                                                          "gradients instead of the suite's.")]
    = 0.25,
    document_sample: Annotated[int, typer.Option(min=2, help="mixed: documents (a seeded sample of the store's) "
                                                             "whose gradients give those directions.")] = 256,
    rank: Annotated[int | None, typer.Option(help="k per layer side: a k × k sketch per layer.",
                                             show_default=False)] = None,
    budget_bytes: Annotated[int | None, typer.Option(help="Bytes per document, spread over layers by "
                                                          "--budget-split.", show_default=False)] = None,
    budget_split: Annotated[BudgetSplit | None, typer.Option(
        help="uniform (default): the same k × k on every layer (smaller layers whole; it ranked queries in "
             "other formats better, docs/sketches.md); energy: k² in proportion to where the suite's query "
             "energy is. Unset, a store the same command built with the energy split (the default before "
             "2026-12-02) is extended rather than sketched again.", show_default=False)] = None,
    precision: Annotated[Precision, typer.Option(help="Storage precision of the sketches (float16 is scaled per "
                                                      "layer, so it neither overflows nor flushes to zero).")]
    = "float16",
    holdout: Annotated[str | None, typer.Option(help="Queries not in the suite to measure fidelity on. Default: "
                                                     "the suite's tasks' other queries, if any.",
                                                show_default=False)] = None,
    fidelity_sample: Annotated[int, typer.Option(help="Documents scored exactly for the fidelity check.")] = 200,
    factors: FactorsOption = None,
    device: DeviceOption = "cpu",
    dtype: DTypeOption = DType.float32,
    batch_tokens: BatchTokensOption = 4096,
    shard_docs: Annotated[int, typer.Option(min=1, help="Documents per shard: the unit a killed run resumes from "
                                                        "and that torchrun hands to a rank.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed for random bases and the fidelity sample.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Build the store again even if it exists.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Compute a gradient sketch of every document for fast ad-hoc queries.

    Per tracked layer a document's sketch is Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ, streamed per token with parameters frozen.
    The store is a folder of shards plus a manifest; a killed run resumes from the shards on disk, and over all
    documents the same command after another ingest sketches only the new ones and appends their shards.
    Across processes or GPUs: torchrun --nproc-per-node 8 -m curator sketch ... (docs/scaling.md). Prints
    bytes per document, the sketch dimension and the fidelity on held-out queries (kept with the store).

    Example: curator sketch --suite arithmetic-s0,slope-s0,linear-s0 --budget-bytes 65536
    """
    from curator.cli.passes import PassBar
    from curator.sketch.fidelity import sketch_and_measure
    from curator.sketch.store import SketchConfig

    ws = workspace_from(workspace)
    config = SketchConfig(suite=suite, method=method.value, rank=rank, budget_bytes=budget_bytes,
                          budget_split=budget_split.value if budget_split else None,
                          document_share=document_share, document_sample=document_sample,
                          precision=precision.value, factors=factors, device=device, dtype=dtype.value,
                          batch_tokens=batch_tokens, shard_docs=shard_docs, seed=seed)
    with PassBar() as bar:
        store, result = sketch_and_measure(ws, config, holdout=holdout, sample=fidelity_sample, progress=bar,
                                           force=force)
    if budget_bytes and budget_split is None and store.settings.get("budget_split") == "energy":
        console.print("Extended the store these settings built with the energy split, the default before "
                      "2026-12-02 (--budget-split uniform builds a new one: docs/sketches.md).")
    console.print(f"Store [bold]{store.id}[/]: {store.documents:,} documents, {store.dim:,} dimensions, "
                  f"{store.bytes_per_doc:,} bytes per document ({store.method}, {len(store.suite)} suite queries).")
    if store.seconds.get("documents"):
        console.print(f"Bases {store.seconds.get('bases', 0):.1f} s; documents {store.seconds['documents']:.1f} s, "
                      f"{store.tokens / store.seconds['documents']:,.0f} tokens/s.")
    if result is not None:
        _fidelity_table(result, f"Fidelity on {result['queries']} held-out queries × {result['documents']} "
                                f"documents (reference: exact EK-FAC {result['reference']})")
    else:
        console.print("No held-out queries of the suite's tasks: fidelity not measured (see --holdout).")


@index_app.command("build")
def index_build(
    factory: Annotated[str, typer.Option(help="auto (default): Flat while the store's float32 copy fits in 2 GiB, "
                                              "then Proj256,HNSW32 while that graph fits in 2 GiB (about 1.6M "
                                              "sketches), then Proj256,IVFn,SQ8 with about 4√n lists (an index auto "
                                              "chose keeps its factory as the store grows, unless a graph would "
                                              "pass 2 GiB; --retrain starts afresh). "
                                              "Flat: exact, every sketch in RAM. "
                                              "ProjN,…: the sketches projected onto their N directions of most "
                                              "energy (learnt from a store sample), then indexed by the rest: "
                                              "HNSW32, a graph of the projected vectors; IVFn,SQ8, n lists of "
                                              "8-bit codes. Searches re-score candidates exactly from the store. "
                                              "Or any FAISS factory string (IVF1024,Flat, …).")] = "auto",
    store: Annotated[str | None, typer.Option(help="Sketch store id (or prefix). Default: the latest.",
                                              show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Index name. Default: STORE-FACTORY.", show_default=False)] = None,
    rescore: Annotated[int | None, typer.Option(help="Candidates per query re-scored exactly from the float16 "
                                                     "store (0: off). Default: 16 for approximate indexes.",
                                                show_default=False)] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF lists searched per query. Default: 128, or for more "
                                                    "than 512 lists about 128·(lists/512)^0.8 (384 of 2,048).",
                                               show_default=False)] = None,
    ef_search: Annotated[int | None, typer.Option(help="Candidates an HNSW graph search keeps (more: higher "
                                                       "recall, slower). Default: 256.", show_default=False)] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Build afresh even when the index exists (by "
                                                            "default only the store's new shards are added).")]
    = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Build a FAISS inner-product index over a sketch store; the catalog maps its rows to documents.

    Run again after `curator sketch` has appended shards to the store: only the new shards are added, with the
    projection and quantizers the index was trained with.
    """
    from curator.sketch.index import build_index

    result = build_index(workspace_from(workspace), store, factory, name, rescore=rescore, nprobe=nprobe,
                         ef_search=ef_search, retrain=retrain)
    verb = f"added {result['added']:,} documents" if result["grown"] else f"{result['rows']:,} documents"
    console.print(f"Index [bold]{result['name']}[/] ({result['factory']}): {verb}, {result['rows']:,} in all, "
                  f"{result['memory_bytes'] / 2**20:,.1f} MiB → {result['path']}", highlight=False)


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
    device: DeviceOption = "cpu",
    dtype: DTypeOption = DType.float32,
    workspace: WorkspaceOption = None,
) -> None:
    """Find the documents that most help (and most hurt) a query's completion, from the sketch index.

    Example: curator search --prompt "What is the slope of the line through (2, 3) and (4, 7)?" --completion
    "The slope is (7 - 3) / (4 - 2) = 2." --rerank 200
    """
    import polars as pl

    from curator.sketch.search import SearchRequest
    from curator.sketch.search import search as run_search

    if not queries and not (prompt and completion):
        raise typer.BadParameter("give --prompt and --completion, or --queries")
    request = SearchRequest(prompt=prompt, completion=completion, queries=queries, top=top, bottom=bottom,
                            rerank=rerank, index=index, device=device, dtype=dtype.value)
    results = run_search(workspace_from(workspace), request)
    if results and not rerank and results[0].fidelity:
        measured = results[0].fidelity
        cross = measured.get("groups", {}).get("cross-format")
        mean, count, kind = ((cross["mean"], cross["queries"], "held-out queries in other formats than the suite's")
                             if cross else (measured["mean"], measured["queries"], "held-out queries"))
        console.print(f"Sketch scores (store {results[0].store}) agree with exact ones at Spearman "
                      f"{mean['spearman']:.2f} on {count} {kind}; --rerank N scores the candidates exactly.",
                      highlight=False)
        if not cross:
            # Same-family held-out queries flatter a store: other wording ranks far worse (docs/sketches.md).
            console.print("No query in another format than the suite's was measured; queries phrased unlike the "
                          "suite agree much less (docs/sketches.md, \"Held out the way users differ\").",
                          highlight=False)
    for result in results:
        console.print(f"\n[bold]{result.query_id}[/]: {result.prompt[:100]!r}", highlight=False)
        for hits, label in ((result.top, f"top {top}" + (f" (exact re-rank of {rerank})" if rerank else "")),
                            (result.bottom, f"bottom {bottom}")):
            if hits:
                frame = pl.DataFrame([{"doc_id": h.doc_id, "source": h.source, "score": h.score,
                                       "snippet": h.snippet[:80]} for h in hits])
                print_frame(frame, OutputFormat.table, title=label, formats={"score": ".4g"})


def fidelity(
    queries: Annotated[str, typer.Option("--queries", "-q", help="Held-out queries (not in the store's suite).",
                                         show_default=False)],
    sample: Annotated[int, typer.Option(help="Documents of the store to score exactly as the reference.")] = 1000,
    store: Annotated[str | None, typer.Option(help="Sketch store (id or prefix). Default: the latest.",
                                              show_default=False)] = None,
    device: DeviceOption = "cpu",
    dtype: DTypeOption = DType.float32,
    seed: Annotated[int, typer.Option(help="Seed of the document sample.")] = 0,
    workspace: WorkspaceOption = None,
) -> None:
    """Compare sketch scores with exact EK-FAC scores on sampled documents for queries outside the suite:
    Pearson, Spearman, top-10/100 overlap and the recall of the exact top 10 in the sketch's top 1% and 5%."""
    from curator.sketch.fidelity import measure_store
    from curator.sketch.store import load_store

    ws = workspace_from(workspace)
    chosen = load_store(ws, store)
    result = measure_store(ws, chosen, queries, sample=sample, seed=seed, device=device, dtype=dtype.value)
    _fidelity_table(result, f"{chosen.id} ({chosen.method}, {chosen.bytes_per_doc:,} bytes/doc): "
                            f"{result['queries']} held-out queries × {result['documents']} documents "
                            f"(reference: exact EK-FAC {result['reference']})")
