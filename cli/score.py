"""`curator score`: influence of every document on every selected query."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from curator.cli.common import OutputFormat, WorkspaceOption, console, print_frame, workspace_from
from curator.cli.fit import DType


class Method(str, Enum):
    exact = "exact"
    sketch = "sketch"


class ChatTemplate(str, Enum):
    auto = "auto"
    none = "none"


def score(
    queries: Annotated[str, typer.Option("--queries", "-q", help="Selector: all, or comma-separated tasks, "
                                                                 "query sets or query ids.")] = "all",
    method: Annotated[Method, typer.Option(help="exact: one EK-FAC pass over every document; sketch: inner "
                                                "products with a sketch store (`curator sketch`), no model pass "
                                                "over documents.")] = Method.exact,
    store: Annotated[str | None, typer.Option(help="Sketch store for --method sketch. Default: the latest.",
                                              show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Parquet file to write. Default: scores/RUN.parquet in the "
                                                  "workspace.", show_default=False)] = None,
    factors: Annotated[str | None, typer.Option(help="Fit id (a unique prefix is enough). Default: the latest fit.",
                                                show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Default: the model the factors were fitted "
                                              "on. Another model is refused.", show_default=False)] = None,
    modules: Annotated[str | None, typer.Option(help="Must equal the fit's module set; given only to check it.",
                                                show_default=False)] = None,
    query_rank: Annotated[int | None, typer.Option(
        help="Keep each preconditioned query gradient as a rank-K SVD per layer (Grosse et al.: 32 keeps "
             "correlation ≈ 0.995); bounds memory with many queries.", show_default=False)] = None,
    query_memory_mb: Annotated[int, typer.Option(help="Memory for preconditioned queries per document pass; "
                                                      "more queries take more passes. With --query-rank, what "
                                                      "is left holds queries multiplied out, which scores long "
                                                      "windows faster.")] = 2048,
    max_docs: Annotated[int | None, typer.Option(help="Score a seeded sample of documents. Default: all.",
                                                 show_default=False)] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Window length. Default: the fit's.",
                                                    show_default=False)] = None,
    chat_template: Annotated[ChatTemplate, typer.Option(
        help="auto: wrap each prompt in the tokenizer's chat template when it has one.")] = ChatTemplate.auto,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[DType, typer.Option(help="Model dtype.")] = DType.float32,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per forward+backward batch.")] = 4096,
    force: Annotated[bool, typer.Option("--force", help="Score again even if this run exists.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Score the influence of every document on every selected query.

    One row per (query_id, doc_id): score = ∇ℓ(q)ᵀ H⁻¹ ∇L(d) (positive: training on the document makes
    the query's completion more likely) and score_per_nat = score / ℓ(q), the completion's loss in nats.
    The run (model, factors, settings, per-query losses, timings) is recorded in the catalog. A killed run
    resumes from its finished chunks in OUT.part/.

    Example: curator score --queries arithmetic,slope,linear --query-rank 32 --out scores.parquet
    """
    from curator.cli.passes import PassBar
    from curator.influence.score import ScoreConfig
    from curator.influence.score import score as run_score

    ws = workspace_from(workspace)
    config = ScoreConfig(queries=queries, method=method.value, store=store, factors=factors, model=model, modules=modules,
                         query_rank=query_rank, query_memory_mb=query_memory_mb, max_docs=max_docs,
                         max_seq_len=max_seq_len, chat_template=chat_template.value, device=device,
                         dtype=dtype.value, batch_tokens=batch_tokens)
    with PassBar() as bar:
        result = run_score(ws, config, out=out, progress=bar, force=force)
    stats = result.stats
    if result.reused:
        console.print(f"Run [bold]{result.run_id}[/] exists already (use --force to score again): {result.out_path}")
        return
    console.print(f"Run [bold]{result.run_id}[/] with factors {result.factors_id}: {stats['queries']} queries × "
                  f"{stats['documents']:,} documents ({stats['tokens']:,} tokens) at "
                  f"{stats['docs_per_second']:,.1f} docs/s → {result.out_path}")


def runs(
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table, json or csv.")] = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Scoring runs: model, factors, queries, documents, speed and where the scores are."""
    from curator.catalog.database import Catalog
    from curator.catalog.records import runs_table

    with Catalog.open(workspace_from(workspace)) as catalog:
        frame = runs_table(catalog)
    print_frame(frame, output, title=f"{frame.height} scoring runs")


def factors(
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table, json or csv.")] = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Fitted EK-FAC factors: model, tracked modules and blocks, Fisher, fitting sample."""
    from curator.catalog.database import Catalog
    from curator.catalog.records import factors_table

    with Catalog.open(workspace_from(workspace)) as catalog:
        frame = factors_table(catalog)
    print_frame(frame, output, title=f"{frame.height} fits")
