"""FAISS indexes over sketch stores: build (and grow), open, and search with exact re-scoring.

The catalog maps an index's rows to documents (`index_rows`); the FAISS file
itself only holds vectors in insertion order (curator/indexes/faiss_index.py).
Beside `NAME.faiss` lies `NAME.json`, the index's metadata: the store, the
factory string, the shards it holds (in row order), the search parameters and
how many candidates a search re-scores from the store.

Index choices (`--factory`):
- `Flat`: every sketch in RAM as float32, exact. Right for small stores; at
  ~24,000 dims it costs 96 KB of RAM per document and `dim` multiply-adds per
  document per query.
- `ProjN,HNSW32` (the `auto` choice past `FLAT_MAX_BYTES`, while the graph fits
  in `GRAPH_MAX_BYTES`) and `ProjN,IVFn,SQ8` (past that): the sketches projected
  onto the N directions of most energy (indexes/faiss_index.py), in an HNSW
  graph of the projected vectors, or in an IVF index with 8-bit scalar codes (one
  byte a dimension) trained on a sample of the store. (PQ codes lose too much of
  an inner product's ranking: docs/sketches.md.) Either only proposes
  candidates: every search re-scores `rescore` of them exactly from the float16
  store (memory-mapped shards), so the scores returned are sketch scores, and
  `curator search --rerank` re-scores the best of those with exact EK-FAC.
- any other FAISS factory string (IVF1024,Flat, HNSW32 unprojected, …).

Growing: when `curator sketch` appends shards to a store, `curator index build`
for an index that exists adds only the shards its metadata does not list, with
the quantizer and projection it was trained with (`--retrain` starts afresh).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curator.artifacts import reading, write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.records import find_record
from curator.catalog.workspace import Workspace
from curator.errors import ArtifactError, CuratorError
from curator.indexes import faiss_index
from curator.sketch.rows import StoreRows, as_float32
from curator.sketch.store import SketchStore, load_store, rebuild_command, store_dir

INDEX_META_VERSION = 1
FLAT_MAX_BYTES = 2 * 2**30        # `auto` keeps a store exact (Flat) while its float32 copy fits in this
TRAIN_SAMPLE = 20_000             # store rows the projection learns from (held whole, as float32)
LIST_SAMPLE = 39                  # training rows per IVF list (FAISS's k-means asks for 39 or more)
MAX_LIST_SAMPLE = 200_000         # at most this many (projected: 256 floats each) train the IVF lists
PROJECTION_DIM = 256
DEFAULT_RESCORE = 16              # candidates per query re-scored from the store: recall@10 0.964 / 0.968 at
                                  # 25,000 / 250,000 sketches, as 32 gives within 0.006 (docs/results/search_scale.md)
DEFAULT_NPROBE = 128              # IVF lists searched per query for 512 lists or fewer; more lists: `default_nprobe`
HNSW_NEIGHBOURS = 32              # links per sketch in `auto`'s graph index (HNSW32 over the projected sketches)
HNSW_EF_SEARCH = 256              # candidates a graph search keeps: recall@10 0.970 among 16 re-scored at 250,000
GRAPH_MAX_BYTES = 2 * 2**30       # `auto` takes the graph while its vectors and links fit in this, else IVF-SQ8


# -- metadata beside the FAISS file --------------------------------------------------------------

@dataclass
class IndexMeta:
    name: str
    store_id: str
    factory: str
    shards: list[str]                 # shard files, in row order
    rows: int
    rescore: int                      # candidates re-scored exactly from the store per query (0: off)
    search: dict = field(default_factory=dict)       # FAISS search parameters (nprobe, …)
    trained_on: int = 0               # store rows the index learned from (0: needs no training)
    seconds: dict = field(default_factory=dict)
    auto: bool = False                # the factory was `auto`'s choice: a later `auto` build grows this index
    version: int = INDEX_META_VERSION

    @property
    def approximate(self) -> bool:
        return self.factory != "Flat"


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def write_meta(path: Path, meta: IndexMeta) -> None:
    write_text_atomic(meta_path(path), json.dumps(meta.__dict__, indent=1))


def read_meta(path: Path, rebuild: str) -> IndexMeta:
    target = meta_path(path)
    with reading(target, "FAISS index metadata", rebuild):
        data = json.loads(target.read_text())
        if data.get("version") != INDEX_META_VERSION:
            raise ValueError(f"metadata version {data.get('version')!r}, this curator reads {INDEX_META_VERSION}")
        return IndexMeta(**data)


# -- choosing and building ------------------------------------------------------------------------

def auto_factory(documents: int, dim: int) -> str:
    """Flat while the store's float32 copy fits in FLAT_MAX_BYTES. Past that the sketches are projected
    onto their PROJECTION_DIM directions of most energy and indexed
      - in an HNSW graph while its projected float32 vectors and links fit in GRAPH_MAX_BYTES (about 1.6M
        sketches): at 250,000 it found the exact top 10 as often as IVF-SQ8 (0.970 against 0.966 among 16
        candidates) in 0.63 of its search time;
      - else in IVF-SQ8 sized to the store (one byte per projected dimension): about 4√n lists (a power of
        two), each with LIST_SAMPLE training rows, so the share of the store a search scans keeps falling
        as the store grows (2,048 lists searched 384 at a time found the exact top 10 as often as 512
        lists searched 128 at a time, in 0.69 of the time).
    docs/results/search_scale.md has the measurements."""
    if documents * dim * 4 <= FLAT_MAX_BYTES or documents < LIST_SAMPLE * 16:
        return "Flat"
    projection = min(PROJECTION_DIM, dim)
    if _graph_fits(documents, dim):
        return f"Proj{projection},HNSW{HNSW_NEIGHBOURS}"
    lists = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(documents))))
    lists = min(lists, 2 ** int(math.log2(min(documents, MAX_LIST_SAMPLE) / LIST_SAMPLE)))
    return f"Proj{projection},IVF{lists},SQ8"


def _graph_fits(documents: int, dim: int) -> bool:
    return documents * graph_bytes_per_row(min(PROJECTION_DIM, dim)) <= GRAPH_MAX_BYTES


def graph_bytes_per_row(projection: int) -> int:
    """An HNSW graph's memory per sketch: its float32 vector, the bottom layer's 2·M links (4 bytes each),
    and a little for the layers above and the bookkeeping."""
    return 4 * projection + 8 * HNSW_NEIGHBOURS + 16


def default_search(factory: str, nprobe: int | None = None, ef_search: int | None = None) -> dict:
    """The FAISS search parameters an index of this factory keeps in its metadata: the IVF lists searched
    per query (`default_nprobe` unless given) or the graph's efSearch (HNSW_EF_SEARCH unless given)."""
    if "IVF" in factory:
        return {"nprobe": nprobe or default_nprobe(factory)}
    if "HNSW" in factory:
        return {"efSearch": ef_search or HNSW_EF_SEARCH}
    return {}


def _ivf_lists(factory: str) -> int:
    """The IVF lists a factory string asks for (0: none)."""
    found = re.search(r"IVF(\d+)", factory)
    return int(found.group(1)) if found else 0


def default_nprobe(factory: str) -> int:
    """IVF lists searched per query: DEFAULT_NPROBE up to 512 lists, then growing as lists^0.8 (rounded to
    a multiple of 32), which kept recall@10 at 0.96 from 512 lists (128 searched) to 2,048 (384)."""
    lists = _ivf_lists(factory)
    if lists <= 512:
        return min(lists, DEFAULT_NPROBE) if lists else DEFAULT_NPROBE
    return min(lists, 32 * round(DEFAULT_NPROBE * (lists / 512) ** 0.8 / 32))


def list_training_rows(factory: str, documents: int, sample: int) -> int:
    """How many store rows an IVF factory's lists learn from: LIST_SAMPLE per list, at least the
    projection's sample, at most MAX_LIST_SAMPLE and the store."""
    return min(documents, max(sample, min(LIST_SAMPLE * _ivf_lists(factory), MAX_LIST_SAMPLE)))


def training_sample(rows: StoreRows, size: int, seed: int) -> np.ndarray:
    """A seeded sample of store rows (all of them for a small store), decoded to float32."""
    total = len(rows)
    if total <= size:
        return np.concatenate([rows.block(s) for s in range(len(rows.values))])
    return np.concatenate(list(_sampled_blocks(rows, _sample_rows(total, size, seed))))


def more_training(rows: StoreRows, size: int, exclude: int, seed: int):
    """Blocks of store rows (float32) for the IVF lists beyond the projection's sample: `size` rows in
    all with the `exclude` the projection drew (the same seeded choice), read a shard at a time so that
    only the projected rows are held."""
    total = len(rows)
    if size <= exclude or total <= exclude:
        return iter(())
    others = np.setdiff1d(np.arange(total), _sample_rows(total, exclude, seed), assume_unique=True)
    chosen = np.sort(np.random.default_rng(seed + 1).choice(others, min(size - exclude, len(others)),
                                                             replace=False))
    return _sampled_blocks(rows, chosen)


def _sample_rows(total: int, size: int, seed: int) -> np.ndarray:
    if total <= size:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def _sampled_blocks(rows: StoreRows, chosen: np.ndarray):
    shard_of = np.searchsorted(rows.starts, chosen, side="right") - 1
    for s in np.unique(shard_of):
        yield as_float32(rows.values[s][chosen[shard_of == s] - rows.starts[s]], rows.scales[s])


def _shard_blocks(rows: StoreRows):
    for shard in range(len(rows.values)):
        yield rows.block(shard)


def _record(ws: Workspace, meta: IndexMeta, path: Path, new_ids: np.ndarray, first_row: int) -> None:
    """The index in the catalog; a grown index keeps its rows and gets the new ones appended."""
    import pyarrow as pa

    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        if first_row == 0:
            catalog.sql("DELETE FROM index_rows WHERE index_name = ?", [meta.name])
        catalog.sql("DELETE FROM sketch_indexes WHERE name = ?", [meta.name])
        catalog.sql("INSERT INTO sketch_indexes (name, store_id, factory, path, rows) VALUES (?, ?, ?, ?, ?)",
                    [meta.name, meta.store_id, meta.factory, str(path.relative_to(ws.root)), meta.rows])
        catalog.insert_arrow("index_rows", pa.table({
            "index_name": pa.array([meta.name] * len(new_ids), pa.string()),
            "row": pa.array(np.arange(first_row, first_row + len(new_ids)), pa.int64()),
            "doc_id": pa.array(new_ids, pa.int64())}))
        catalog.sql("COMMIT")


def _load_ids(ws: Workspace, store: SketchStore, shards: list[dict]) -> np.ndarray:
    directory = store_dir(ws, store.id)
    parts = []
    for shard in shards:
        with reading(directory / shard["ids"], "sketch shard's document ids", rebuild_command(store)):
            parts.append(np.load(directory / shard["ids"]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _existing(ws: Workspace, path: Path, store: SketchStore, factory: str, name: str):
    """(index, meta) of an index that can grow into this store's newer shards, or None to build afresh."""
    if not path.is_file() or not meta_path(path).is_file():
        return None
    meta = read_meta(path, f"curator index build --store {store.id} --name {name} --retrain")
    listed = [s["file"] for s in store.shards]
    if meta.store_id != store.id or meta.factory != factory or listed[:len(meta.shards)] != meta.shards:
        return None          # another store, another factory, or shards rewritten: nothing to grow from
    with reading(path, "FAISS index", f"curator index build --store {store.id} --name {name} --retrain"):
        index = faiss_index.load(path)
        if index.ntotal != meta.rows:
            raise ValueError(f"{index.ntotal} rows where its metadata lists {meta.rows}")
    return index, meta


def build_index(ws: Workspace, store_id: str | None = None, factory: str = "auto", name: str | None = None, *,
                rescore: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                retrain: bool = False, sample: int = TRAIN_SAMPLE, seed: int = 0) -> dict:
    """An inner-product index over a store (by id or prefix; default the latest), recorded in the catalog.

    When the index exists for this store and factory, only the shards it does not hold are added,
    with its trained projection and quantizers: the result equals a build over every shard from the
    same trained index. `retrain` builds afresh.
    """
    store = load_store(ws, store_id)
    if not store.complete:
        raise CuratorError(f"the sketch store {store.id} is incomplete; run `curator sketch` again to finish it")
    chosen = factory == "auto"
    if chosen:
        # `auto` picks more lists as a store grows; an index it chose before keeps its factory and grows
        # (re-training 250,000 sketches takes minutes, 5M an hour) unless --retrain asks for a new one, or
        # unless it is a graph the store has outgrown (its memory grows with every sketch): then `auto`
        # builds what it picks for the store's size now.
        earlier = None if retrain else _auto_index(ws, store, name)
        if earlier and "HNSW" in earlier.factory and not _graph_fits(store.documents, store.dim):
            earlier = None
        factory = earlier.factory if earlier else auto_factory(store.documents, store.dim)
        name = name or (earlier.name if earlier else None)
    if nprobe is not None and "IVF" not in factory:
        raise CuratorError(f"--nprobe sets the IVF lists a search visits; the index {factory} has none"
                           + (" (auto chose it for this store)" if chosen else ""))
    if ef_search is not None and "HNSW" not in factory:
        raise CuratorError(f"--ef-search sets an HNSW graph search's breadth; the index {factory} has no graph"
                           + (" (auto chose it for this store)" if chosen else ""))
    name = name or f"{store.id}-{factory.replace(',', '_')}"
    path = ws.artifact_dir("indexes") / f"{name}.faiss"
    found = None if retrain else _existing(ws, path, store, factory, name)
    started = time.perf_counter()
    if found is None:
        index, meta = _trained(ws, store, factory, name, sample, seed, rescore, default_search(factory, nprobe,
                                                                                               ef_search))
        meta.auto = chosen
    else:
        index, meta = found
        if rescore is not None:
            meta.rescore = rescore
        if nprobe is not None and "IVF" in factory:
            meta.search["nprobe"] = nprobe
        if ef_search is not None and "HNSW" in factory:
            meta.search["efSearch"] = ef_search
    held = len(meta.shards)
    new_shards = store.shards[held:]
    rows = StoreRows(ws, store, new_shards)
    faiss_index.add(index, _shard_blocks(rows))
    new_ids = _load_ids(ws, store, new_shards)
    first_row, meta.rows = meta.rows, meta.rows + len(new_ids)
    meta.shards = meta.shards + [s["file"] for s in new_shards]
    meta.seconds["add" if held else "build"] = round(time.perf_counter() - started, 3)
    faiss_index.save(index, path)
    write_meta(path, meta)
    _record(ws, meta, path, new_ids, first_row)
    return {"name": name, "factory": factory, "rows": meta.rows, "added": len(new_ids), "path": str(path),
            "grown": found is not None, "memory_bytes": faiss_index.memory_bytes(index), "rescore": meta.rescore}


def _auto_index(ws: Workspace, store: SketchStore, name: str | None) -> IndexMeta | None:
    """The latest index of this store (named `name`, if given) whose factory `auto` chose, or None."""
    with Catalog.open(ws) as catalog:
        rows = catalog.sql("SELECT name, path FROM sketch_indexes WHERE store_id = ? ORDER BY created_at DESC",
                           [store.id])
    for index_name, path in rows:
        if name not in (None, index_name) or not meta_path(ws.root / path).is_file():
            continue
        meta = read_meta(ws.root / path, f"curator index build --store {store.id} --retrain")
        if meta.auto:
            return meta
    return None


def _trained(ws, store, factory, name, sample, seed, rescore, search):
    """A trained, empty index and its metadata."""
    train, extra, trained_on = None, (), 0
    started = time.perf_counter()
    try:
        if faiss_index.needs_training(factory):
            rows = StoreRows(ws, store)
            train = training_sample(rows, sample, seed)
            trained_on = len(train)
            if faiss_index.split_factory(factory)[0] is not None:     # a projection: its lists may want more
                trained_on = list_training_rows(factory, len(rows), len(train))
                extra = more_training(rows, trained_on, len(train), seed)
        index = faiss_index.empty(store.dim, factory, train, seed, extra)
    except ValueError as exc:
        raise CuratorError(f"index {name}: {exc}") from None
    approximate = factory != "Flat"
    meta = IndexMeta(name=name, store_id=store.id, factory=factory, shards=[], rows=0,
                     rescore=(DEFAULT_RESCORE if approximate else 0) if rescore is None else rescore,
                     search=search,
                     trained_on=trained_on, seconds={"train": round(time.perf_counter() - started, 3)})
    return index, meta


# -- opening and searching ------------------------------------------------------------------------

@dataclass
class SketchIndex:
    """An opened index: FAISS, row → document id, metadata, and the store rows it re-scores from."""

    index: object
    doc_ids: np.ndarray
    meta: IndexMeta
    rows: StoreRows | None

    def candidates(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows): the top k per query. With re-scoring, the index proposes max(k, rescore)
        rows and their exact sketch scores from the store order them."""
        wanted = max(k, self.meta.rescore) if self.rows is not None else k
        scores, rows = faiss_index.search(self.index, query_vectors, wanted)
        if self.rows is not None:
            scores = self.rows.scores(query_vectors, rows)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        return scores[:, :k], rows[:, :k]


def _index_row(ws: Workspace, name: str | None):
    with Catalog.open(ws) as catalog:
        row = find_record(catalog, "sketch_indexes", name, what="index", id_column="name",
                          create_hint="run `curator index build` first", columns="name, store_id, path, factory")
        doc_ids = np.array([r[0] for r in catalog.sql(
            "SELECT doc_id FROM index_rows WHERE index_name = ? ORDER BY row", [row[0]])], dtype=np.int64)
    return row, doc_ids


def open_search(ws: Workspace, name: str | None = None) -> SketchIndex:
    """An index by name (a unique prefix is enough), or the latest, ready to search."""
    row, doc_ids = _index_row(ws, name)
    path = ws.root / row[2]
    rebuild = f"curator index build --store {row[1]} --factory '{row[3]}' --name {row[0]} --retrain"
    meta = read_meta(path, rebuild) if meta_path(path).is_file() else \
        IndexMeta(name=row[0], store_id=row[1], factory=row[3], shards=[], rows=len(doc_ids), rescore=0)
    with reading(path, "FAISS index", rebuild):
        index = faiss_index.load(path)
        if index.ntotal != len(doc_ids):
            raise ValueError(f"{index.ntotal} rows where the catalog maps {len(doc_ids)}")
    # An index built before its kind had a default (an HNSW graph: FAISS's efSearch of 16) gets it here.
    faiss_index.set_search_parameters(index, {**default_search(meta.factory), **meta.search})
    rows = None
    if meta.rescore:
        store = load_store(ws, row[1])
        held = [s for s in store.shards if s["file"] in set(meta.shards)]
        if [s["file"] for s in held] != meta.shards:
            raise ArtifactError(f"the index {row[0]} holds shards the store {store.id} no longer lists; "
                                f"rebuild it with `{rebuild}`")
        rows = StoreRows(ws, store, held)
    return SketchIndex(index, doc_ids, meta, rows)


def open_index(ws: Workspace, name: str | None = None):
    """(index, row → doc id array, store id) for an index name (a unique prefix is enough), or the latest."""
    opened = open_search(ws, name)
    return opened.index, opened.doc_ids, opened.meta.store_id


def top_and_bottom(index, doc_ids: np.ndarray, query_vectors: np.ndarray, top: int, bottom: int):
    """Per query: [(doc_id, score)] of the top and of the bottom documents by inner product.

    `index` is a SketchIndex (candidates re-scored from the store when it says so) or a bare FAISS index."""
    searcher = index if isinstance(index, SketchIndex) else SketchIndex(index, doc_ids, None, None)
    vectors = np.asarray(query_vectors, dtype=np.float32)
    empty = (np.zeros((len(vectors), 0)), np.zeros((len(vectors), 0), dtype=np.int64))
    best = searcher.candidates(vectors, top) if top else empty
    worst = searcher.candidates(-vectors, bottom) if bottom else empty
    results = []
    for q in range(len(vectors)):
        results.append({
            "top": [(int(doc_ids[r]), float(s)) for r, s in zip(best[1][q], best[0][q], strict=True) if r >= 0],
            "bottom": [(int(doc_ids[r]), -float(s)) for r, s in zip(worst[1][q], worst[0][q], strict=True)
                       if r >= 0]})
    return results
