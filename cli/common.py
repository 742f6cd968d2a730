"""What every command shares: the workspace option, errors, tables."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich import box
from rich.table import Table

from curator.constants import ModelDType, values

# Piped output is not cut to 80 columns: tables there are read by tools or in wide logs.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w",
        help="Workspace folder (holds curator.duckdb). Default: $CURATOR_WORKSPACE, else the current directory.",
        show_default=False,
    ),
]


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def choices(name: str, names) -> type[Enum]:
    """A CLI enum of a Literal's values (curator.constants), so the CLI and the settings cannot drift apart."""
    return Enum(name, {v: v for v in names}, type=str)


# Options that mean the same in every command that has them.
OutputOption = Annotated[OutputFormat, typer.Option("--output", "-o", help="table for people, json or csv for "
                                                                            "tools.")]
DType = choices("DType", values(ModelDType))
def _device(value: str) -> str:
    import re

    from curator.constants import DEVICE_PATTERN

    if not re.match(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"{value!r} is not a device curator runs on: cpu, cuda or cuda:N")
    return value


DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", callback=_device)]
DTypeOption = Annotated[DType, typer.Option(help="The model's dtype (statistics and scores are accumulated in "
                                                 "float32/64).")]
FactorsOption = Annotated[str | None, typer.Option(help="Fit id (a unique prefix is enough; `curator factors` lists "
                                                        "them). Default: the latest fit.", show_default=False)]
BatchTokensOption = Annotated[int, typer.Option(help="Tokens per forward+backward batch (padding included).")]
ChunkDocsOption = Annotated[int, typer.Option(
    min=1, help="Documents per chunk: the unit a killed run resumes from and that torchrun hands to a rank. "
                "It does not change the result.")]


def workspace_from(option: Path | None):
    from curator.catalog.workspace import Workspace

    return Workspace.locate(option)


def print_frame(frame, fmt: OutputFormat, title: str | None = None, formats: dict[str, str] | None = None,
                footer: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
    """A polars DataFrame as a terminal table, JSON records or CSV.

    `headers` renames columns for the terminal table only; JSON and CSV keep the
    column names that tools rely on."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(frame.to_dicts(), indent=2, default=str) + "\n")
        return
    if fmt is OutputFormat.csv:
        sys.stdout.write(frame.write_csv())
        return
    formats = formats or {}
    table = Table(title=title, show_footer=footer is not None, header_style="bold", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False, collapse_padding=True)
    for name, dtype in frame.schema.items():
        numeric = dtype.is_numeric()
        table.add_column((headers or {}).get(name, name), justify="right" if numeric else "left",
                         no_wrap=True,
                         footer=_cell((footer or {}).get(name), formats.get(name)))
    for row in frame.iter_rows():
        table.add_row(*(_cell(value, formats.get(name)) for name, value in zip(frame.columns, row, strict=True)))
    console.print(table)


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if fmt:
        return format(value, fmt)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
