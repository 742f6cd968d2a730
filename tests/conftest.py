from __future__ import annotations

from pathlib import Path

import pytest

from curator.catalog.workspace import Workspace
from curator.catalog.database import create_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace, _ = create_workspace(tmp_path / "ws")
    return workspace
