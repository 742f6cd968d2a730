"""`curator score`: influence of every document on every selected query."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curator import constants
from curator.cli.common import (
    BatchTokensOption,
    ChunkDocsOption,
    DeviceOption,
    DType,
    DTypeOption,
    FactorsOption,
    OutputFormat,
    OutputOption,
    WorkspaceOption,
    choices,
    values,
    console,
    print_frame,
    workspace_from,
)

Method = choices("Method", values(constants.ScoreMethod))
ChatTemplate = choices("ChatTemplate", values(constants.ChatTemplate))


def query_rank_value(text: str) -> int | str:
    if text in ("auto", "dense"):
        return text
    try:
        rank = int(text)
    except ValueError:
        raise typer.BadParameter("expected auto, dense or a positive whole number") from None
    if rank < 1:
        raise typer.BadParameter("the rank must be at least 1")
    return rank


def score(
    queries: Annotated[str, typer.Option("--queries", "-q", help="Selector: all, or comma-separated tasks, "
                                                                 "query sets or query ids.")] = "all",
    method: Annotated[Method, typer.Option(help="exact: one EK-FAC pass over every document; sketch: inner "
                                                "products with a sketch store (`curator sketch`), no model pass "
                                                "over documents.")] = "exact",
    store: Annotated[str | None, typer.Option(help="Sketch store for --method sketch. Default: the latest.",
                                              show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Where the scores go: a folder of Parquet parts (exact) or "
                                                  "a Parquet file (sketch). Default: scores/RUN in the workspace.",
                                             show_default=False)] = None,
    factors: FactorsOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Default: the model the factors were fitted "
                                              "on. Another model is refused.", show_default=False)] = None,
    modules: Annotated[str | None, typer.Option(help="Must equal the fit's module set; given only to check it.",
                                                show_default=False)] = None,
    query_rank: Annotated[str, typer.Option(
        help="How each preconditioned query gradient is kept per layer. auto: dense when the whole suite fits "
             "--query-memory-mb (exact), else a rank-32 SVD (Grosse et al.: correlation ≈ 0.995 with dense), or "
             "the largest rank that still fits the suite, so one pass over the documents scores every query. "
             "dense: always exact (a large suite then takes several passes). K: a rank-K SVD.")] = "auto",
    query_memory_mb: Annotated[int, typer.Option(help="Memory for preconditioned queries per document pass. "
                                                      "With a rank, what is left holds queries multiplied out, "
                                                      "which scores long windows faster.")] = 2048,
    max_docs: Annotated[int | None, typer.Option(help="Score a seeded sample of documents. Default: all.",
                                                 show_default=False)] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Window length. Default: the fit's.",
                                                    show_default=False)] = None,
    chat_template: Annotated[ChatTemplate, typer.Option(
        help="auto: wrap each prompt in the tokenizer's chat template when it has one.")] = "auto",
    device: DeviceOption = "cpu",
    dtype: DTypeOption = DType.float32,
    batch_tokens: BatchTokensOption = 4096,
    chunk_docs: ChunkDocsOption = 512,
    force: Annotated[bool, typer.Option("--force", help="Score again even if this run exists.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Score the influence of every document on every selected query.

    One row per (query_id, doc_id): score = ∇ℓ(q)ᵀ H⁻¹ ∇L(d) (positive: training on the document makes
    the query's completion more likely) and score_per_nat = score / ℓ(q), the completion's loss in nats.
    The scores are a Parquet dataset: a folder of parts (read it with DuckDB's read_parquet('OUT/*.parquet')
    or polars' scan_parquet). The run (model, factors, settings, per-query losses, timings) is recorded in the
    catalog. A killed run resumes from its finished parts; run over all documents, the same command after
    another ingest scores only the new documents and adds them to the run.

    Across processes or GPUs: torchrun --nproc-per-node 8 -m curator score ... (docs/scaling.md).

    Example: curator score --queries arithmetic,slope,linear --out scores
    """
    from curator.cli.passes import PassBar
    from curator.influence.score import ScoreConfig
    from curator.influence.score import score as exact_score
    from curator.sketch.scoring import sketch_score

    ws = workspace_from(workspace)
    config = ScoreConfig(queries=queries, method=method.value, store=store, factors=factors, model=model,
                         modules=modules, query_rank=query_rank_value(query_rank), query_memory_mb=query_memory_mb,
                         max_docs=max_docs, max_seq_len=max_seq_len, chat_template=chat_template.value,
                         device=device, dtype=dtype.value, batch_tokens=batch_tokens, chunk_docs=chunk_docs)
    run = sketch_score if config.method == "sketch" else exact_score
    with PassBar() as bar:
        result = run(ws, config, out=out, progress=bar, force=force)
    stats = result.stats
    if result.reused:
        console.print(f"Run [bold]{result.run_id}[/] exists already (use --force to score again): {result.out_path}")
        return
    if stats.get("query_rank_reason"):
        passes = stats["query_batches"]
        console.print(f"Queries kept {stats['query_rank_reason']}; {passes} pass{'es' * (passes != 1)} over the "
                      f"documents.", highlight=False)
    added = stats.get("added_documents", stats["documents"])
    new = f" ({added:,} new)" if added != stats["documents"] else ""
    console.print(f"Run [bold]{result.run_id}[/] with factors {result.factors_id}: {stats['queries']} queries × "
                  f"{stats['documents']:,} documents{new} ({stats['tokens']:,} tokens) at "
                  f"{stats['docs_per_second']:,.1f} docs/s → {result.out_path}")


def runs(
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Scoring runs: model, factors, queries, documents, speed and where the scores are."""
    from curator.catalog.records import runs_table

    frame = runs_table(workspace_from(workspace))
    print_frame(frame, output, title=f"{frame.height} scoring runs")


def factors(
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Fitted EK-FAC factors: model, tracked modules and blocks, Fisher, fitting sample."""
    from curator.catalog.records import factors_table

    frame = factors_table(workspace_from(workspace))
    print_frame(frame, output, title=f"{frame.height} fits")
