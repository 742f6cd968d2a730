"""Server-side paths, confined to the roots the server was started with.

A client names files on the server's disk (corpora to ingest, models, export folders). Every such path
is resolved (symlinks followed) and must land inside one of the configured roots; `..` is refused
before resolving, so that a path never even names a place outside.
"""

from __future__ import annotations

import os
from pathlib import Path

from curator.service.errors import ApiError


def resolve_roots(roots: list[str | os.PathLike]) -> list[Path]:
    resolved = []
    for root in roots:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise ApiError(500, "root", f"--root {root} is not a folder")
        resolved.append(path)
    return resolved


def confine(raw: str, roots: list[Path], field: str) -> Path:
    """`raw` (absolute, or relative to the first root) resolved, if it lies inside a root; else a 403."""
    if not raw or "\x00" in raw:
        raise ApiError(400, field, "an empty path or one with a NUL character")
    if not roots:
        raise ApiError(403, field, "this server has no --root, so it accepts no server-side paths")
    path = Path(raw)
    if ".." in path.parts:
        raise ApiError(403, field, f"{raw!r}: '..' is not allowed in server-side paths")
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()      # follows every symlink: a link out of a root is caught here
        if any(resolved == root or resolved.is_relative_to(root) for root in roots):
            return resolved
    raise ApiError(403, field, f"{raw!r} is outside the server's roots (symlinks are followed)")


def looks_like_path(name: str) -> bool:
    """Model names are short names (smollm2-135m) or paths; only paths are confined."""
    return os.sep in name or name.startswith((".", "~")) or name.endswith(".gguf")
