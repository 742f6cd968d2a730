"""`curator ingest` and `curator sources`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from curator.constants import InputFormat, Kind, values
from curator.cli.common import (
    OutputFormat,
    OutputOption,
    WorkspaceOption,
    choices,
    console,
    err_console,
    print_frame,
    workspace_from,
)

KindChoice = choices("KindChoice", values(Kind))


FormatChoice = choices("FormatChoice", values(InputFormat))


PROGRESS_COLUMNS = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TextColumn("{task.fields[records]:,} records"), TextColumn("{task.fields[rate]:,.0f} docs/s"),
                    TimeElapsedColumn())


class RichProgress:
    """Bytes read (with a bar), records read and records per second."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None
        self.started = time.perf_counter()

    def start(self, total_bytes: int, files: int) -> None:
        self.task = self.progress.add_task(f"reading {files:,} file{'s' * (files != 1)}", total=total_bytes,
                                           records=0, rate=0.0)

    def update(self, records: int, bytes_done: int) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, completed=bytes_done, records=records, rate=records / elapsed)


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or directories to read.", show_default=False)],
    source: Annotated[str, typer.Option("--source", "-s", help="Source label for every document (e.g. stack-python).",
                                        show_default=False)],
    kind: Annotated[KindChoice | None, typer.Option(
        help="Kind of source. Default: the source's kind if it exists; in directories, inferred per file "
             "from its extension (source code = code, .md = markdown, .tex = arxiv, .txt = web); else other.",
        show_default=False)] = None,
    input_format: Annotated[FormatChoice, typer.Option(
        "--input-format",
        help="auto decides per file: .jsonl/.ndjson (also .gz/.zst, and .json.gz/.json.zst) = jsonl, "
             ".parquet = parquet, a save_to_disk folder = hf, anything else = one text document per file.")
    ] = "auto",
    text_field: Annotated[str, typer.Option(help="Field holding the text (JSONL/Parquet/HF); a dotted path "
                                                 "such as meta.content reaches into JSON objects.")] = "text",
    id_field: Annotated[str | None, typer.Option(help="Field holding the record's own id. Default: `id` when "
                                                     "present; records then lacking it are not bad.",
                                                show_default=False)] = None,
    glob: Annotated[str | None, typer.Option(help="In directories, only files whose relative path matches, "
                                                  "e.g. '*.py' or 'docs/*.md'.", show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Abort at the first bad record; the catalog is left "
                                                          "as it was. Default: skip it, count it, report it.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Read corpora into the catalog under one source label.

    One run is one batch: it becomes visible only when complete, so a failed or
    killed ingest leaves the catalog as it was. Exact duplicates (same text after
    Unicode NFC, CRLF→LF and trimming) are stored once and counted. Re-running on
    unchanged inputs does nothing.

    Examples:

      curator ingest data/stack/ --source stack --kind code --glob '*.py'

      curator ingest shard-*.jsonl.zst --source web --kind web --text-field content
    """
    from curator.catalog.ingest import IngestOptions, ingest as run_ingest

    ws = workspace_from(workspace)
    options = IngestOptions(source=source, kind=kind.value if kind else None, format=input_format.value,
                            text_field=text_field, id_field=id_field, glob=glob, strict=strict)
    with Progress(*PROGRESS_COLUMNS, console=err_console, transient=True) as bar:
        summary = run_ingest(ws, [str(p) for p in paths], options, RichProgress(bar))
    print_summary(summary)


def print_summary(summary) -> None:
    if summary.status == "unchanged":
        console.print(f"Nothing to do: these inputs ({summary.files} file{'s' * (summary.files != 1)}, unchanged) "
                      f"were already ingested into source [bold]{summary.source}[/] as batch {summary.batch_id} "
                      f"at {summary.ingested_at:%Y-%m-%d %H:%M:%S}.")
        return
    console.print(
        f"Source [bold]{summary.source}[/], batch {summary.batch_id}: [green]{summary.inserted:,} new documents[/] "
        f"from {summary.records_read:,} records in {summary.files:,} file{'s' * (summary.files != 1)} "
        f"({summary.duplicates:,} duplicates, {summary.skipped:,} skipped) "
        f"in {summary.seconds:.1f} s, {summary.docs_per_second:,.0f} docs/s."
    )
    if summary.inserted == 0 and summary.duplicates:
        console.print("No new documents: every one was already in the catalog.")
    if summary.skipped:
        err_console.print(f"[yellow]Skipped {summary.skipped:,} bad record{'s' * (summary.skipped != 1)}:[/] " +
                          ", ".join(f"{n:,} {problem}" for problem, n in summary.problem_counts.items()))
        shown = summary.problems[:10]
        for p in shown:
            err_console.print(f"  {p.origin}: {p.problem}" + (f" ({p.detail})" if p.detail else ""),
                              markup=False, highlight=False)
        if summary.skipped > len(shown):
            err_console.print(f"  … and {summary.skipped - len(shown):,} more (--strict stops at the first)")


def sources(
    output: OutputOption = OutputFormat.table,
    tokenizer: Annotated[str | None, typer.Option(help="Whose token counts to show. Default: the tokenizer with "
                                                       "the most cached counts.", show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Corpus composition: per source and kind, documents, characters, tokens (once a
    model has counted them), bytes, and each one's share of the corpus."""
    from curator.catalog.composition import corpus_composition
    from curator.cli.common import human_bytes

    frame = corpus_composition(workspace_from(workspace), tokenizer)
    if frame.is_empty():
        if output is OutputFormat.table:
            console.print("The catalog holds no documents yet. Add some with `curator ingest PATH --source NAME`.")
        else:
            print_frame(frame, output)
        return
    if output is OutputFormat.table:
        import polars as pl

        shown = frame.with_columns(pl.col("bytes").map_elements(human_bytes, return_dtype=pl.String).alias("size"))
        shown = shown.select("source", "kind", "documents", "chars", "tokens", "size", "docs_share", "chars_share")
        total = {"source": "total", "documents": frame["documents"].sum(), "chars": frame["chars"].sum(),
                 "tokens": frame["tokens"].sum() if frame["tokens"].null_count() == 0 else None,
                 "size": human_bytes(frame["bytes"].sum()), "docs_share": 1.0, "chars_share": 1.0}
        print_frame(shown, output, title="Corpus composition", footer=total,
                    formats={"docs_share": ".1%", "chars_share": ".1%"},
                    headers={"documents": "docs", "docs_share": "% docs", "chars_share": "% chars"})
    else:
        print_frame(frame, output)
