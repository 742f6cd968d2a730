"""`curator serve` and `curator token`."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from curator.cli.common import OutputFormat, OutputOption, WorkspaceOption, console, err_console, print_frame, \
    workspace_from

token_app = typer.Typer(help="API tokens for `curator serve`.", no_args_is_help=True)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --allow-remote.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (every "
                                                                      "request still needs a token).")] = False,
    root: Annotated[list[Path] | None, typer.Option("--root", help="A folder whose files clients may name "
                                                                   "(ingest inputs, models, export folders); "
                                                                   "repeatable. None: no server-side paths.",
                                                    show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve the workspace over HTTP (docs/service.md): reads, search and jobs under /v1, OpenAPI at /docs.

    While it runs the server owns the workspace: other curator commands that write are refused.
    """
    from curator.service.app import serve as run_server
    from curator.service.paths import resolve_roots

    if not _loopback(host):
        if not allow_remote:
            raise typer.BadParameter(f"{host} is not a loopback address; add --allow-remote to listen on it",
                                     param_hint="--host")
        err_console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who can reach it can try "
                          f"tokens; put TLS in front of it (a reverse proxy) for use across machines.")
    ws = workspace_from(workspace)
    roots = resolve_roots(root or [])
    console.print(f"Serving {ws.root} at http://{host}:{port} (OpenAPI: /docs); roots: "
                  f"{', '.join(map(str, roots)) or 'none'}. Ctrl-C stops it.", highlight=False)
    run_server(ws, host, port, roots)


@token_app.command("create")
def token_create(
    scope: Annotated[str, typer.Option(help="read (reads and search) or write (also jobs).")] = "read",
    name: Annotated[str | None, typer.Option(help="A label for the token.", show_default=False)] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Make an API token. It is printed once; the catalog keeps only a salted hash of it."""
    from curator.service.auth import create_token

    if scope not in ("read", "write"):
        raise typer.BadParameter("read or write", param_hint="--scope")
    info, token = create_token(workspace_from(workspace), scope, name)
    err_console.print(f"Token {info.name} ({info.scope}); keep it, it is not shown again:")
    print(token)


@token_app.command("list")
def token_list(output: OutputOption = OutputFormat.table, workspace: WorkspaceOption = None) -> None:
    """The tokens (names and scopes; the secrets are not stored)."""
    import polars as pl

    from curator.service.auth import tokens_table

    rows = [t.model_dump() for t in tokens_table(workspace_from(workspace))]
    print_frame(pl.DataFrame(rows, schema=["id", "name", "scope"]), output, title=f"{len(rows)} tokens")


@token_app.command("revoke")
def token_revoke(
    token: Annotated[str, typer.Argument(help="The token's id or name (`curator token list`).")],
    workspace: WorkspaceOption = None,
) -> None:
    """Delete a token. A running server refuses it within 30 s (it remembers verified tokens that long)."""
    from curator.service.auth import revoke_token

    info = revoke_token(workspace_from(workspace), token)
    err_console.print(f"Revoked token {info.id} ({info.name}, {info.scope}).")
