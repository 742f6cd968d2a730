from __future__ import annotations

from pathlib import Path

import pytest

from curator.catalog.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace, _ = Workspace.init(tmp_path / "ws")
    return workspace
