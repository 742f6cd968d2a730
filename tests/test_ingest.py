"""Batches: deduplication, idempotent re-ingest, and atomicity under failure and kill."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import catalog_rows, run_ingest, snapshot, write_jsonl

from curator.catalog.database import Catalog
from curator.catalog.ingest import IngestOptions, content_hash, ingest
from curator.catalog.schema import LATEST_VERSION, MIGRATIONS
from curator.catalog.workspace import Workspace


def test_normalised_hash_ignores_line_endings_outer_space_and_unicode_form():
    assert content_hash("a\r\nb\n") == content_hash("  a\nb")
    assert content_hash("caf\u00e9") == content_hash("cafe\u0301")
    assert content_hash("a b") != content_hash("a  b")  # inner whitespace matters (code indentation)


def test_duplicates_are_stored_once_and_counted(ws, tmp_path):
    records = [{"text": "same"}, {"text": "same\r\n"}, {"text": "other"}, {"text": " same "}]
    summary = run_ingest(ws, [write_jsonl(tmp_path / "a.jsonl", records)], source="a")
    assert (summary.inserted, summary.duplicates) == (2, 2)
    # Across batches and sources: the first copy read is the one kept.
    summary = run_ingest(ws, [write_jsonl(tmp_path / "b.jsonl", [{"text": "other"}, {"text": "new"}])], source="b")
    assert (summary.inserted, summary.duplicates) == (1, 1)
    assert catalog_rows(ws, "SELECT id, source, text FROM documents ORDER BY id") == [
        (1, "a", "same"), (2, "a", "other"), (3, "b", "new")]


def test_duplicates_across_chunk_boundaries(ws, tmp_path):
    records = [{"text": f"doc {i % 7}"} for i in range(100)]
    summary = run_ingest(ws, [write_jsonl(tmp_path / "a.jsonl", records)], chunk_docs=3)
    assert (summary.inserted, summary.duplicates) == (7, 93)
    assert catalog_rows(ws, "SELECT list(id ORDER BY id) FROM documents") == [(list(range(1, 8)),)]


def test_duplicates_across_files_of_one_ingest_keep_the_first_file_s_copy(ws, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "shared"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "shared\r\n"}, {"text": "z"}, {"text": "x"}])
    summary = run_ingest(ws, [a, b])
    assert (summary.inserted, summary.duplicates) == (3, 2)
    assert catalog_rows(ws, "SELECT id, text, origin FROM documents ORDER BY id") == [
        (1, "x", f"{a}:1"), (2, "shared", f"{a}:2"), (3, "z", f"{b}:2")]


def test_every_stored_key_is_its_hash_as_an_integer_and_unique(ws, tmp_path):
    """The duplicate check compares content_key; it must say exactly what content_hash says."""
    texts = [f"document {i} caf\u00e9" for i in range(300)]
    run_ingest(ws, [write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])], chunk_docs=7)
    run_ingest(ws, [write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[::-1] + ["new"]])], source="b")
    rows = catalog_rows(ws, "SELECT content_hash, content_key FROM document_rows")
    assert len(rows) == 301 and len({key for _, key in rows}) == 301
    assert all(key == int(digest, 16) for digest, key in rows)
    assert max(key for _, key in rows) >= 1 << 127  # the top bit survives: keys are unsigned


def test_reingesting_unchanged_input_is_a_no_op_that_says_so(ws, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    first = run_ingest(ws, [path])
    before = snapshot(ws)
    again = run_ingest(ws, [path])
    assert again.status == "unchanged" and again.batch_id == first.batch_id
    assert snapshot(ws) == before
    # The same content under another name is read, and everything is a duplicate.
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    third = run_ingest(ws, [copy])
    assert (third.status, third.inserted, third.duplicates) == ("complete", 0, 2)
    # A changed file is read again.
    with open(path, "a") as f:
        f.write('{"text": "three"}\n')
    assert run_ingest(ws, [path]).inserted == 1


class _FailAfter:
    def __init__(self, records: int):
        self.records = records

    def start(self, total_bytes: int, files: int) -> None:
        pass

    def update(self, records: int, bytes_done: int) -> None:
        if records >= self.records:
            raise RuntimeError("disk on fire")


def test_a_failure_mid_stream_leaves_no_partial_batch(ws, tmp_path):
    run_ingest(ws, [write_jsonl(tmp_path / "first.jsonl", [{"text": "kept"}])], source="first")
    before = snapshot(ws)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i}"} for i in range(5000)])
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest(ws, [str(path)], IngestOptions(source="second", chunk_docs=100), progress=_FailAfter(3000))
    assert snapshot(ws) == before
    # ...and the next ingest of the same input starts from scratch and completes.
    summary = run_ingest(ws, [path], source="second", chunk_docs=100)
    assert summary.inserted == 5000
    assert catalog_rows(ws, "SELECT min(id), max(id) FROM documents WHERE source = 'second'") == [(2, 5001)]


def test_a_killed_ingest_is_invisible_and_cleaned_up_on_the_next_run(ws, tmp_path):
    run_ingest(ws, [write_jsonl(tmp_path / "first.jsonl", [{"text": "kept"}])], source="first")
    before = snapshot(ws)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i}"} for i in range(5000)])
    # A real SIGKILL, after several chunks have been committed.
    script = textwrap.dedent(f"""
        import os, signal
        from curator.catalog.ingest import IngestOptions, ingest
        from curator.catalog.workspace import Workspace
        from curator.catalog.database import create_workspace

        class KillAfter:
            def start(self, total_bytes, files): pass
            def update(self, records, bytes_done):
                if records >= 3000:
                    os.kill(os.getpid(), signal.SIGKILL)

        ingest(Workspace.locate({str(ws.root)!r}), [{str(path)!r}],
               IngestOptions(source="second", chunk_docs=100), progress=KillAfter())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    with Catalog.open(ws) as catalog:  # read-only: no recovery runs
        left_behind = catalog.one("SELECT count(*) FROM document_rows WHERE source = 'second'")[0]
        visible = catalog.one("SELECT count(*) FROM documents WHERE source = 'second'")[0]
    assert left_behind >= 2000 and visible == 0
    # The next writer removes the remains; the catalog is as it was.
    Catalog.open(ws, write=True).close()
    assert snapshot(ws) == before
    assert run_ingest(ws, [path], source="second").inserted == 5000


def test_interrupted_batches_do_not_block_reingest_of_the_same_input(ws, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(2000)])
    with pytest.raises(RuntimeError):
        ingest(ws, [str(path)], IngestOptions(source="s", chunk_docs=100), progress=_FailAfter(1000))
    assert run_ingest(ws, [path], source="s").status == "complete"


def test_source_kind_defaults_and_sticks(ws, tmp_path):
    run_ingest(ws, [write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])], source="maths", kind="math")
    run_ingest(ws, [write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])], source="maths")
    run_ingest(ws, [write_jsonl(tmp_path / "c.jsonl", [{"text": "c"}])], source="misc")
    assert catalog_rows(ws, "SELECT source, kind FROM documents ORDER BY id") == [
        ("maths", "math"), ("maths", "math"), ("misc", "other")]


def test_python_memory_does_not_grow_with_the_input(tmp_path):
    """Quadrupling the input leaves Python's peak allocation where it was: records
    are streamed in chunks, never gathered. (DuckDB's buffer cache is its own and
    capped by its memory limit; the benchmark reports whole-process RSS.)"""
    line = '{"text": "%s %%d"}\n' % ("lorem ipsum dolor sit amet " * 40)
    peaks = []
    for lines in (15_000, 60_000):
        path = tmp_path / f"in-{lines}.jsonl"
        with open(path, "w") as f:
            f.writelines(line % i for i in range(lines))
        script = textwrap.dedent(f"""
            import tracemalloc
            from curator.catalog.ingest import IngestOptions, ingest
            from curator.catalog.workspace import Workspace
            from curator.catalog.database import create_workspace
            ws, _ = create_workspace({str(tmp_path / f"ws-{lines}")!r})
            tracemalloc.start()
            s = ingest(ws, [{str(path)!r}], IngestOptions(source="big", chunk_docs=5000))
            assert s.inserted == {lines}, s
            print(tracemalloc.get_traced_memory()[1])
        """)
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        peaks.append(int(run.stdout))
    assert peaks[1] < 1.2 * peaks[0], f"peaks {peaks} grew with the input"


def _old_layout_catalog(root, texts: list[str]) -> Workspace:
    """A catalog as curator left it before content keys (schema 4), holding one complete batch."""
    root.mkdir()
    ws = Workspace(root)
    with Catalog.open(ws, write=True, migrations=MIGRATIONS[:4]) as catalog:
        catalog.sql("INSERT INTO ingest_batches (id, source, status, fingerprint, inputs, options, started_at) "
                    "VALUES (1, 'old', 'complete', 'f', '[]', '{}', current_timestamp)")
        catalog.sql("INSERT INTO sources (name, kind) VALUES ('old', 'web')")
        for i, text in enumerate(texts, start=1):
            catalog.sql("INSERT INTO document_rows (id, source, kind, origin, text, chars, bytes, content_hash, "
                        "batch_id) VALUES (?, 'old', 'web', ?, ?, ?, ?, ?, 1)",
                        [i, f"old.jsonl:{i}", text, len(text), len(text.encode()), content_hash(text)])
    return ws


def test_an_old_layout_catalog_is_migrated_and_its_documents_stay_duplicates(tmp_path):
    ws = _old_layout_catalog(tmp_path / "ws", ["kept from before", "caf\u00e9"])
    columns_before = catalog_rows(ws, "SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'documents' ORDER BY ordinal_position")
    path = write_jsonl(tmp_path / "new.jsonl", [{"text": "kept from before\n"}, {"text": "cafe\u0301"},
                                                 {"text": "new"}])
    summary = run_ingest(ws, [path], source="new")
    assert (summary.inserted, summary.duplicates) == (1, 2)
    assert catalog_rows(ws, "SELECT id, source, text FROM documents ORDER BY id") == [
        (1, "old", "kept from before"), (2, "old", "caf\u00e9"), (3, "new", "new")]
    with Catalog.open(ws) as catalog:
        assert catalog.schema_version() == LATEST_VERSION
        # Readers of the documents view see the columns they saw before.
        assert catalog.sql("SELECT column_name FROM information_schema.columns "
                           "WHERE table_name = 'documents' ORDER BY ordinal_position") == columns_before


def test_reading_an_old_layout_catalog_migrates_it(tmp_path):
    ws = _old_layout_catalog(tmp_path / "ws", ["a", "b"])
    with Catalog.open(ws) as catalog:  # read-only: migrated once, then opened for reading
        assert not catalog.write
        assert catalog.sql("SELECT id, content_key FROM document_rows ORDER BY id") == [
            (1, int(content_hash("a"), 16)), (2, int(content_hash("b"), 16))]
