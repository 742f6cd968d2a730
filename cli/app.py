"""The `curator` command. Thin: parse options, call the library, print.

Library modules are imported inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from curator.cli import (audit, demo, docs, evaluate, fit, ingest, mix, queries, records, remote, score, serve,
                         sketch)
from curator.cli.common import console, err_console

app = typer.Typer(
    name="curator",
    help="Rank pretraining documents by their influence on a model's reasoning, and build curated "
         "mixtures from the ranking.\n\nStart with `curator init DIR`, then `curator ingest PATH --source NAME` "
         "and `curator sources`. Then `curator fit --model M`, `curator queries generate --task arithmetic` and "
         "`curator score`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


@app.callback()
def connect(
    server: Annotated[str | None, typer.Option(envvar="CURATOR_SERVER", help="Ask a running `curator serve` at "
                                               "this URL instead of the local workspace: sources, docs show|sample, "
                                               "queries list, factors, runs, stores, index list, rankings, mixes, "
                                               "search and audit (run as a job on the server).",
                                               show_default=False)] = None,
    token: Annotated[str | None, typer.Option(envvar="CURATOR_TOKEN", help="The server's API token.",
                                              show_default=False)] = None,
) -> None:
    remote.Remote.url, remote.Remote.token = server, token


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to make into a workspace (created if missing).")]
    = Path("."),
) -> None:
    """Create a workspace: a DuckDB catalog (curator.duckdb) and folders for artifacts.

    Running it on an existing workspace is safe: it adds missing folders and
    migrates an older catalog to the current schema.
    """
    from curator.catalog.database import create_workspace

    ws, created = create_workspace(directory)
    verb = "Created" if created else "Workspace is ready at"
    console.print(f"{verb} [bold]{ws.root}[/] (catalog {ws.catalog_path.name}).")
    if created:
        console.print(f"Next: curator ingest PATH --source NAME -w {ws.root}")


def _twin(group: typer.Typer, name: str, remote_command) -> None:
    """Let a sub-command of `group` be answered by a server when --server is given."""
    for info in group.registered_commands:
        if info.name == name:
            info.callback = remote.either(info.callback, remote_command)
            return
    raise LookupError(f"no command {name!r} to answer remotely")


_twin(docs.app, "show", remote.docs_show)
_twin(docs.app, "sample", remote.docs_sample)
_twin(queries.app, "list", remote.queries_list)
sketch.index_app.command("list")(remote.either(records.index_list, remote.index_list))

app.command("ingest", no_args_is_help=True)(ingest.ingest)
app.command("sources")(remote.either(ingest.sources, remote.sources))
app.add_typer(docs.app, name="docs")
app.command("fit")(fit.fit)
app.add_typer(queries.app, name="queries")
app.command("score")(score.score)
app.command("runs")(remote.either(score.runs, remote.runs))
app.command("factors")(remote.either(score.factors, remote.factors))
app.command("rank")(mix.rank)
app.command("rankings")(remote.either(records.rankings, remote.rankings))
app.command("mix")(mix.mix)
app.command("mix-weights")(mix.mix_weights)
app.command("mixes")(remote.either(mix.mixes, remote.mixes))
app.command("export")(mix.export)
app.command("sketch")(sketch.sketch)
app.command("stores")(remote.either(records.stores, remote.stores))
app.add_typer(sketch.index_app, name="index")
app.command("search")(remote.either(sketch.search, remote.search))
app.command("fidelity")(sketch.fidelity)
app.command("audit")(remote.either(audit.audit, remote.audit))
app.command("demo")(demo.demo)
app.command("compare")(audit.compare)
app.command("evaluate")(evaluate.evaluate)
app.command("serve")(serve.serve)
app.add_typer(serve.token_app, name="token")


def main() -> None:
    from curator.errors import CuratorError

    try:
        app()
    except CuratorError as exc:
        # Under torchrun each rank reports its own error; say which one it was.
        rank = os.environ.get("CURATOR_RANK_PREFIX", "")
        err_console.print(f"[bold red]error:[/] {rank}{exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing from an unfinished ingest was kept.")
        sys.exit(130)
