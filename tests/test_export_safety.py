"""`export --force` replaces a previous export and nothing else, and never loses both copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
from helpers import plant_run, run_ingest, write_jsonl

from curator.artifacts import recover_dir
from curator.catalog.database import Catalog
from curator.catalog.queries import Query, store_queries
from curator.catalog.records import store_token_counts
from curator.curate.export import ExportSpec, export, sha256
from curator.curate.mix import MixSpec, mix
from curator.curate.rank import RankConfig, rank
from curator.errors import CuratorError


@pytest.fixture
def ws(ws, tmp_path):
    """A workspace with mixture `m`: 12 documents of 10 + id tokens, scored by one arithmetic query."""
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} " + "x" * i} for i in range(12)])
    run_ingest(ws, [tmp_path / "docs.jsonl"], source="web")
    with Catalog.open(ws, write=True) as catalog:
        ids = [r[0] for r in catalog.sql("SELECT id FROM documents ORDER BY id")]
        store_token_counts(catalog, "tok", {doc_id: 10 + doc_id for doc_id in ids})
        store_queries(catalog, [Query(id="arithmetic-0", task="arithmetic", prompt="p", completion="c")])
    scores = pl.DataFrame({"query_id": ["arithmetic-0"] * len(ids), "doc_id": ids,
                           "score": [float(i) for i in ids]})
    plant_run(ws, tmp_path, scores, {"arithmetic-0": 10.0}, tokenizer="tok")
    rank(ws, RankConfig(name="r"))
    mix(ws, MixSpec(name="m", ranking="r", budget_tokens=100))
    return ws


def spec(out: Path, fmt: str = "parquet") -> ExportSpec:
    return ExportSpec(mixture="m", format=fmt, out=out, shard_tokens=40)


def complete_export(folder: Path) -> dict:
    """The manifest of a complete export in `folder`: every listed file there with its recorded sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for name, digest in shard["sha256"].items():
            assert sha256(folder / name) == digest
    return manifest


def user_folder(path: Path, files: dict[str, str]) -> dict[str, str]:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def assert_untouched(path: Path, files: dict[str, str]) -> None:
    assert {p.name: p.read_text() for p in path.iterdir()} == files
    assert not path.with_name(path.name + ".part").exists()


def test_force_refuses_a_folder_without_a_manifest(ws, tmp_path):
    out = tmp_path / "notes"
    files = user_folder(out, {"notes.txt": "my notes"})
    with pytest.raises(CuratorError, match=r"will not replace .*notes: .* it has no manifest\.json"):
        export(ws, spec(out), force=True)
    assert_untouched(out, files)


@pytest.mark.parametrize("manifest", [
    json.dumps({"name": "my dataset", "files": ["data.csv"]}),              # another tool's manifest
    json.dumps([1, 2, 3]),                                                  # JSON, not an object
    "{not json",                                                            # not JSON at all
    json.dumps({"curator_version": "0.1.0", "format": "parquet"}),         # curator-looking, but no shards
])
def test_force_refuses_a_manifest_that_is_not_curators(ws, tmp_path, manifest):
    out = tmp_path / "dataset"
    files = user_folder(out, {"manifest.json": manifest, "data.csv": "a,b\n1,2\n"})
    with pytest.raises(CuratorError, match=r"will not replace .*dataset: .*manifest\.json"):
        export(ws, spec(out), force=True)
    assert_untouched(out, files)


@pytest.mark.parametrize("force", [False, True])
def test_an_out_that_is_a_file_fails_before_any_work(ws, tmp_path, force):
    out = tmp_path / "shards.parquet"
    out.write_text("not a folder")
    with pytest.raises(CuratorError, match=r"--out .*shards\.parquet is a file"):
        export(ws, spec(out), force=force)
    assert out.read_text() == "not a folder"
    assert not out.with_name(out.name + ".part").exists()


def test_force_replaces_a_previous_export_and_only_while_it_holds_only_its_files(ws, tmp_path):
    out = tmp_path / "shards"
    export(ws, spec(out, "parquet"))
    result = export(ws, spec(out, "jsonl.zst"), force=True)
    manifest = complete_export(out)
    assert manifest == result.manifest and manifest["format"] == "jsonl.zst"
    listed = {name for shard in manifest["shards"] for name in shard["files"]}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}      # no parquet shard left over
    assert not (tmp_path / "shards.old").exists() and not (tmp_path / "shards.part").exists()
    # A user file put into the export makes it more than an export: --force no longer replaces it.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CuratorError, match=r"does not list: notes\.txt"):
        export(ws, spec(out, "parquet"), force=True)
    assert (out / "notes.txt").read_text() == "mine" and complete_export(out)["format"] == "jsonl.zst"


def test_force_refuses_a_foreign_folder_where_the_old_copy_would_go(ws, tmp_path):
    out = tmp_path / "shards"
    export(ws, spec(out))
    files = user_folder(tmp_path / "shards.old", {"notes.txt": "my notes"})
    with pytest.raises(CuratorError, match=r"shards\.old is in the way: .* it has no manifest\.json"):
        export(ws, spec(out, "jsonl.zst"), force=True)
    assert {p.name: p.read_text() for p in (tmp_path / "shards.old").iterdir()} == files
    assert complete_export(out)["format"] == "parquet"


def test_a_crash_while_replacing_keeps_the_previous_export(ws, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    export(ws, spec(out, "parquet"))
    before = complete_export(out)
    part = tmp_path / "shards.part"
    real_rename, real_replace = os.rename, os.replace

    def crash_on_the_new_copy(real):
        def rename(src, dst, *args, **kwargs):
            if Path(src) == part:       # the finished new export is about to take OUT's name
                raise OSError("simulated crash")
            return real(src, dst, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "rename", crash_on_the_new_copy(real_rename))   # Path.rename calls os.rename
    monkeypatch.setattr(os, "replace", crash_on_the_new_copy(real_replace))
    with pytest.raises(OSError, match="simulated crash"):
        export(ws, spec(out, "jsonl.zst"), force=True)
    monkeypatch.undo()
    # One complete copy of the previous export is left, at OUT or at the name recovery looks for.
    kept = out if out.exists() else tmp_path / "shards.old"
    assert complete_export(kept) == before
    recover_dir(out)
    assert complete_export(out) == before and not (tmp_path / "shards.old").exists()
    # The next export finds the previous one where it was, and replaces it.
    export(ws, spec(out, "jsonl.zst"), force=True)
    assert complete_export(out)["format"] == "jsonl.zst"
    assert not (tmp_path / "shards.old").exists() and not part.exists()


def test_the_next_export_puts_back_an_orphaned_old_copy(ws, tmp_path):
    out = tmp_path / "shards"
    export(ws, spec(out))
    before = complete_export(out)
    out.rename(tmp_path / "shards.old")             # as a crash between the two renames leaves it
    with pytest.raises(CuratorError, match="exists; .* pass --force"):
        export(ws, spec(out, "jsonl.zst"))          # without --force the restored export is kept
    assert complete_export(out) == before and not (tmp_path / "shards.old").exists()


def test_a_users_folder_where_the_unfinished_export_goes_is_left_alone(ws, tmp_path):
    out = tmp_path / "shards"
    files = user_folder(tmp_path / "shards.part", {"notes.txt": "mine"})
    with pytest.raises(CuratorError, match=r"shards\.part is in the way .*notes\.txt"):
        export(ws, spec(out))
    assert {p.name: p.read_text() for p in (tmp_path / "shards.part").iterdir()} == files
    assert not out.exists()


def test_what_an_interrupted_export_left_is_cleared(ws, tmp_path):
    out = tmp_path / "shards"
    (tmp_path / "shards.part").mkdir()
    (tmp_path / "shards.part" / "part-00000.parquet").write_bytes(b"half a shard")
    export(ws, spec(out))
    assert (out / "manifest.json").is_file() and not (tmp_path / "shards.part").exists()
