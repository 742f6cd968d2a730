"""The server's catalog access: short connections, taking turns.

DuckDB lets one process write, or several read, at a time, and within one process every connection
to a file must share one configuration (read-only or not). The server therefore holds no connection
between requests. In this process a readers-writer gate lets many readers (routes, searches, the
library functions they call) in together and a writer (job rows) alone. Across processes, a job's
worker and the server take turns through DuckDB's file lock: the server's reads retry for a few
seconds; its job-row writes never wait (they are journaled and flushed later, see jobs.py); the
worker waits for the lock (CURATOR_LOCK_WAIT), since the server's reads last milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.errors import CatalogLockedError
from curator.service.errors import ApiError

T = TypeVar("T")
# A read waits this long for another process's write (an ingest chunk, a job's records, a rank's rows)
# before answering 503: a late answer is better than none.
READ_WAIT_S = 30.0


class Gate:
    """A readers-writer lock (writers do not starve: a waiting writer stops new readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class ServerCatalog:
    """The workspace as the server sees it."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.gate = Gate()
        self.busy_reason: Callable[[], str] = lambda: "a job is writing it"

    def reading(self, work: Callable[[], T]) -> T:
        """Run `work` (which may open the catalog read-only, itself or through the library), retrying
        while another process holds the write lock; a 503 if it stays locked."""
        deadline = time.monotonic() + READ_WAIT_S
        while True:
            try:
                with self.gate.read():
                    return work()
            except CatalogLockedError:
                if time.monotonic() > deadline:
                    raise ApiError(503, None, f"the catalog is busy ({self.busy_reason()}); try again shortly")
                time.sleep(0.1)

    def read(self, work: Callable[[Catalog], T]) -> T:
        def opened() -> T:
            with Catalog.open(self.ws) as catalog:
                return work(catalog)
        return self.reading(opened)

    def try_write(self, work: Callable[[Catalog], T]) -> tuple[bool, T | None]:
        """Run `work` on a write connection if the catalog is free now: (done, result)."""
        with self.gate.write():
            try:
                with Catalog.open(self.ws, write=True) as catalog:
                    return True, work(catalog)
            except CatalogLockedError:
                return False, None
