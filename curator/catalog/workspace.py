"""A workspace: one folder holding the DuckDB catalog and the artifacts it names.

Layout::

    DIR/curator.duckdb     the catalog (sources, documents, batches, later runs ...)
    DIR/factors/           EK-FAC factors (safetensors)
    DIR/sketches/          gradient sketch stores (shards + manifest)
    DIR/indexes/           FAISS indexes
    DIR/scores/            score tables (Parquet)
    DIR/exports/           exported mixtures (shards + manifest)
    DIR/reports/           audit reports

Commands find the workspace from ``--workspace``, else ``$CURATOR_WORKSPACE``,
else the current directory, and refuse to run anywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from curator.errors import WorkspaceError

CATALOG_FILE = "curator.duckdb"
ENV_VAR = "CURATOR_WORKSPACE"
ARTIFACT_DIRS = ("factors", "sketches", "indexes", "scores", "exports", "reports")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    def artifact_dir(self, name: str) -> Path:
        if name not in ARTIFACT_DIRS:
            raise ValueError(f"unknown artifact folder {name!r}; expected one of {ARTIFACT_DIRS}")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    @classmethod
    def locate(cls, option: str | os.PathLike | None = None) -> Workspace:
        """The workspace named by the option, the environment or the current directory."""
        if option is not None:
            root, origin = Path(option), "--workspace"
        elif os.environ.get(ENV_VAR):
            root, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
        else:
            root, origin = Path.cwd(), "the current directory"
        root = root.expanduser().resolve()
        if not (root / CATALOG_FILE).is_file():
            raise WorkspaceError(
                f"{root} is not a curator workspace (no {CATALOG_FILE}; taken from {origin}). "
                f"Create one with `curator init {root}`, or point --workspace/-w or "
                f"${ENV_VAR} at an existing one."
            )
        return cls(root)
