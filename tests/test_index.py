"""FAISS indexes over sketch stores: projected IVF-PQ recall, exact re-scoring from the float16 store, growth."""

from __future__ import annotations

import numpy as np
import pytest

from curator.catalog.database import create_workspace
from curator.errors import ArtifactError, CuratorError
from curator.indexes import faiss_index
from curator.sketch.index import (auto_factory, build_index, default_nprobe, more_training, open_search, top_and_bottom,
                                  training_sample)
from curator.sketch.rows import StoreRows
from curator.sketch.scoring import blocked_scores
from curator.sketch.store import SketchStore, record_store, shard_name, store_dir, write_manifest, write_shard

LAYERS = {"a": [16, 16], "b": [8, 16], "c": [8, 8]}      # 256 + 128 + 64 = 448 dims
DIM = 448


def structured(n: int, seed: int) -> np.ndarray:
    """Sketch-like vectors: Gaussian with a power-law spectrum in a fixed random rotation, the layers at
    magnitudes 10⁶ apart (as float16 shards must scale them)."""
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((DIM, DIM)))[0]
    variances = np.arange(1, DIM + 1, dtype=float) ** -1.0
    z = np.random.default_rng(seed).standard_normal((n, DIM)) * np.sqrt(variances)
    return (z @ rotation.T) * np.repeat([1e3, 1.0, 1e-3], [256, 128, 64])


def make_store(ws, blocks: list[np.ndarray], store_id: str = "synthetic") -> SketchStore:
    store = SketchStore(id=store_id, factors_id="f", model_id="m", tokenizer_id="t", method="random", suite=["q"],
                        modules=list(LAYERS), ranks=LAYERS, dim=DIM, precision="float16", seed=0, max_seq_len=8,
                        chat_template="none", complete=True)
    directory = store_dir(ws, store.id)
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for block in blocks:
        append_shard(ws, store, list(range(start, start + len(block))), block, record=False)
        start += len(block)
    write_manifest(directory, store)
    record_store(ws, store)
    return store


def append_shard(ws, store: SketchStore, doc_ids: list[int], vectors: np.ndarray, record: bool = True) -> None:
    """What `curator sketch` does when a store grows: one more shard, listed in the manifest."""
    directory = store_dir(ws, store.id)
    store.shards.append(write_shard(directory, shard_name(doc_ids), doc_ids, vectors, store))
    store.documents += len(doc_ids)
    if record:
        write_manifest(directory, store)
        record_store(ws, store)


def exact_top(ws, store, queries: np.ndarray, k: int) -> np.ndarray:
    ids, scores = blocked_scores(ws, store, queries)
    return ids[np.argsort(-scores, axis=0, kind="stable")[:k]].T


@pytest.fixture
def ws(tmp_path):
    return create_workspace(tmp_path / "ws")[0]


def test_rescoring_reads_exactly_the_sketch_scores_from_the_float16_store(ws):
    store = make_store(ws, [structured(300, 1), structured(200, 2), structured(100, 3)])
    queries = structured(4, 9).astype(np.float32)
    _, reference = blocked_scores(ws, store, queries)            # what `curator score --method sketch` gives
    rows = StoreRows(ws, store)
    assert all(isinstance(v, np.memmap) for v in rows.values)
    picked = np.random.default_rng(0).integers(0, 600, size=(4, 30))
    picked[1, 5] = -1                                                 # FAISS's "no row"
    got = rows.scores(queries, picked)
    want = np.take_along_axis(reference.T, np.maximum(picked, 0), 1)
    assert got[1, 5] == -np.inf
    mask = picked >= 0
    np.testing.assert_allclose(got[mask], want[mask], rtol=2e-5, atol=1e-6 * np.abs(want).max())


def test_projected_ivf_index_with_rescoring_finds_the_exact_top_10(ws):
    store = make_store(ws, [structured(3000, s) for s in (1, 2, 3)])
    queries = structured(40, 7).astype(np.float32)
    truth = exact_top(ws, store, queries, 10)
    built = build_index(ws, store.id, "Proj64,IVF32,SQ8", rescore=100, nprobe=8)
    assert built["rows"] == 9000 and not built["grown"]
    opened = open_search(ws, built["name"])
    found = top_and_bottom(opened, opened.doc_ids, queries, top=10, bottom=0)
    recall = np.mean([len({d for d, _ in f["top"]} & set(t.tolist())) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall
    # The scores returned are the store's exact sketch scores, not the index's approximations.
    ids, scores = blocked_scores(ws, store, queries)
    position = {int(d): i for i, d in enumerate(ids)}
    for q, f in enumerate(found):
        np.testing.assert_allclose([s for _, s in f["top"]], [scores[position[d], q] for d, _ in f["top"]],
                                   rtol=2e-5)


def _search(ws, name, queries):
    opened = open_search(ws, name)
    return top_and_bottom(opened, opened.doc_ids, queries, top=20, bottom=5)


def test_a_flat_index_grown_by_a_new_shard_equals_one_built_over_everything(ws):
    store = make_store(ws, [structured(150, 1), structured(150, 2)])
    first = build_index(ws, store.id, "Flat", "grow")
    assert first["rows"] == 300
    append_shard(ws, store, list(range(300, 420)), structured(120, 3))
    grown = build_index(ws, store.id, "Flat", "grow")
    assert grown["grown"] and grown["added"] == 120 and grown["rows"] == 420
    full = build_index(ws, store.id, "Flat", "full", retrain=True)
    assert not full["grown"]
    queries = structured(6, 8).astype(np.float32)
    assert _search(ws, "grow", queries) == _search(ws, "full", queries)
    opened = open_search(ws, "grow")
    np.testing.assert_array_equal(opened.doc_ids, np.arange(420))
    assert opened.meta.shards == [s["file"] for s in store.shards]
    # Nothing new: nothing added.
    assert build_index(ws, store.id, "Flat", "grow")["added"] == 0


def test_a_trained_index_grows_with_its_own_quantizer_as_if_built_over_everything(ws, tmp_path):
    store = make_store(ws, [structured(1500, 1), structured(1500, 2)])
    factory = "Proj32,IVF16,SQ8"
    first = build_index(ws, store.id, factory, "ivf", rescore=40)
    trained = faiss_index.without_vectors(faiss_index.load(first["path"]))
    append_shard(ws, store, list(range(3000, 4000)), structured(1000, 3))
    grown = build_index(ws, store.id, factory, "ivf")
    assert grown["grown"] and grown["added"] == 1000
    # The reference: the same trained quantizer and projection, every shard added at once.
    faiss_index.add(trained, [StoreRows(ws, store).block(s) for s in range(3)])
    faiss_index.save(trained, first["path"].replace("ivf.faiss", "ivf-ref.faiss"))
    queries = structured(8, 9).astype(np.float32)
    opened = open_search(ws, "ivf")
    assert opened.meta.rescore == 40 and opened.meta.search == {"nprobe": 16}
    faiss_index.set_search_parameters(trained, opened.meta.search)
    got = faiss_index.search(opened.index, queries, 50)
    want = faiss_index.search(trained, queries, 50)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_a_store_rewritten_under_an_index_is_indexed_afresh(ws):
    store = make_store(ws, [structured(100, 1), structured(100, 2)])
    build_index(ws, store.id, "Flat", "x")
    store.shards = store.shards[1:]
    store.documents = 100
    write_manifest(store_dir(ws, store.id), store)
    record_store(ws, store)
    again = build_index(ws, store.id, "Flat", "x")
    assert not again["grown"] and again["rows"] == 100


def test_bad_factories_and_damaged_metadata_are_clear_errors(ws):
    store = make_store(ws, [structured(100, 1)])
    with pytest.raises(CuratorError, match="NotAnIndex"):
        build_index(ws, store.id, "NotAnIndex")
    with pytest.raises(CuratorError, match="projection"):
        build_index(ws, store.id, "Proj32")
    built = build_index(ws, store.id, "Flat", "damaged")
    meta = built["path"].replace(".faiss", ".json")
    with open(meta, "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="damaged.json"):
        open_search(ws, "damaged")


def test_auto_keeps_small_stores_exact_and_projects_large_ones(monkeypatch):
    from curator.sketch import index as index_module

    assert auto_factory(5_000, 24_576) == "Flat"
    assert auto_factory(1_000_000, 64) == "Flat"
    # A graph of the projected sketches while it fits in 2 GiB (1,296 bytes a sketch) …
    assert auto_factory(30_000, 24_576) == auto_factory(1_600_000, 24_576) == "Proj256,HNSW32"
    # … then about 4√n lists, a power of two, each with 39 training rows of at most 200,000.
    assert auto_factory(1_700_000, 24_576) == "Proj256,IVF4096,SQ8"
    assert auto_factory(5_000_000, 24_576) == "Proj256,IVF4096,SQ8"
    monkeypatch.setattr(index_module, "GRAPH_MAX_BYTES", 0)
    assert auto_factory(30_000, 24_576) == "Proj256,IVF512,SQ8"
    assert auto_factory(250_000, 24_576) == "Proj256,IVF2048,SQ8"
    # Lists searched: 128 up to 512 lists, then growing more slowly than the lists.
    assert [default_nprobe(f"Proj256,IVF{n},SQ8") for n in (64, 512, 1024, 2048, 4096)] == [64, 128, 224, 384, 672]


def test_the_lists_learn_from_more_store_rows_than_the_projection(ws):
    """An IVF of many lists trains on LIST_SAMPLE rows per list: the projection's sample plus other rows of
    the store, each drawn once, from every shard, read as stored."""
    store = make_store(ws, [structured(1000, s) for s in (1, 2, 3)])
    rows = StoreRows(ws, store)
    everything = np.concatenate([rows.block(s) for s in range(3)])
    where = {row.tobytes(): i for i, row in enumerate(everything)}
    projection = [where[row.tobytes()] for row in training_sample(rows, 200, 0)]
    extra = np.concatenate(list(more_training(rows, 624, 200, 0)))
    drawn = [where[row.tobytes()] for row in extra]
    assert len(drawn) == 424 and len(set(drawn)) == 424 and not set(drawn) & set(projection)
    assert {i // 1000 for i in drawn} == {0, 1, 2}
    built = build_index(ws, store.id, "Proj32,IVF16,SQ8", "many", sample=200)
    meta = open_search(ws, built["name"]).meta
    assert meta.trained_on == 16 * 39 and meta.search == {"nprobe": 16}
    assert list(more_training(rows, 150, 200, 0)) == []         # the projection's sample is enough


def test_an_index_auto_chose_keeps_its_factory_and_grows(ws, monkeypatch):
    """`auto` picks more lists as a store grows; the index it chose before is grown with its own factory
    (not trained afresh under another name) unless --retrain asks for a new one."""
    from curator.sketch import index as index_module

    monkeypatch.setattr(index_module, "FLAT_MAX_BYTES", 0)
    monkeypatch.setattr(index_module, "GRAPH_MAX_BYTES", 0)        # IVF, whose lists auto sizes to the store
    store = make_store(ws, [structured(1500, 1), structured(1500, 2)])
    first = build_index(ws, store.id)
    assert first["factory"] == "Proj256,IVF64,SQ8" and not first["grown"]
    for seed in range(3, 9):                                    # 3,000 → 12,000 documents
        append_shard(ws, store, list(range(1500 * (seed - 1), 1500 * seed)), structured(1500, seed))
    assert auto_factory(store.documents, DIM) == "Proj256,IVF256,SQ8"
    grown = build_index(ws, store.id)
    assert grown["grown"] and grown["name"] == first["name"] and grown["factory"] == first["factory"]
    assert grown["added"] == 9000 and grown["rows"] == 12000
    fresh = build_index(ws, store.id, retrain=True)
    assert fresh["factory"] == "Proj256,IVF256,SQ8" and not fresh["grown"] and fresh["name"] != first["name"]
    assert build_index(ws, store.id)["name"] == fresh["name"]    # the latest index auto chose


def test_auto_past_flat_is_a_projected_graph_that_finds_the_exact_top_10_and_grows(ws, monkeypatch):
    from curator.sketch import index as index_module

    monkeypatch.setattr(index_module, "FLAT_MAX_BYTES", 0)
    store = make_store(ws, [structured(1500, s) for s in (1, 2)])
    queries = structured(40, 7).astype(np.float32)
    built = build_index(ws, store.id)
    assert built["factory"] == "Proj256,HNSW32" and not built["grown"]
    opened = open_search(ws, built["name"])
    assert opened.meta.search == {"efSearch": 256} and opened.meta.rescore == 16 and opened.meta.auto
    _, found = opened.candidates(queries, 10)
    truth = exact_top(ws, store, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]) >= 0.9
    with pytest.raises(CuratorError, match="--nprobe sets the IVF lists.*Proj256,HNSW32 has none"):
        build_index(ws, store.id, nprobe=8)
    append_shard(ws, store, list(range(3000, 4500)), structured(1500, 3))
    grown = build_index(ws, store.id, ef_search=64)
    assert grown["grown"] and grown["rows"] == 4500 and grown["factory"] == "Proj256,HNSW32"
    opened = open_search(ws, grown["name"])
    assert opened.meta.search == {"efSearch": 64}
    _, found = opened.candidates(queries, 10)
    truth = exact_top(ws, store, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]) >= 0.9
    # A graph the store outgrows (its memory grows with every sketch) is not grown by `auto`: it builds
    # what it picks for the store's size now.
    monkeypatch.setattr(index_module, "GRAPH_MAX_BYTES", 5000 * index_module.graph_bytes_per_row(256))
    append_shard(ws, store, list(range(4500, 6000)), structured(1500, 4))
    outgrown = build_index(ws, store.id)
    assert outgrown["factory"].endswith(",SQ8") and "IVF" in outgrown["factory"] and not outgrown["grown"]
    assert open_search(ws).meta.factory == outgrown["factory"]        # the latest index: what a search takes
    with pytest.raises(CuratorError, match="--ef-search sets an HNSW graph search's breadth"):
        build_index(ws, store.id, ef_search=64)
