"""Workspaces, schema migrations and the single-writer lock, on real DuckDB files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from curator.catalog.database import Catalog
from curator.errors import CatalogLockedError, SchemaError, WorkspaceError
from curator.catalog.schema import LATEST_VERSION, MIGRATIONS, Migration
from curator.catalog.workspace import ARTIFACT_DIRS, CATALOG_FILE, ENV_VAR, Workspace
from curator.catalog.database import create_workspace


def test_init_creates_catalog_and_artifact_folders(tmp_path):
    ws, created = create_workspace(tmp_path / "new" / "ws")
    assert created
    assert (ws.root / CATALOG_FILE).is_file()
    assert all((ws.root / d).is_dir() for d in ARTIFACT_DIRS)
    with Catalog.open(ws) as catalog:
        assert catalog.schema_version() == LATEST_VERSION
        tables = {r[0] for r in catalog.sql("SELECT table_name FROM information_schema.tables")}
    assert {"sources", "document_rows", "documents", "ingest_batches", "token_counts"} <= tables
    # Running init again is safe and says the workspace already existed.
    assert create_workspace(ws.root) == (ws, False)


def test_locate_prefers_option_then_environment_then_cwd(tmp_path, monkeypatch):
    a, _ = create_workspace(tmp_path / "a")
    b, _ = create_workspace(tmp_path / "b")
    monkeypatch.chdir(a.root)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Workspace.locate() == a
    monkeypatch.setenv(ENV_VAR, str(b.root))
    assert Workspace.locate() == b
    assert Workspace.locate(a.root) == a


def test_locate_outside_a_workspace_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError, match=rf"{tmp_path} is not a curator workspace.*curator init"):
        Workspace.locate()


def test_migrations_apply_in_order_and_only_once(tmp_path):
    ws = Workspace(tmp_path)
    first = [MIGRATIONS[0]]
    Catalog.open(ws, write=True, migrations=first).close()
    extra = Migration(LATEST_VERSION + 1, "add a column", "ALTER TABLE sources ADD COLUMN note VARCHAR")
    with Catalog.open(ws, write=True, migrations=[*MIGRATIONS, extra]) as catalog:
        assert catalog.schema_version() == LATEST_VERSION + 1
        assert catalog.sql("SELECT count(*) FROM schema_version")[0][0] == LATEST_VERSION + 1
        catalog.sql("INSERT INTO sources (name, kind, note) VALUES ('s', 'code', 'x')")
    # Opening again applies nothing twice (a second ALTER would fail).
    Catalog.open(ws, write=True, migrations=[*MIGRATIONS, extra]).close()


def test_a_catalog_from_a_newer_curator_is_refused(tmp_path):
    ws = Workspace(tmp_path)
    newer = Migration(LATEST_VERSION + 1, "future", "CREATE TABLE future (x INTEGER)")
    Catalog.open(ws, write=True, migrations=[*MIGRATIONS, newer]).close()
    with pytest.raises(SchemaError, match="newer than this curator"):
        Catalog.open(ws, write=True)
    with pytest.raises(SchemaError, match="newer than this curator"):
        Catalog.open(ws)


def test_reading_an_old_catalog_migrates_it_first(tmp_path):
    ws = Workspace(tmp_path)
    Catalog.open(ws, write=True, migrations=MIGRATIONS).close()
    newer = Migration(LATEST_VERSION + 1, "next", "CREATE TABLE nxt (x INTEGER)")
    with Catalog.open(ws, migrations=[*MIGRATIONS, newer]) as catalog:
        assert not catalog.write
        assert catalog.schema_version() == LATEST_VERSION + 1
        assert catalog.sql("SELECT count(*) FROM nxt") == [(0,)]


def test_a_catalog_locked_by_another_writer_is_a_clear_error_not_a_hang(ws):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time, duckdb
            con = duckdb.connect({str(ws.catalog_path)!r})
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(CatalogLockedError, match="in use by another curator process"):
            Catalog.open(ws, write=True)
        with pytest.raises(CatalogLockedError):
            Catalog.open(ws)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
