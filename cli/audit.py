"""`curator audit` and `curator compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curator.cli.common import OutputFormat, OutputOption, WorkspaceOption, console, print_frame, workspace_from


def audit(
    out: Annotated[Path, typer.Option(help="HTML report to write (self-contained: opens offline).",
                                      show_default=False)] = Path("audit.html"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers behind every figure.",
                                                  show_default=False)] = None,
    run: Annotated[str | None, typer.Option(help="Scoring run (id or prefix). Default: the latest, if any.",
                                            show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Audit the corpus and a scored run: composition, influence by source, query correlations,
    concentration of influence and answer occurrence (the analyses of Ruis et al. 2024).

    Without a scored run the report shows the composition and says which sections need one.
    """
    from curator.audit.audit import audit as run_audit
    from curator.audit.report import write_report

    data = run_audit(workspace_from(workspace), run)
    write_report(data, out, json_out)
    console.print(f"Wrote {out}" + (f" and {json_out}" if json_out else "")
                  + (f" for run {data['run']['id']}." if data["run"] else
                     " (composition only: no scored run yet)."))


def compare(
    run_a: Annotated[str, typer.Argument(help="First run (id or prefix).", show_default=False)],
    run_b: Annotated[str, typer.Argument(help="Second run.", show_default=False)],
    plot: Annotated[Path | None, typer.Option(help="SVG plot to write. Default: reports/compare-A-B.svg in the "
                                                   "workspace.", show_default=False)] = None,
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Per-query correlation of two runs' scores over their common documents: two models, two settings,
    or sketch against exact.

    Pearson's r of the scores and Spearman's rho (Pearson of their ranks; tied scores share the mean of
    their ranks), with the means over queries, and an SVG plot. Two `curator score` runs over the same
    catalog are read from their parts a group of queries at a time (2M documents x 100 queries: ~11 s);
    other pairs are joined in DuckDB (within CURATOR_DUCKDB_MEMORY, spilling the rest).

    Example: curator compare score-3f2a score-91bc --output json"""
    import polars as pl

    from curator.audit.compare import compare as run_compare

    result = run_compare(workspace_from(workspace), run_a, run_b, plot=plot)
    frame = pl.DataFrame([{"query": q, **v} for q, v in result["per_query"].items()])
    print_frame(frame, output, title=f"{result['run_a']} vs {result['run_b']}",
                footer={"query": "mean", "pearson": result["mean_pearson"], "spearman": result["mean_spearman"]})
    if output is OutputFormat.table:
        console.print(f"Plot: {result['plot']}")
