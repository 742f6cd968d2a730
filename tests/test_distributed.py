"""fit, score and sketch under torchrun: two gloo processes on this CPU give what one process gives.

Each check runs the same work in two copies of one workspace, once in this process through the
library (what the CLI calls) and once as `torchrun --nproc-per-node 2 -m curator ...`, and compares
the artifacts. Documents are split into small chunks so that both ranks get work and long
documents span several windows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, save_tiny

from curator.catalog.database import Catalog, create_workspace
from curator.catalog.documents import document_ids
from curator.catalog.queries import add_queries, select_queries
from curator.catalog.querygen import generate
from curator.catalog.records import score_files
from curator.catalog.workspace import Workspace
from curator.influence.factors import load_tensors
from curator.influence.fit import FitConfig, fit
from curator.influence.score import ScoreConfig, score
from curator.influence.score_dataset import part_name
from curator.sketch.fidelity import sketch_and_measure
from curator.sketch.store import SketchConfig

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FIT = ("--max-seq-len", "12", "--layers", "last:1", "--chunk-docs", "3", "--batch-tokens", "48")


def torchrun(ranks: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CURATOR_DIST_TIMEOUT": "120", "COLUMNS": "120"}
    env.pop("CURATOR_WORKSPACE", None)
    result = subprocess.run([TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "-m", "curator",
                             *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A workspace with two sources of documents of varied length, queries, and a saved tiny model."""
    root = tmp_path_factory.mktemp("dist")
    ws, _ = create_workspace(root / "base")
    write_jsonl(root / "code.jsonl", [{"text": t * k} for t in TRAINING_TEXT[:3] for k in (1, 2, 4)])
    write_jsonl(root / "prose.jsonl", [{"text": f"Note {i}: " + t} for i, t in enumerate(TRAINING_TEXT * 2)])
    run_ingest(ws, [root / "code.jsonl"], source="code")
    run_ingest(ws, [root / "prose.jsonl"], source="prose")
    add_queries(ws, generate("arithmetic", 3) + generate("slope", 2))
    model = save_tiny(root / "tiny", seed=3)
    single = root / "single"
    shutil.copytree(ws.root, single)
    fit(Workspace(single), FitConfig(model=str(model), max_seq_len=12, layers="last:1", chunk_docs=3,
                                     batch_tokens=48))
    return root, ws.root, model, single


def copy_of(workspace: Path, to: Path) -> Path:
    shutil.copytree(workspace, to)
    return to


def factors_of(ws: Path) -> dict:
    (path,) = (ws / "factors").glob("fit-*.safetensors")
    return load_tensors(path)[0]


def scores_of(out: Path) -> pl.DataFrame:
    return pl.read_parquet(score_files(out)).sort(["query_id", "doc_id"])


def test_two_ranks_fit_the_factors_of_one_process(corpus, tmp_path):
    root, ws, model, single = corpus
    two = copy_of(ws, tmp_path / "two")
    result = torchrun(2, "fit", "--model", model, *FIT, "-w", two)
    assert "Fitted fit-" in result.stdout and result.stdout.count("Fitted") == 1      # rank 0 prints
    one, other = factors_of(single), factors_of(two)
    assert sorted(one) == sorted(other)
    for name in one:
        # Covariances, eigenvalues and Λ do not depend on the eigenvectors' signs.
        for key in ("a_cov", "s_cov", "a_eigvals", "s_eigvals", "corrected", "damping"):
            np.testing.assert_allclose(other[name][key].numpy(), one[name][key].numpy(), rtol=1e-5,
                                       atol=1e-9 * float(one[name][key].abs().max()), err_msg=f"{name} {key}")
    # Both ranks held documents: the catalog's token counts cover the whole sample.
    with Catalog.open(Workspace(two)) as catalog:
        counted = catalog.one("SELECT count(*) FROM token_counts")[0]
        assert counted == len(document_ids(catalog))


def test_two_ranks_score_and_sketch_what_one_process_does(corpus, tmp_path):
    root, ws, model, single = corpus
    two = copy_of(single, tmp_path / "two")      # the same factors
    score(Workspace(single), ScoreConfig(chunk_docs=2), out=single / "scores")
    sketch_and_measure(Workspace(single), SketchConfig(suite="arithmetic", rank=3, shard_docs=4), sample=8)
    torchrun(2, "score", "--chunk-docs", "2", "--out", two / "scores", "-w", two)
    torchrun(2, "sketch", "--suite", "arithmetic", "--rank", "3", "--shard-docs", "4", "--fidelity-sample", "8",
             "-w", two)
    a, b = scores_of(single / "scores"), scores_of(two / "scores")
    assert a.select("query_id", "doc_id").equals(b.select("query_id", "doc_id"))
    assert a.height == 5 * 21 and a.select("query_id", "doc_id").is_duplicated().sum() == 0
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-6 * float(a["score"].abs().max()))
    # The sketch stores: the same shards (named by their documents), the same vectors.
    (store_one,), (store_two,) = (single / "sketches").iterdir(), (two / "sketches").iterdir()
    assert store_one.name == store_two.name
    shards = sorted(p.name for p in store_one.glob("shard-*.npy"))
    assert shards == sorted(p.name for p in store_two.glob("shard-*.npy")) and len(shards) == 3 * 6
    for name in shards:
        np.testing.assert_allclose(np.load(store_two / name).astype(np.float64),
                                   np.load(store_one / name).astype(np.float64), rtol=2e-3, atol=1e-3)
    manifest = (store_two / "manifest.json").read_text()
    assert '"complete": true' in manifest and '"documents": 21' in manifest


def test_a_failing_rank_fails_the_job_and_a_rerun_on_one_process_resumes(corpus, tmp_path):
    """An incremental run on two ranks where one rank fails: the job stops with that rank's error,
    publishes nothing, and the same command on one process finishes only what is missing."""
    root, ws, model, single = corpus
    work = copy_of(single, tmp_path / "work")
    out = work / "growing-run"
    config = ScoreConfig(chunk_docs=2)
    score(Workspace(work), config, out=out)
    before = {p.name for p in out.glob("*.parquet")}
    write_jsonl(root / "more.jsonl", [{"text": f"More {i}: " + t} for i, t in enumerate(TRAINING_TEXT * 2)])
    run_ingest(Workspace(work), [root / "more.jsonl"], source="more")
    with Catalog.open(Workspace(work)) as catalog:
        query_ids = [q.id for q in select_queries(catalog, "all")]
        new_ids = document_ids(catalog)[21:]
    assert len(new_ids) == 12
    # A folder where the last new part must be written makes the rank that writes it fail, after
    # its other chunks (each rank does its chunks in order), so the other rank has finished parts.
    blocked = out / "pending" / part_name(0, query_ids, new_ids[10:12])
    blocked.mkdir(parents=True)
    failed = torchrun(2, "score", "--chunk-docs", "2", "--out", out, "-w", work, check=False)
    assert failed.returncode != 0
    assert "IsADirectoryError" in failed.stderr or "Is a directory" in failed.stderr
    assert {p.name for p in out.glob("*.parquet")} == before          # nothing of the failed run published
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "pending").glob("*.parquet") if p.is_file()}
    assert kept, "the other rank finished parts before the job stopped"
    blocked.rmdir()
    resumed = score(Workspace(work), config, out=out)          # the same run, now in one process
    assert resumed.stats["documents"] == 33 and resumed.stats["added_documents"] == 12
    published = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert before < set(published) and all(published[name] == mtime for name, mtime in kept.items())
    reference = copy_of(work, tmp_path / "reference")
    score(Workspace(reference), ScoreConfig(chunk_docs=5), out=reference / "reference-run")
    a, b = scores_of(reference / "reference-run"), scores_of(out)
    assert a.height == 5 * 33 and a.select("query_id", "doc_id").equals(b.select("query_id", "doc_id"))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-6 * float(a["score"].abs().max()))


def test_commands_that_write_the_catalog_refuse_torchrun(corpus, tmp_path):
    root, ws, model, single = corpus
    result = torchrun(2, "ingest", root / "code.jsonl", "--source", "again", "-w", copy_of(ws, tmp_path / "w"),
                      check=False)
    assert result.returncode != 0 and "under torchrun curator runs fit, score, sketch" in result.stderr
