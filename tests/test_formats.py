"""Every input format, read from real files into a real catalog."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import catalog_rows, run_ingest, write_jsonl

RECORDS = [{"id": f"r{i}", "text": f"document number {i}", "lang": "en"} for i in range(5)]


@pytest.mark.parametrize("compression,name", [(None, "a.jsonl"), ("gzip", "a.jsonl.gz"), ("zstd", "a.jsonl.zst"),
                                              ("zstd", "a.json.zst"), ("gzip", "mislabelled.jsonl")])
def test_jsonl_plain_and_compressed(ws, tmp_path, compression, name):
    path = write_jsonl(tmp_path / name, RECORDS, compression)
    summary = run_ingest(ws, [path], source="web", kind="web")
    assert (summary.inserted, summary.skipped, summary.duplicates) == (5, 0, 0)
    rows = catalog_rows(ws, "SELECT id, source, kind, external_id, origin, text, chars, bytes, metadata "
                            "FROM documents ORDER BY id")
    assert [r[3] for r in rows] == [f"r{i}" for i in range(5)]
    assert rows[0][:3] == (1, "web", "web")
    assert rows[2][4] == f"{path}:3"
    assert rows[0][5] == "document number 0" and rows[0][6] == rows[0][7] == 17
    assert json.loads(rows[0][8]) == {"lang": "en"}


def test_jsonl_text_and_id_fields(ws, tmp_path):
    path = write_jsonl(tmp_path / "nested.jsonl", [{"doc": {"body": "nested text"}, "uid": 7, "n": 1}])
    run_ingest(ws, [path], text_field="doc.body", id_field="uid")
    assert catalog_rows(ws, "SELECT text, external_id FROM documents") == [("nested text", "7")]


def test_parquet_file_and_directory(ws, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(3):
        table = pa.table({"content": [f"parquet doc {part}-{i}" for i in range(4)],
                          "score": [float(i) for i in range(4)]})
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=2)
    single = run_ingest(ws, [folder / "part-0.parquet"], source="one", text_field="content")
    assert single.inserted == 4
    both = run_ingest(ws, [folder], source="all", text_field="content")
    # The file read first is already in the catalog: its four rows are duplicates.
    assert (both.records_read, both.inserted, both.duplicates) == (12, 8, 4)
    rows = catalog_rows(ws, "SELECT origin, metadata->>'score' FROM documents WHERE source = 'all' ORDER BY id")
    assert rows[0] == (f"{folder}/part-1.parquet#row 0", "0.0")
    assert rows[-1] == (f"{folder}/part-2.parquet#row 3", "3.0")


def test_directory_of_files_infers_kind_from_extension(ws, tmp_path):
    repo = tmp_path / "repo"
    files = {"src/main.py": "print('hi')\n", "src/lib.rs": "fn main() {}\n", "README.md": "# Title\n",
             "paper/main.tex": "\\section{Intro}\n", "notes.txt": "plain notes\n", "data.csv": "a,b\n1,2\n",
             ".git/config": "[core]\n", "src/__pycache__/main.cpython-311.pyc": "cached\n"}
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    summary = run_ingest(ws, [repo], source="repo")
    assert summary.inserted == 6  # hidden folders and caches are not read
    kinds = dict(catalog_rows(ws, "SELECT external_id, kind FROM documents"))
    assert kinds == {"README.md": "markdown", "data.csv": "other", "notes.txt": "web",
                     "paper/main.tex": "arxiv", "src/lib.rs": "code", "src/main.py": "code"}
    # The source takes its documents' most common kind.
    assert catalog_rows(ws, "SELECT kind FROM sources WHERE name = 'repo'") == [("code",)]


def test_glob_and_explicit_kind(ws, tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("a = 1\n")
    (repo / "b.py").write_text("b = 2\n")
    (repo / "c.md").write_text("# c\n")
    summary = run_ingest(ws, [repo], source="py", glob="*.py", kind="math")
    assert summary.inserted == 2
    assert catalog_rows(ws, "SELECT external_id, kind FROM documents ORDER BY id") == [
        ("b.py", "math"), ("pkg/a.py", "math")]


def test_directory_of_jsonl_shards_mixed_compression(ws, tmp_path):
    shards = tmp_path / "shards"
    write_jsonl(shards / "00.jsonl.zst", RECORDS[:2], "zstd")
    write_jsonl(shards / "01.jsonl.gz", RECORDS[2:4], "gzip")
    write_jsonl(shards / "02.jsonl", RECORDS[4:])
    assert run_ingest(ws, [shards], source="web").inserted == 5


def test_huggingface_dataset_saved_to_disk(ws, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"hf doc {i}" for i in range(6)], "label": list(range(6))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    summary = run_ingest(ws, [tmp_path / "ds"], source="hf")
    assert (summary.files, summary.inserted) == (2, 6)
    assert catalog_rows(ws, "SELECT text, metadata->>'label' FROM documents ORDER BY id")[5] == ("hf doc 5", "5")


def test_huggingface_dataset_dict_keeps_the_split(ws, tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train a", "train b"]}),
        "test": datasets.Dataset.from_dict({"text": ["test a"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert run_ingest(ws, [tmp_path / "dd"], source="hf", format="hf").inserted == 3
    splits = catalog_rows(ws, "SELECT text, metadata->>'split' FROM documents ORDER BY id")
    assert sorted(splits) == [("test a", "test"), ("train a", "train"), ("train b", "train")]
