"""The `curator` command as a user runs it: a real process, a real workspace."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CURATOR, curator, write_jsonl

@pytest.fixture
def cli_ws(tmp_path):
    ws = tmp_path / "ws"
    out = curator("init", ws)
    assert "Created" in out.stdout
    return ws


def test_the_console_script_is_installed():
    assert Path(CURATOR).is_file(), f"no curator command at {CURATOR}: is the package installed?"


def test_help_teaches_and_imports_no_heavy_library():
    out = curator("ingest", "--help").stdout
    for flag in ("--source", "--kind", "--input-format", "--text-field", "--id-field", "--glob", "--strict", "--workspace"):
        assert flag in out
    probe = subprocess.run([sys.executable, "-c", "import sys; import curator.cli.app; "
                            "print(sorted(m for m in ('duckdb', 'polars', 'pyarrow') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"


def test_ingest_then_sources_docs_show_and_sample(cli_ws, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "text": f"question {i}?"} for i in range(4)])
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{oops\n')
    out = curator("ingest", data, tmp_path / "bad.jsonl", "--source", "trivia-qa", "--kind", "qa", "-w", cli_ws)
    assert "5 new documents" in out.stdout and "1 skipped" in out.stdout
    assert f"{tmp_path}/bad.jsonl:2: malformed JSON" in out.stderr

    again = curator("ingest", data, tmp_path / "bad.jsonl", "--source", "trivia-qa", "--kind", "qa", "-w", cli_ws)
    assert "Nothing to do" in again.stdout and "batch 1" in again.stdout

    rows = json.loads(curator("sources", "--output", "json", "-w", cli_ws).stdout)
    assert rows == [{"source": "trivia-qa", "kind": "qa", "documents": 5, "chars": 48, "bytes": 48, "tokens": None,
                     "docs_share": 1.0, "chars_share": 1.0}]
    table = curator("sources", "-w", cli_ws).stdout
    assert "trivia-qa" in table and "100.0%" in table and "total" in table
    parsed = list(csv.DictReader(io.StringIO(curator("sources", "-o", "csv", "-w", cli_ws).stdout)))
    assert parsed[0]["documents"] == "5"

    shown = curator("docs", "show", "2", "-w", cli_ws).stdout
    assert "question 1?" in shown and "external id q1" in shown and "source trivia-qa" in shown
    first = curator("docs", "sample", "--source", "trivia-qa", "-n", "2", "--seed", "3", "-w", cli_ws).stdout
    assert first.count("document ") == 2
    assert first == curator("docs", "sample", "--source", "trivia-qa", "-n", "2", "--seed", "3", "-w", cli_ws).stdout


def test_workspace_from_environment_and_cwd(cli_ws, tmp_path):
    assert "no documents" in curator("sources", env={"CURATOR_WORKSPACE": str(cli_ws)}).stdout
    assert "no documents" in curator("sources", cwd=cli_ws).stdout


def test_errors_are_one_clear_line_and_exit_nonzero(cli_ws, tmp_path):
    outside = curator("sources", cwd=tmp_path, check=False)
    assert outside.returncode == 1
    assert "is not a curator workspace" in outside.stderr and "Traceback" not in outside.stderr
    missing = curator("docs", "show", "7", "-w", cli_ws, check=False)
    assert missing.returncode == 1 and "no document with id 7" in missing.stderr
    strict = curator("ingest", tmp_path / "absent.jsonl", "--source", "s", "--strict", "-w", cli_ws, check=False)
    assert strict.returncode == 1 and "absent.jsonl: missing path" in strict.stderr
    unknown = curator("docs", "sample", "--source", "nope", "-w", cli_ws, check=False)
    assert unknown.returncode == 1 and "no source 'nope'" in unknown.stderr
    bad_kind = curator("ingest", tmp_path, "--source", "s", "--kind", "poetry", "-w", cli_ws, check=False)
    assert bad_kind.returncode == 2 and "poetry" in bad_kind.stderr
