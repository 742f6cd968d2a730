"""`curator queries generate|add|list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curator.constants import GENERATED_TASKS, QUERY_FAMILIES
from curator.cli.common import (
    OutputFormat,
    OutputOption,
    WorkspaceOption,
    choices,
    console,
    print_frame,
    workspace_from,
)

app = typer.Typer(help="Queries: the prompts and completions whose influence is measured.", no_args_is_help=True)

Task = choices("Task", GENERATED_TASKS)
Family = choices("Family", QUERY_FAMILIES)


@app.command("generate")
def generate(
    task: Annotated[Task, typer.Option(help="The task: one of the paper's three reasoning tasks or its two "
                                            "controls.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="How many queries.")] = 10,
    seed: Annotated[int, typer.Option(help="The same seed gives the same queries; --n 20 extends --n 10.")] = 0,
    family: Annotated[Family, typer.Option(
        help="How the queries are written: paper (Ruis et al.'s step-by-step format, what sketch suites are "
             "built from), or a held-out family written the way other people write: terse, prose, code "
             "(a program to run in your head) or chat.")] = "paper",
    workspace: WorkspaceOption = None,
) -> None:
    """Generate queries in the formats of Ruis et al. (2024), with step-by-step completions, or in other
    families of formats for the same reasoning tasks.

    arithmetic: (a + b) * c or (a - b) * c, operands 0-20; slope: through two points with coordinates 0-100;
    linear: ax + b = c, coefficients 0-100, positive integer x; reasoning-control: restate a number from the
    prompt; factual-control: recall a fictional fact stated in the prompt. Ids are TASK-sSEED-NNNN and the
    query set is TASK-sSEED (TASK-FAMILY-sSEED-NNNN and TASK-FAMILY-sSEED for the other families). Every
    answer is checked by recomputing it (tests/test_queries.py).
    """
    from curator.catalog.queries import add_queries
    from curator.catalog.querygen import generate as make

    queries = make(task.value, n, seed, family.value)
    result = add_queries(workspace_from(workspace), queries)
    console.print(f"Query set [bold]{result.query_set}[/]: {result.added} added, {result.unchanged} already there.")
    console.print(f"Example: {queries[0].prompt!r} → {queries[0].completion!r}", markup=False, highlight=False)


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="JSONL with one query per line: id, task, prompt, completion, "
                                              "answer (answer optional).", show_default=False)],
    query_set: Annotated[str | None, typer.Option("--set", help="Name of the query set. Default: the file name.",
                                                  show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Import your own queries. A bad line is an error naming file:line and field, and nothing is added."""
    from curator.catalog.queries import add_queries, read_query_file

    ws = workspace_from(workspace)
    result = add_queries(ws, read_query_file(file, query_set))
    console.print(f"Query set [bold]{result.query_set}[/]: {result.added} added, {result.unchanged} already there.")


@app.command("list")
def list_queries(
    queries: Annotated[str, typer.Option("--queries", "-q", help="Selector: all, or comma-separated tasks, "
                                                                 "query sets or ids.")] = "all",
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """The queries in the catalog."""
    from curator.catalog.queries import queries_table

    frame = queries_table(workspace_from(workspace), queries)
    if output is OutputFormat.table:
        import polars as pl

        frame = frame.with_columns(pl.col("prompt").str.slice(0, 70))
    print_frame(frame, output, title=f"{frame.height} queries")
