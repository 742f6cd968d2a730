"""The DuckDB catalog: opening, locking, migrations and recovery.

DuckDB allows one writing process at a time. Commands that only read open the
catalog read-only; a catalog held by another writer is a clear
:class:`CatalogLockedError`, never a hang.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import duckdb

from curator.errors import CatalogLockedError, SchemaError, WorkspaceError
from curator.catalog.schema import MIGRATIONS, Migration
from curator.catalog.workspace import ARTIFACT_DIRS, Workspace

# DuckDB caches up to 80% of RAM by default; a catalog connection gets a fixed
# cap instead, so an ingest of any size stays within it (DuckDB evicts or spills).
MEMORY_LIMIT_ENV = "CURATOR_DUCKDB_MEMORY"
DEFAULT_MEMORY_LIMIT = "2GB"
# Seconds to wait for a locked catalog before giving up (default: none). `curator serve` sets it for
# itself and its job workers, whose short reads and writes take turns with each other.
LOCK_WAIT_ENV = "CURATOR_LOCK_WAIT"
# A catalog opened with hold=False (a model pass reading documents chunk by chunk, an ingest writing
# chunk by chunk) opens a connection per statement and waits this long for another process's turn:
# the others hold the catalog for one statement or one chunk at a time.
SHORT_TURN_WAIT_S = 120.0
# While `curator serve` runs it owns its workspace: WS/server.json names it (url, pid, a random id) and
# it holds an advisory lock on WS/server.lock for as long as it lives. It and its job workers carry the
# id in this variable and may write. The lock, not the pid, says whether the server is alive: the kernel
# drops it when the process dies, while a pid can be reused by another program.
SERVER_FILE = "server.json"
SERVER_LOCK = "server.lock"
SERVER_ID_ENV = "CURATOR_SERVER_ID"
# Held by an ingest for its whole run (it writes chunk by chunk, letting others read in between): a
# second ingest is refused, and an incomplete batch is discarded only when no ingest holds it.
INGEST_LOCK = "ingest.lock"


class FileLock:
    """An exclusive advisory lock (flock) on a file, released on release() or when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def acquire(self, wait: float = 1.0) -> bool:
        """Take the lock, trying for up to `wait` seconds; False when another process (or another
        FileLock) holds it all that time. The retries matter: lock_is_held() takes the lock for an
        instant to test it, and a request landing in that instant must not be refused."""
        import fcntl

        handle = open(self.path, "a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    return False
                time.sleep(0.005)
                continue
            self._file = handle
            return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()          # closing the file drops the lock
            self._file = None


def lock_is_held(path: Path) -> bool:
    """Whether some live FileLock holds `path` (this process's own included)."""
    if not path.exists():
        return False
    probe = FileLock(path)
    if probe.acquire(wait=0.05):        # a holder holds it throughout; another probe only for an instant
        probe.release()
        return False
    return True


class Catalog:
    """A connection to a workspace's catalog. Use as a context manager."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, write: bool):
        self.con = con
        self.path = path
        self.write = write

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(
        cls,
        workspace: Workspace,
        *,
        write: bool = False,
        migrations: Sequence[Migration] = MIGRATIONS,
        hold: bool = True,
        wait: float | None = None,
    ) -> Catalog:
        """`hold=False` (reading only): a catalog that opens a connection for each statement, so that a
        long pass never keeps writers out for more than one statement. `wait`: seconds to wait for a
        catalog another process holds (default: CURATOR_LOCK_WAIT, else none)."""
        if not hold:
            if write:
                raise ValueError("a catalog opened for writing holds its connection")
            cls.open(workspace, migrations=migrations, wait=wait).close()       # migrate and check, once
            return ShortReads(workspace, workspace.catalog_path, migrations,
                              SHORT_TURN_WAIT_S if wait is None else wait)
        path = workspace.catalog_path
        if not write and not path.exists():
            raise WorkspaceError(f"no catalog at {path}; create it with `curator init {workspace.root}`")
        server = _server_holding(workspace) if write else None
        if server:
            raise CatalogLockedError(f"the catalog {path} belongs to {server}")
        if wait is None:
            wait = float(os.environ.get(LOCK_WAIT_ENV) or 0)
        started = time.monotonic()
        deadline, told = started + wait, False
        while True:
            try:
                con = duckdb.connect(str(path), read_only=not write, config={
                    "memory_limit": os.environ.get(MEMORY_LIMIT_ENV, DEFAULT_MEMORY_LIMIT)})
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise WorkspaceError(f"cannot open the catalog {path}: {exc}") from None
                if time.monotonic() < deadline:
                    if not told and time.monotonic() > started + 10:
                        told = True
                        print(f"waiting for the catalog {path}: another process holds it", file=sys.stderr,
                              flush=True)
                    time.sleep(0.05)
                    continue
                held = _server_holding(workspace, anyone=True)
                who = f"{held}, which is" if held else "another curator process that is"
                raise CatalogLockedError(
                    f"the catalog {path} is in use by {who} writing to it "
                    f"(DuckDB allows one writer at a time). Wait for it to finish and try again.\n"
                    f"  DuckDB said: {str(exc).splitlines()[0]}"
                ) from None
        catalog = cls(con, path, write)
        try:
            if write:
                catalog._migrate(migrations)
                if not lock_is_held(workspace.root / INGEST_LOCK):
                    catalog.discard_incomplete_batches()
            elif catalog.schema_version() < migrations[-1].version:
                # An older catalog: migrate it once (migrations only add), then read.
                con.close()
                cls.open(workspace, write=True, migrations=migrations).close()
                return cls.open(workspace, migrations=migrations)
            else:
                catalog._check_version(migrations[-1].version)
        except BaseException:
            con.close()
            raise
        return catalog

    def sql(self, query: str, params: list | None = None) -> list[tuple]:
        """Run one statement and fetch its whole result (DuckDB refuses new work
        on a connection while a result is left unread)."""
        return self.con.execute(query, params or []).fetchall()

    def one(self, query: str, params: list | None = None) -> tuple | None:
        rows = self.sql(query, params)
        return rows[0] if rows else None

    def frame(self, query: str, params: list | None = None):
        """A query's result as a polars DataFrame."""
        import polars as pl

        cursor = self.con.execute(query, params or [])
        names = [d[0] for d in cursor.description]
        return pl.DataFrame(cursor.fetchall(), schema=names, orient="row", infer_schema_length=None)

    def insert_arrow(self, table_name: str, rows, *, replace: bool = False) -> None:
        """Insert an Arrow table whose columns are named and ordered as the catalog table's."""
        self.con.register("arrow_rows", rows)
        try:
            verb = "INSERT OR REPLACE" if replace else "INSERT"
            self.sql(f"{verb} INTO {table_name} ({', '.join(rows.column_names)}) SELECT * FROM arrow_rows")
        finally:
            self.con.unregister("arrow_rows")

    def cursor(self) -> Catalog:
        """A read-only catalog on a new connection to the same database, for another thread (a DuckDB
        connection runs one statement at a time). Close it (or use it as a context manager)."""
        return Catalog(self.con.cursor(), self.path, write=False)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema ----------------------------------------------------------------
    def schema_version(self) -> int:
        exists = self.one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        )[0]
        if not exists:
            return 0
        return self.one("SELECT coalesce(max(version), 0) FROM schema_version")[0]

    def _check_version(self, latest: int) -> None:
        version = self.schema_version()
        if version > latest:
            raise SchemaError(
                f"the catalog {self.path} has schema version {version}, newer than this curator "
                f"understands ({latest}); upgrade curator."
            )
        if version < latest:
            raise SchemaError(
                f"the catalog {self.path} has schema version {version} and needs migrating to "
                f"{latest}; run any writing command (e.g. `curator init {self.path.parent}`)."
            )

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        latest = migrations[-1].version
        version = self.schema_version()
        if version > latest:
            self._check_version(latest)
        pending = [m for m in migrations if m.version > version]
        if not pending:
            return
        self.sql("BEGIN")
        try:
            self.sql(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, description VARCHAR,"
                " applied_at TIMESTAMP DEFAULT current_timestamp)"
            )
            for migration in pending:
                self.sql(migration.sql)
                self.sql(
                    "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                    [migration.version, migration.description],
                )
            self.sql("COMMIT")
        except BaseException:
            self.sql("ROLLBACK")
            raise

    # -- recovery --------------------------------------------------------------
    def discard_incomplete_batches(self) -> None:
        """Delete what an ingest that never completed left behind.

        Called when no ingest holds WS/ingest.lock (and by an ingest that has just taken it): a batch
        still marked 'running' then belongs to a process that died.
        """
        self.sql("BEGIN")
        self.sql(
            "DELETE FROM document_rows WHERE batch_id IN "
            "(SELECT id FROM ingest_batches WHERE status <> 'complete')"
        )
        self.sql("DELETE FROM ingest_batches WHERE status <> 'complete'")
        self.sql("COMMIT")


def _server_holding(workspace: Workspace, *, anyone: bool = False) -> str | None:
    """'the curator server at URL (pid N)' when a live server owns this workspace and this process is
    not it nor one of its workers (`anyone`: whoever this process is)."""
    try:
        info = json.loads((workspace.root / SERVER_FILE).read_text())
        server_id, pid = str(info["id"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not lock_is_held(workspace.root / SERVER_LOCK):
        return None         # a server killed without cleaning up leaves its file, never its lock
    if not anyone and os.environ.get(SERVER_ID_ENV) == server_id:
        return None
    return (f"the curator server at {info.get('url')} (pid {pid}, {workspace.root / SERVER_FILE}); while it "
            f"runs, submit work to it (`curator --server {info.get('url')} ...`, docs/service.md) or stop it")


class ShortReads(Catalog):
    """A read-only catalog that holds no connection: each statement opens one, runs, fetches and closes
    it, waiting its turn while another process writes. Statements that need a connection held across
    calls (registered tables) take a held catalog."""

    def __init__(self, workspace: Workspace, path: Path, migrations: Sequence[Migration], wait: float):
        self.path, self.write = path, False
        self.workspace, self.migrations, self.wait = workspace, migrations, wait

    @property
    def con(self):
        raise RuntimeError("a catalog opened with hold=False has no connection to use across statements; "
                           "open one that holds it")

    def sql(self, query: str, params: list | None = None) -> list[tuple]:
        with Catalog.open(self.workspace, migrations=self.migrations, wait=self.wait) as catalog:
            return catalog.sql(query, params)

    def frame(self, query: str, params: list | None = None):
        with Catalog.open(self.workspace, migrations=self.migrations, wait=self.wait) as catalog:
            return catalog.frame(query, params)

    def close(self) -> None:
        pass


def create_workspace(root: str | os.PathLike) -> tuple[Workspace, bool]:
    """Create a workspace (or complete an existing one): its folders and its catalog, created or migrated.
    Returns it and whether the catalog was created just now."""
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"cannot create a workspace at {root}: it is a file")
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root)
    created = not ws.catalog_path.exists()
    for name in ARTIFACT_DIRS:
        (root / name).mkdir(exist_ok=True)
    # Opening for writing creates the schema or migrates an older one.
    Catalog.open(ws, write=True).close()
    return ws, created
