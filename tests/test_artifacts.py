"""Artifacts on disk: written whole or not at all, and damaged ones named in one line with the fix.

A workspace is built through the library on a tiny model saved to a folder;
the damaged-file checks then run the `curator` command as a user would.
"""

from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest
from helpers import curator, run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, save_tiny

from curator.artifacts import atomic_file, replace_dir
from curator.catalog.database import Catalog, create_workspace
from curator.catalog.queries import Query, add_queries
from curator.errors import CatalogLockedError
from curator.influence.fit import FitConfig, fit
from curator.influence.score import ScoreConfig, score
from curator.model.loading import load_model
from curator.sketch.build import sketch
from curator.sketch.fidelity import measure_store
from curator.sketch.index import build_index
from curator.sketch.store import SketchConfig, decode, encode, iter_shards, load_store, store_dir

DOCS = TRAINING_TEXT + [t.upper() for t in TRAINING_TEXT] + ["x = 1", "y = x * 2", "print(y)"]
QUERIES = [Query(id=f"q{i}", task="arithmetic", prompt=f"Calculate the answer: ({i} + 3) * 2",
                 completion=f"{i + 3} * 2 = {2 * (i + 3)}.") for i in range(5)]


class Spy:
    """Counts the passes a run starts."""

    def __init__(self):
        self.stages = []

    def stage(self, description, total_docs):
        self.stages.append(description)

    def advance(self, docs, tokens):
        pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    ws, _ = create_workspace(root / "ws")
    write_jsonl(root / "docs.jsonl", [{"text": t} for t in DOCS])
    run_ingest(ws, [root / "docs.jsonl"])
    model_dir = save_tiny(root / "tiny", seed=3)
    lm = load_model(str(model_dir))
    record = fit(ws, FitConfig(model=str(model_dir), max_seq_len=24, batch_tokens=96), loaded=lm).record
    add_queries(ws, QUERIES)
    run = score(ws, ScoreConfig(queries="q0,q1,q2", batch_tokens=96), loaded=lm)
    store = sketch(ws, SketchConfig(suite="q0,q1,q2", rank=3, shard_docs=5), loaded=lm)
    index = build_index(ws, store.id)
    return root, ws, lm, record, run, store, index


def damaged(path, how="truncate"):
    """Damage a file; return a function that puts it back."""
    saved = path.read_bytes()
    if how == "truncate":
        path.write_bytes(saved[: len(saved) // 3])
    elif how == "garbage":
        path.write_bytes(b"not what you think" * 10)
    else:
        path.unlink()

    def restore():
        path.write_bytes(saved)
    return restore


def one_line_error(result, *words):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("error:"), message
    for word in words:
        assert word in message, message
    return message


def run_the_fix(message: str, ws) -> None:
    """Run the command the error names (between backticks) as the user would."""
    command = shlex.split(message.split("`")[1])
    assert command[0] == "curator"
    curator(*command[1:], "-w", ws.root)


@pytest.mark.parametrize("how", ["truncate", "garbage", "missing"])
def test_a_damaged_factors_file_names_itself_and_the_fit_that_rebuilds_it(built, how):
    _, ws, _, record, _, _, _ = built
    restore = damaged(ws.root / record.path, how)
    score_q3 = ("score", "-q", "q3", "--factors", record.id, "--batch-tokens", "96", "-w", ws.root)
    try:
        message = one_line_error(curator(*score_q3, check=False), record.path.split("/")[-1], "curator fit")
        if how == "missing":
            run_the_fix(message, ws)        # the named command rebuilds the same fit ...
            assert (ws.root / record.path).is_file()
            curator(*score_q3)              # ... and the command that failed now runs
    finally:
        restore()


def test_damaged_sketch_shards_manifest_and_index_are_one_line_errors(built):
    _, ws, _, _, _, store, index = built
    shard = store_dir(ws, store.id) / store.shards[0]["file"]
    restore = damaged(shard)
    score_q3 = ("score", "--method", "sketch", "-q", "q3", "--store", store.id, "-w", ws.root)
    try:
        one_line_error(curator(*score_q3, check=False), "sketch shard", shard.name, "curator sketch")
        result = curator("index", "build", "--store", store.id, "--name", "again", "-w", ws.root, check=False)
        message = one_line_error(result, "sketch shard", "curator sketch")
        run_the_fix(message, ws)            # the named command builds the same store again ...
        curator(*score_q3)                  # ... and sketch scores come back
    finally:
        restore()
    manifest = store_dir(ws, store.id) / "manifest.json"
    restore = damaged(manifest, "garbage")
    try:
        result = curator("index", "build", "--store", store.id, "-w", ws.root, check=False)
        one_line_error(result, "manifest", "curator sketch")
    finally:
        restore()
    faiss_file = ws.root / "indexes" / f"{index['name']}.faiss"
    restore = damaged(faiss_file)
    try:
        result = curator("search", "--prompt", "Calculate the answer: (2 + 2) * 2", "--completion", "8.",
                         "-w", ws.root, check=False)
        one_line_error(result, "FAISS index", "curator index build")
    finally:
        restore()


def test_a_damaged_score_file_is_a_one_line_error_for_the_audit(built):
    _, ws, _, _, run, _, _ = built
    from pathlib import Path

    part = sorted(Path(run.out_path).glob("*.parquet"))[0]     # one part of the run's score dataset
    restore = damaged(part)
    try:
        result = curator("audit", "--run", run.run_id, "--out", ws.root / "reports" / "a.html", "-w", ws.root,
                         check=False)
    finally:
        restore()
    one_line_error(result, "score file", "curator score")


def test_a_fit_whose_catalog_was_locked_at_the_end_is_only_recorded_on_rerun(built, monkeypatch):
    _, ws, lm, _, _, _, _ = built
    config = FitConfig(model="tiny-again", max_seq_len=24, batch_tokens=96, max_docs=9, seed=7)
    real_open = Catalog.open

    def locked(workspace, *, write=False, **kwargs):
        if write:
            raise CatalogLockedError("the catalog is in use by another curator process")
        return real_open(workspace, write=write, **kwargs)

    monkeypatch.setattr(Catalog, "open", staticmethod(locked))
    with pytest.raises(CatalogLockedError):
        fit(ws, config, loaded=lm)
    monkeypatch.setattr(Catalog, "open", real_open)
    factors_dir = ws.root / "factors"
    assert not list(factors_dir.glob("*.part")), "the covariance sums are removed once the factors exist"
    spy = Spy()
    result = fit(ws, config, loaded=lm, progress=spy)
    assert spy.stages == [] and not result.reused
    with Catalog.open(ws) as catalog:
        assert catalog.one("SELECT id FROM factors WHERE id = ?", [result.record.id])
    assert fit(ws, config, loaded=lm).reused


def test_a_failed_write_leaves_neither_the_file_nor_its_part(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_file(target) as part:
        part.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_file(target) as part:
        part.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_replacing_a_folder_keeps_one_whole_copy_at_every_step(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / "out.part"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real_rename = type(new).rename

    def crash_on_second_rename(self, target):
        if self == new:
            raise OSError("killed between the two renames")
        return real_rename(self, target)

    monkeypatch.setattr(type(new), "rename", crash_on_second_rename)
    with pytest.raises(OSError):
        replace_dir(new, old)
    monkeypatch.undo()
    assert (tmp_path / "out.old" / "a").read_text() == "old"     # the old copy is aside, not gone
    replace_dir(new, old)                                         # the next attempt finishes the swap
    assert (old / "a").read_text() == "new" and not (tmp_path / "out.old").exists()


def test_float16_sketches_are_scaled_per_layer_so_nothing_overflows_or_flushes_to_zero():
    rng = np.random.default_rng(0)
    sizes = [6, 4, 5]
    vectors = np.concatenate([rng.normal(size=(3, 6)) * 1e6,     # past float16's 65,504
                              rng.normal(size=(3, 4)) * 1e-9,    # below its smallest subnormal
                              rng.normal(size=(3, 5))], axis=1)
    with np.errstate(over="ignore"):
        plain = vectors.astype(np.float16)
    assert not np.isfinite(plain).all() and (plain[:, 6:10] == 0).all()   # what an unscaled cast does
    stored, scales = encode(vectors, sizes, "float16")
    assert stored.dtype == np.float16 and np.isfinite(stored).all()
    assert all(np.log2(s) == int(np.log2(s)) for s in scales)          # powers of two: exact scaling
    np.testing.assert_allclose(decode(stored, scales, sizes), vectors, rtol=1e-3)
    with pytest.raises(Exception, match="not finite"):
        encode(np.full((1, 15), np.inf), sizes, "float16")


def test_a_float16_store_matches_a_float32_store_to_its_precision(built):
    _, ws, lm, _, _, store, _ = built
    store = load_store(ws, store.id)     # as it is now (an earlier test may have rebuilt it)
    wide = sketch(ws, SketchConfig(suite="q0,q1,q2", rank=3, shard_docs=5, precision="float32",
                                   factors=store.factors_id), loaded=lm)
    narrow = np.concatenate([v for _, v in iter_shards(ws, store)])
    exact = np.concatenate([v for _, v in iter_shards(ws, wide)])
    np.testing.assert_allclose(narrow, exact, rtol=2e-3, atol=1e-3 * np.abs(exact).max())


def test_a_finished_store_the_catalog_never_recorded_is_recorded_on_rerun(built):
    """As for fits: a store whose last step (the catalog write) failed, e.g. on a locked catalog."""
    _, ws, lm, _, _, store, _ = built
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("DELETE FROM sketch_stores WHERE id = ?", [store.id])
    again = sketch(ws, SketchConfig(suite="q0,q1,q2", rank=3, shard_docs=5, factors=store.factors_id), loaded=lm)
    assert again.id == store.id
    with Catalog.open(ws) as catalog:
        assert catalog.one("SELECT 1 FROM sketch_stores WHERE id = ?", [store.id])


def test_fidelity_samples_the_store_not_documents_added_after_it(built, tmp_path):
    root, ws, lm, _, _, _, _ = built
    fresh_store = sketch(ws, SketchConfig(suite="q0,q1", rank=2, shard_docs=4), loaded=lm)
    write_jsonl(tmp_path / "more.jsonl", [{"text": f"a later document number {i}"} for i in range(6)])
    run_ingest(ws, [tmp_path / "more.jsonl"], source="later")
    result = measure_store(ws, fresh_store, "q3,q4", sample=1000, loaded=lm)
    assert result["documents"] == fresh_store.documents == len(DOCS)
    assert all(np.isfinite(v["spearman"]) for v in result["per_query"].values())
    shutil.rmtree(store_dir(ws, fresh_store.id))
