"""Ingest: connectors' documents into the catalog, as one all-or-nothing batch.

One ``ingest`` call is one batch. Documents are committed in chunks so that
memory stays bounded on multi-GB inputs, but the ``documents`` view shows a
batch's rows only once the batch is marked complete; an aborted batch is deleted
at once, and one whose process was killed is deleted the next time the catalog
is opened for writing (see ``curator.schema``). So a failed ingest leaves the
catalog exactly as it was.

Exact duplicates are documents whose *normalised* text (Unicode NFC, CRLF → LF,
outer whitespace stripped) hashes the same; the first one read is kept, within
the input and across the whole catalog. Re-ingesting inputs whose files have not
changed (same paths, sizes, modification times, options) is recognised before
anything is read, and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Literal, Protocol

import orjson
import pyarrow as pa
from pydantic import BaseModel, Field

from curator.artifacts import NOT_IDENTITY, Settings
from curator.catalog.database import INGEST_LOCK, SHORT_TURN_WAIT_S, Catalog, FileLock
from curator.connectors import (
    BadRecord,
    ByteCounter,
    Format,
    InputFile,
    Kind,
    RawDocument,
    ReadSettings,
    plan_inputs,
    read_inputs,
)
from curator.errors import BadInputError, CatalogLockedError
from curator.catalog.workspace import Workspace

MAX_LISTED_PROBLEMS = 50


class IngestOptions(Settings):
    """Settings of one ingest; stored with its batch."""

    source: str = Field(min_length=1, description="Source label given to every document")
    kind: Kind | None = Field(None, description="Kind of every document; None infers it from file extensions")
    format: Format = Field("auto", description="Input format; auto decides per file from its name")
    text_field: str = Field("text", description="Field (dotted path allowed) holding the text")
    id_field: str | None = Field(None, description="Field holding the record's own id; default `id` when present")
    glob: str | None = Field(None, description="Only files whose path inside a directory matches")
    strict: bool = Field(False, description="Abort at the first bad record instead of skipping it",
                         json_schema_extra=NOT_IDENTITY)
    chunk_docs: int = Field(20_000, gt=0, description="Documents committed per chunk", json_schema_extra=NOT_IDENTITY)
    chunk_bytes: int = Field(64 << 20, gt=0, description="Text bytes committed per chunk",
                             json_schema_extra=NOT_IDENTITY)


class Problem(BaseModel):
    origin: str
    problem: str
    detail: str = ""


class IngestSummary(BaseModel):
    source: str
    status: Literal["complete", "unchanged"]
    batch_id: int
    files: int = 0
    records_read: int = 0
    inserted: int = 0
    duplicates: int = 0
    skipped: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problem_counts: dict[str, int] = {}
    problems: list[Problem] = []
    ingested_at: datetime | None = None

    @property
    def docs_per_second(self) -> float:
        return self.records_read / self.seconds if self.seconds > 0 else 0.0


class IngestProgress(Protocol):
    def start(self, total_bytes: int, files: int) -> None: ...
    def update(self, records: int, bytes_done: int) -> None: ...


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def content_hash(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).hexdigest()


def input_fingerprint(files: Sequence[InputFile], options: IngestOptions) -> str:
    described = {
        "options": options.identity(),
        "files": [[str(f.path.resolve()), f.size, f.mtime_ns] for f in files],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def ingest(
    workspace: Workspace,
    paths: Sequence[str],
    options: IngestOptions,
    progress: IngestProgress | None = None,
) -> IngestSummary:
    started = time.perf_counter()
    files, path_problems = plan_inputs(paths, options.format, options.glob)
    if path_problems and options.strict:
        raise _strict_error(path_problems[0])
    if not files:
        listed = "; ".join(f"{p.origin}: {p.reason}" for p in path_problems[:5])
        raise BadInputError(f"nothing to ingest: {listed}")
    fingerprint = input_fingerprint(files, options)

    with _one_ingest_at_a_time(workspace):
        with _turn(workspace) as catalog:
            catalog.discard_incomplete_batches()     # this process holds the ingest lock: they are a dead one's
            earlier = catalog.one(
                "SELECT id, finished_at FROM ingest_batches WHERE status = 'complete' AND fingerprint = ?",
                [fingerprint],
            )
            if earlier:
                return IngestSummary(source=options.source, status="unchanged", batch_id=earlier[0],
                                     files=len(files), ingested_at=earlier[1])

            batch_id = catalog.one("SELECT coalesce(max(id), 0) + 1 FROM ingest_batches")[0]
            catalog.sql(
                "INSERT INTO ingest_batches (id, source, status, fingerprint, inputs, options, started_at) "
                "VALUES (?, ?, 'running', ?, ?, ?, current_timestamp)",
                [batch_id, options.source, fingerprint, json.dumps([str(p) for p in paths]),
                 options.model_dump_json()],
            )
            source_kind = catalog.one("SELECT kind FROM sources WHERE name = ?", [options.source])
            next_id = catalog.one("SELECT coalesce(max(id), 0) FROM document_rows")[0]
        # From here on the catalog is opened for each chunk and closed after it, so that readers (and
        # `curator serve`'s searches) get their turn during a long ingest. The batch stays 'running', out
        # of the documents view, until it completes.
        writer = _ChunkWriter(workspace, batch_id, options.source, next_id)
        try:
            summary = _load_batch(writer, files, path_problems, options, progress,
                                  options.kind or (source_kind[0] if source_kind else "other"))
        except BaseException:
            with _turn(workspace) as catalog:
                _discard(catalog, batch_id)
            raise
        summary.seconds = time.perf_counter() - started
        with _turn(workspace) as catalog:
            _complete(catalog, batch_id, summary, options)
        return summary


@contextmanager
def _one_ingest_at_a_time(workspace: Workspace) -> Iterator[None]:
    """Hold WS/ingest.lock for the whole ingest: ids are allocated from the catalog's largest, so two
    ingests writing chunks in turns would collide; and other writers leave a 'running' batch alone
    while the lock is held."""
    lock = FileLock(workspace.root / INGEST_LOCK)
    if workspace.root.is_dir() and not lock.acquire():
        raise CatalogLockedError(f"another ingest is writing to {workspace.catalog_path} (one at a time per "
                                 f"workspace); wait for it to finish and run this one again")
    try:
        yield
    finally:
        lock.release()


READERS_TURN_S = 0.12


def _turn(workspace: Workspace) -> Catalog:
    """A write connection for one chunk or one final statement, waiting out others' short turns."""
    return Catalog.open(workspace, write=True, wait=SHORT_TURN_WAIT_S)


def _load_batch(
    writer: _ChunkWriter,
    files: list[InputFile],
    path_problems: list[BadRecord],
    options: IngestOptions,
    progress: IngestProgress | None,
    default_kind: str,
) -> IngestSummary:
    summary = IngestSummary(source=options.source, status="complete", batch_id=writer.batch_id, files=len(files))
    problems: Counter[str] = Counter()
    listed: list[Problem] = []

    def note(bad: BadRecord) -> None:
        if options.strict:
            raise _strict_error(bad)
        problems[bad.problem] += 1
        if len(listed) < MAX_LISTED_PROBLEMS:
            listed.append(Problem(origin=bad.origin, problem=bad.problem, detail=bad.detail))

    for bad in path_problems:
        note(bad)

    counter = ByteCounter()
    if progress:
        progress.start(sum(f.size for f in files), len(files))
    chunk = _Chunk()
    records = 0
    settings = ReadSettings(text_field=options.text_field, id_field=options.id_field)
    writer.start()
    try:
        for item in read_inputs(files, settings, counter):
            records += 1
            if isinstance(item, BadRecord):
                note(item)
            else:
                kind = options.kind or item.kind or default_kind
                bad = chunk.add(item, kind)
                if bad:
                    note(bad)
                if len(chunk) >= options.chunk_docs or chunk.text_bytes >= options.chunk_bytes:
                    writer.submit(chunk)
            if progress and records % 1000 == 0:
                progress.update(records, counter.done)
        writer.submit(chunk)
    except BaseException:
        # The connection must be idle before the batch is discarded; the first
        # failure is the one to report.
        writer.close(raise_error=False)
        raise
    writer.close()
    if progress:
        progress.update(records, counter.done)

    summary.inserted = writer.inserted
    summary.duplicates = writer.duplicates
    summary.records_read = records
    summary.bytes_read = counter.done
    summary.skipped = sum(problems.values())
    summary.problem_counts = dict(problems.most_common())
    summary.problems = listed
    return summary


class _Chunk:
    """Documents waiting to be written, as columns."""

    SCHEMA = pa.schema([("kind", pa.string()), ("external_id", pa.string()), ("origin", pa.string()),
                        ("text", pa.string()), ("chars", pa.int64()), ("bytes", pa.int64()),
                        ("content_hash", pa.string()), ("metadata", pa.string())])

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in self.SCHEMA.names}
        self.text_bytes = 0

    def __len__(self) -> int:
        return len(self.columns["text"])

    def add(self, doc: RawDocument, kind: str) -> BadRecord | None:
        try:
            size = len(doc.text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return BadRecord(doc.origin, "invalid Unicode",
                             f"unpaired surrogate {doc.text[exc.start]!r} at character {exc.start}")
        columns = self.columns
        columns["kind"].append(kind)
        columns["external_id"].append(doc.external_id)
        columns["origin"].append(doc.origin)
        columns["text"].append(doc.text)
        columns["chars"].append(len(doc.text))
        columns["bytes"].append(size)
        columns["content_hash"].append(content_hash(doc.text))
        columns["metadata"].append(_metadata_json(doc.metadata))
        self.text_bytes += size
        return None

    def to_arrow(self) -> pa.Table:
        table = pa.table(self.columns, schema=self.SCHEMA)
        return table.append_column("seq", pa.array(range(len(self)), pa.int64()))


# Rows whose content is already in the catalog (this batch's earlier chunks
# included) are dropped, then the first of each content within the chunk is
# kept. The check compares content_key, the hash as a 128-bit integer: DuckDB
# builds its hash table on the chunk and streams the stored keys past it, which
# costs a few nanoseconds per stored document.
_INSERT_NEW = """
INSERT INTO document_rows
    (id, source, kind, external_id, origin, text, chars, bytes, content_hash, content_key, metadata, batch_id)
SELECT ? + row_number() OVER (ORDER BY seq), ?, kind, external_id, origin, text, chars, bytes,
       content_hash, content_key, metadata::JSON, ?
FROM (
    SELECT * FROM (SELECT *, ('0x' || content_hash)::UHUGEINT AS content_key FROM staging) s
    WHERE NOT EXISTS (SELECT 1 FROM document_rows d WHERE d.content_key = s.content_key)
    QUALIFY row_number() OVER (PARTITION BY content_key ORDER BY seq) = 1
)
"""


class _ChunkWriter:
    """Inserts chunks on a background thread, so that DuckDB's work (which
    releases the GIL) overlaps the parsing of the next chunk. At most one chunk
    waits in the queue, which keeps memory bounded."""

    def __init__(self, workspace: Workspace, batch_id: int, source: str, next_id: int):
        self.workspace, self.batch_id, self.source, self.next_id = workspace, batch_id, source, next_id
        self.inserted = self.duplicates = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue[pa.Table | None] = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name="curator-ingest-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, chunk: _Chunk) -> None:
        if len(chunk):
            table = chunk.to_arrow()
            chunk.clear()
            while True:
                self._raise_if_failed()
                try:
                    self.queue.put(table, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def close(self, raise_error: bool = True) -> None:
        """Wait for every submitted chunk to be written; re-raise a writer failure."""
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (table := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread will see the error
            try:
                self._insert(table)
            except BaseException as exc:  # handed to the main thread
                self.error = exc

    def _insert(self, table: pa.Table) -> None:
        with _turn(self.workspace) as catalog:
            catalog.con.register("staging", table)
            inserted = catalog.one(_INSERT_NEW, [self.next_id, self.source, self.batch_id])[0]
        self.inserted += inserted
        self.duplicates += table.num_rows - inserted
        self.next_id += inserted
        # A turn for the readers: they retry every 50 ms, and a writer that reopened at once (the next
        # chunk already parsed) would keep them out for the whole ingest. This thread only writes, so
        # the pause costs nothing while parsing is the slower side, as it is for real corpora.
        time.sleep(READERS_TURN_S)


def _complete(catalog: Catalog, batch_id: int, summary: IngestSummary, options: IngestOptions) -> None:
    catalog.sql("BEGIN")
    if not catalog.one("SELECT 1 FROM sources WHERE name = ?", [options.source]):
        common = catalog.one(
            "SELECT kind FROM document_rows WHERE batch_id = ? GROUP BY kind ORDER BY count(*) DESC, kind LIMIT 1",
            [batch_id],
        )
        kind = options.kind or (common[0] if common else "other")
        catalog.sql("INSERT INTO sources (name, kind) VALUES (?, ?)", [options.source, kind])
    catalog.sql(
        "UPDATE ingest_batches SET status = 'complete', finished_at = current_timestamp, "
        "records_read = ?, inserted = ?, duplicates = ?, skipped = ?, bytes_read = ?, problems = ? "
        "WHERE id = ?",
        [summary.records_read, summary.inserted, summary.duplicates, summary.skipped, summary.bytes_read,
         json.dumps({"counts": summary.problem_counts,
                     "first": [p.model_dump() for p in summary.problems]}), batch_id],
    )
    catalog.sql("COMMIT")


def _discard(catalog: Catalog, batch_id: int) -> None:
    catalog.sql("DELETE FROM document_rows WHERE batch_id = ?", [batch_id])
    catalog.sql("DELETE FROM ingest_batches WHERE id = ?", [batch_id])


def _strict_error(bad: BadRecord) -> BadInputError:
    return BadInputError(f"{bad.origin}: {bad.reason} (--strict: nothing from this ingest was kept)")


def _metadata_json(metadata: dict | None) -> str | None:
    if not metadata:
        return None
    try:
        return orjson.dumps(metadata, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # e.g. a lone surrogate in a string from Parquet: escape it
        return json.dumps(metadata, ensure_ascii=True, default=str)
