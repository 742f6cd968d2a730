"""Bad input is skipped and counted with file:line and reason, or aborts under --strict
leaving the catalog exactly as it was."""

from __future__ import annotations

import pytest
import zstandard
from helpers import catalog_rows, run_ingest, snapshot, write_jsonl

from curator.errors import BadInputError

GOOD = b'{"text": "good one"}\n'


def bad_jsonl(path):
    lines = [
        GOOD,                                   # 1
        b'{"text": "unterminated\n',            # 2 malformed JSON
        b'{"text": "caf\xe9"}\n',               # 3 latin-1 byte: not UTF-8
        b'{"body": "no text field"}\n',         # 4 missing field
        b'{"text": 42}\n',                      # 5 not a string
        b'{"text": null}\n',                    # 6 null
        b'{"text": "   "}\n',                   # 7 blank
        b'["a", "list"]\n',                     # 8 not an object
        b'\n',                                  # 9 blank line: not a record
        b'{"text": "\\ud800 lone surrogate"}\n',  # 10 a lone surrogate escape is not valid JSON text
        b'{"text": "good two"}\r\n',            # 11 CRLF line ending is fine
    ]
    path.write_bytes(b"".join(lines))
    return path


def test_each_bad_record_is_counted_and_located(ws, tmp_path):
    path = bad_jsonl(tmp_path / "bad.jsonl")
    summary = run_ingest(ws, [path])
    assert (summary.records_read, summary.inserted, summary.skipped) == (10, 2, 8)
    assert summary.problem_counts == {
        "malformed JSON": 2, "not valid UTF-8": 1, "missing text field": 2, "text field not a string": 1,
        "empty text": 1, "not a JSON object": 1,
    }
    located = {(p.origin, p.problem) for p in summary.problems}
    assert located == {
        (f"{path}:2", "malformed JSON"), (f"{path}:3", "not valid UTF-8"), (f"{path}:4", "missing text field"),
        (f"{path}:5", "text field not a string"), (f"{path}:6", "missing text field"),
        (f"{path}:7", "empty text"), (f"{path}:8", "not a JSON object"), (f"{path}:10", "malformed JSON"),
    }
    details = {p.origin: p.detail for p in summary.problems}
    assert details[f"{path}:3"] == "byte 0xe9 at column 14"
    assert details[f"{path}:5"] == "field 'text' is a number"
    assert catalog_rows(ws, "SELECT text FROM documents ORDER BY id") == [("good one",), ("good two",)]
    # The batch keeps the problems for later inspection.
    assert catalog_rows(ws, "SELECT skipped, problems->'$.counts'->>'malformed JSON' FROM ingest_batches") == [
        (8, "2")]


def test_missing_id_field_when_one_is_asked_for(ws, tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "key": "k1"}, {"text": "b"}])
    summary = run_ingest(ws, [path], id_field="key")
    assert (summary.inserted, summary.problem_counts) == (1, {"missing id field": 1})


def test_directory_with_empty_binary_and_non_utf8_files(ws, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "ok.py").write_text("x = 1\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.md").write_text("\n  \n")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "latin1.txt").write_bytes(b"line one\nna\xefve\n")
    (folder / "empty.jsonl").write_bytes(b"\n\n")
    summary = run_ingest(ws, [folder])
    assert summary.inserted == 1
    assert {(p.origin, p.problem) for p in summary.problems} == {
        (f"{folder}/empty.txt", "empty file"), (f"{folder}/blank.md", "empty file"),
        (f"{folder}/image.png", "binary file"), (f"{folder}/latin1.txt:2", "not valid UTF-8"),
        (f"{folder}/empty.jsonl", "empty file"),
    }


def test_missing_path_is_skipped_and_counted_beside_good_input(ws, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    summary = run_ingest(ws, [tmp_path / "nope.jsonl", good])
    assert (summary.inserted, summary.skipped) == (1, 1)
    assert summary.problems[0].origin == f"{tmp_path}/nope.jsonl"
    assert summary.problems[0].problem == "missing path"


def test_nothing_readable_at_all_is_an_error(ws, tmp_path):
    before = snapshot(ws)
    with pytest.raises(BadInputError, match="nothing to ingest: .*nope: missing path"):
        run_ingest(ws, [tmp_path / "nope"])
    assert snapshot(ws) == before


def test_truncated_zstd_stream_keeps_what_was_readable(ws, tmp_path):
    records = [{"text": f"row {i} " + "x" * 200} for i in range(2000)]
    data = zstandard.ZstdCompressor().compress("".join(f'{{"text": "{r["text"]}"}}\n' for r in records).encode())
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    summary = run_ingest(ws, [path])
    assert 0 < summary.inserted < 2000
    assert summary.problem_counts == {"unreadable file": 1}
    assert "truncated" in summary.problems[0].detail


def test_parquet_with_wrong_text_column_type(ws, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    summary = run_ingest(ws, [tmp_path / "ints.parquet", tmp_path / "nocol.parquet", tmp_path / "junk.parquet"])
    assert summary.problem_counts == {"text field not a string": 1, "missing text field": 1, "unreadable file": 1}
    assert {p.detail.split(" (")[0] for p in summary.problems} >= {"column 'text' has type int64",
                                                                  "no column 'text'"}


@pytest.mark.parametrize("which", ["malformed", "missing path"])
def test_strict_aborts_on_the_first_bad_record_and_changes_nothing(ws, tmp_path, which):
    run_ingest(ws, [write_jsonl(tmp_path / "first.jsonl", [{"text": "already here"}])], source="first")
    before = snapshot(ws)
    good = [{"text": f"doc {i}"} for i in range(500)]
    path = write_jsonl(tmp_path / "big.jsonl", good)
    if which == "malformed":
        with open(path, "ab") as f:
            f.write(b"{broken\n")
        paths, match = [path], rf"{path}:501: malformed JSON.*--strict"
    else:
        paths, match = [path, tmp_path / "absent"], "absent: missing path"
    with pytest.raises(BadInputError, match=match):
        run_ingest(ws, paths, source="second", strict=True, chunk_docs=50)
    assert snapshot(ws) == before


@pytest.mark.parametrize("device", ["", "gpu", "cuda:", "cuda:x", "cpu "])
def test_a_device_curator_does_not_run_on_is_refused_where_it_is_given(device, ws):
    """An empty or unknown device is refused by every settings model (the service answers 422) and by the
    CLI, instead of failing deep inside torch as an internal error."""
    from helpers import curator
    from pydantic import ValidationError

    from curator.evaluate.config import EvaluateConfig
    from curator.influence.fit import FitConfig
    from curator.influence.score import ScoreConfig
    from curator.sketch.search import SearchRequest
    from curator.sketch.store import SketchConfig

    for make in (lambda: FitConfig(model="m", device=device), lambda: ScoreConfig(queries="q", device=device),
                 lambda: SketchConfig(suite="q", device=device), lambda: SearchRequest(prompt="p", device=device),
                 lambda: EvaluateConfig(mixtures=["m"], device=device)):
        with pytest.raises(ValidationError, match="device"):
            make()
    out = curator("fit", "--device", device, "-w", ws.root, check=False)
    assert out.returncode == 2 and "is not a device curator runs on" in out.stderr
    assert FitConfig(model="m", device="cuda:1").device == "cuda:1" and SketchConfig(suite="q", device="cuda").device == "cuda"
