"""Processes taking turns at the catalog: passes and ingests that hold it a statement or a chunk at a
time, one ingest per workspace, a server's claim that dies with it, and jobs that redo their write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import polars as pl
import pytest
from helpers import catalog_rows, plant_run, run_ingest, write_jsonl

from curator.catalog.database import (INGEST_LOCK, SERVER_FILE, SERVER_ID_ENV, SERVER_LOCK, Catalog, FileLock,
                                      lock_is_held)
from curator.catalog.ingest import IngestOptions, ingest
from curator.catalog.queries import Query, store_queries
from curator.catalog.records import store_token_counts
from curator.curate.export import ExportSpec, export
from curator.curate.mix import MixSpec, mix
from curator.curate.rank import RankConfig, rank
from curator.errors import CatalogLockedError
from curator.service.worker import _left_by_earlier_attempt


def test_a_pass_catalog_holds_no_connection_between_statements(ws, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    run_ingest(ws, [tmp_path / "a.jsonl"], source="a")
    reader = Catalog.open(ws, hold=False)
    assert reader.one("SELECT count(*) FROM documents")[0] == 3
    # A writer gets in between two of the pass's statements (a held read connection would keep it out).
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"other {i}"} for i in range(2)])
    run_ingest(ws, [tmp_path / "b.jsonl"], source="b")
    assert reader.one("SELECT count(*) FROM documents")[0] == 5
    with pytest.raises(RuntimeError, match="hold"):
        reader.con.register("x", None)


def test_a_held_ingest_lock_refuses_a_second_ingest_and_protects_its_batch(ws, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    with Catalog.open(ws, write=True) as catalog:     # what an ingest killed mid-way leaves
        catalog.sql("INSERT INTO ingest_batches (id, source, status, fingerprint, inputs, options, started_at) "
                    "VALUES (7, 'x', 'running', 'f', '[]', '{}', current_timestamp)")
    lock = FileLock(ws.root / INGEST_LOCK)
    assert lock.acquire() and lock_is_held(ws.root / INGEST_LOCK)
    try:
        with pytest.raises(CatalogLockedError, match="another ingest"):
            ingest(ws, [str(tmp_path / "a.jsonl")], IngestOptions(source="a"))
        Catalog.open(ws, write=True).close()        # a writer leaves a live ingest's batch alone
        assert catalog_rows(ws, "SELECT id FROM ingest_batches") == [(7,)]
    finally:
        lock.release()
    summary = ingest(ws, [str(tmp_path / "a.jsonl")], IngestOptions(source="a"))
    assert summary.inserted == 3
    # The next ingest takes the lock, so batch 7 is a dead one's: discarded before the new batch starts.
    assert catalog_rows(ws, "SELECT id, status FROM ingest_batches") == [(1, "complete")]


# Another process reads the catalog in a loop until told to stop (DuckDB allows one process to write or
# several to read; within a process every connection must share one configuration).
READER = """
import sys, time
from pathlib import Path
from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
ws, stop, out = Workspace(Path(sys.argv[1])), Path(sys.argv[2]), open(sys.argv[3], "w", buffering=1)
while not stop.exists():
    try:
        with Catalog.open(ws, wait=30) as catalog:
            out.write(f"{catalog.one('SELECT count(*) FROM documents')[0]}\\n")
    except Exception as exc:
        out.write(f"failed: {exc!r}\\n")
    time.sleep(0.02)
"""


def test_reads_take_turns_with_an_ingest_that_writes_chunk_by_chunk(ws, tmp_path):
    write_jsonl(tmp_path / "big.jsonl", [{"text": f"document number {i} " * 20} for i in range(60_000)])
    write_jsonl(tmp_path / "small.jsonl", [{"text": "one"}])
    run_ingest(ws, [tmp_path / "small.jsonl"], source="small")
    stop, log = tmp_path / "stop", tmp_path / "reads.txt"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(ws.root), str(stop), str(log)])
    try:
        while not log.exists() or not log.read_text():
            time.sleep(0.05)
        before = len(log.read_text().splitlines())
        summary = ingest(ws, [str(tmp_path / "big.jsonl")], IngestOptions(source="big", chunk_docs=5_000))
        during = log.read_text().splitlines()[before:]
    finally:
        stop.touch()
        reader.wait(60)
    assert summary.inserted == 60_000
    assert not [line for line in during if line.startswith("failed")], during
    # Reads went on during the ingest and never saw its half-written batch.
    assert len(during) >= 5 and set(during[:-1]) == {"1"}, sorted(set(during))


def test_a_server_claim_is_its_lock_not_its_pid(ws, monkeypatch):
    monkeypatch.delenv(SERVER_ID_ENV, raising=False)
    # A server that died left its file; its pid now belongs to another live process (here: this one).
    (ws.root / SERVER_FILE).write_text(json.dumps({"pid": os.getpid(), "url": "http://x", "id": "dead"}))
    Catalog.open(ws, write=True).close()
    lock = FileLock(ws.root / SERVER_LOCK)
    assert lock.acquire()
    try:
        with pytest.raises(CatalogLockedError, match="http://x"):
            Catalog.open(ws, write=True)
        monkeypatch.setenv(SERVER_ID_ENV, "dead")      # its workers carry its id and may write
        Catalog.open(ws, write=True).close()
    finally:
        lock.release()


def test_a_resumed_rank_mix_or_export_redoes_only_its_own_write(ws, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} " + "x" * i} for i in range(8)])
    run_ingest(ws, [tmp_path / "docs.jsonl"], source="web")
    with Catalog.open(ws, write=True) as catalog:
        ids = [r[0] for r in catalog.sql("SELECT id FROM documents ORDER BY id")]
        store_token_counts(catalog, "tok", {doc_id: 10 for doc_id in ids})
        store_queries(catalog, [Query(id="arithmetic-0", task="arithmetic", prompt="p", completion="c")])
    plant_run(ws, tmp_path, pl.DataFrame({"query_id": ["arithmetic-0"] * len(ids), "doc_id": ids,
                                          "score": [float(i) for i in ids]}), {"arithmetic-0": 1.0}, tokenizer="tok")
    config = RankConfig(name="r")
    assert not _left_by_earlier_attempt(ws, "rank", {"config": config.model_dump()})
    rank(ws, config)
    assert _left_by_earlier_attempt(ws, "rank", {"config": config.model_dump()})
    other = config.model_copy(update={"aggregate": "max"})
    assert not _left_by_earlier_attempt(ws, "rank", {"config": other.model_dump()})

    spec = MixSpec(name="m", ranking="r", budget_tokens=40)
    mix(ws, spec)
    assert _left_by_earlier_attempt(ws, "mix", {"spec": spec.model_dump()})
    assert not _left_by_earlier_attempt(ws, "mix", {"spec": {**spec.model_dump(), "budget_tokens": 50}})

    out = tmp_path / "out"
    params = {"mixture": "m", "out": str(out), "format": "parquet"}
    assert not _left_by_earlier_attempt(ws, "export", params)
    export(ws, ExportSpec(mixture="m", out=out))
    assert _left_by_earlier_attempt(ws, "export", params)
    assert not _left_by_earlier_attempt(ws, "export", {**params, "format": "jsonl.zst"})
    (out / "mine.txt").write_text("a user's file")      # not an export any more: never replaced
    assert not _left_by_earlier_attempt(ws, "export", params)
