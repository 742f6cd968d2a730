"""Searches that reuse what the last one loaded.

The library's `curator search` opens the index, loads the model and reads the store's factors and query
bases for every call; a server answers many searches, so it keeps them between requests: opened indexes
(keyed by index name and the file's modification time, so a grown index is reopened), loaded models
(keyed by fit, device and dtype) and query frames (factors + query bases, keyed by store and device,
reloaded when the store's manifest or bases or the fit's factors file changed on disk). The steps
themselves are the library's (sketch_queries, top_and_bottom, rerank, snippets).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from curator.catalog.documents import snippets
from curator.catalog.queries import Query, select_queries
from curator.influence.factors import get_factors, load_model_for
from curator.service.db import ServerCatalog
from curator.sketch.build import QueryFrame, load_query_frame, sketch_queries
from curator.sketch.index import open_search, top_and_bottom
from curator.sketch.search import DocumentHit, QueryHits, SearchRequest, rerank
from curator.sketch.store import SketchStore, load_store, store_dir

MAX_CACHED = 4


def _stamp(path) -> tuple | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class QueryFrames:
    """Query frames by (store, device), each kept with the stamps of the files it came from.

    A frame is reused while those files are unchanged: a re-sketched store rewrites its bases and
    manifest, an extended one its manifest, and a refit its factors file (always via a rename, so the
    inode changes even within one mtime tick). `loads` counts the frames read from disk."""

    def __init__(self, ws, reading):
        self.ws, self._reading = ws, reading        # ServerCatalog.reading
        self._frames: dict[tuple, tuple[tuple, QueryFrame]] = {}
        self.loads = 0

    def _stamps(self, store: SketchStore, factors_path: str) -> tuple:
        directory = store_dir(self.ws, store.id)
        return tuple(_stamp(p) for p in (directory / "manifest.json", directory / "bases.safetensors",
                                         self.ws.root / factors_path))

    def get(self, store: SketchStore, device) -> QueryFrame:
        key = (store.id, str(device))
        cached = self._frames.get(key)
        if cached and cached[0] == self._stamps(store, cached[1].record.path):
            return cached[1]
        record = self._reading(lambda: _factors_record(self.ws, store.factors_id))
        stamps = self._stamps(store, record.path)       # before reading: a change while loading shows next time
        frame = self._reading(lambda: load_query_frame(self.ws, store, device, record))
        self.loads += 1
        self._frames.pop(key, None)
        if len(self._frames) >= MAX_CACHED:
            self._frames.pop(next(iter(self._frames)))
        self._frames[key] = (stamps, frame)
        return frame


class Searcher:
    def __init__(self, catalog: ServerCatalog):
        self.catalog = catalog
        self.ws = catalog.ws
        self.indexes: dict[tuple, tuple] = {}
        self.models: dict[tuple, object] = {}
        self.frames = QueryFrames(self.ws, catalog.reading)
        self.lock = threading.Lock()        # one search at a time: they share the loaded model
        # ...and always on this one thread: torch's OpenMP keeps a thread team per calling thread, so
        # searches hopping over the server's request threads ran several times slower than on one.
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")

    def _index(self, name: str | None):
        # The name resolves in the catalog each time (the latest index changes); the FAISS file is
        # opened again only when it changed (an index job grew it).
        key = self.catalog.reading(lambda: _resolve_index(self.ws, name))
        if key not in self.indexes:
            def find():
                opened = open_search(self.ws, key[0])
                return opened, load_store(self.ws, opened.meta.store_id)
            if len(self.indexes) >= MAX_CACHED:
                self.indexes.pop(next(iter(self.indexes)))
            self.indexes[key] = self.catalog.reading(find)
        return self.indexes[key]

    def _model(self, factors_id: str, device: str, dtype: str):
        key = (factors_id, device, dtype)
        if key not in self.models:
            record = self.catalog.read(lambda c: get_factors(c, factors_id))
            if len(self.models) >= MAX_CACHED:
                self.models.pop(next(iter(self.models)))
            self.models[key] = self.catalog.reading(lambda: load_model_for(self.ws, record, device=device,
                                                                           dtype=dtype))
        return self.models[key]

    def search(self, request: SearchRequest) -> list[QueryHits]:
        return self.thread.submit(self._search, request).result()

    def _search(self, request: SearchRequest) -> list[QueryHits]:
        with self.lock:
            index, store = self._index(request.index)
            if request.queries:
                chosen = self.catalog.read(lambda c: select_queries(c, request.queries))
            else:
                chosen = [Query(id="ad-hoc", task="ad-hoc", prompt=request.prompt, completion=request.completion)]
            loaded = self._model(store.factors_id, request.device, request.dtype)
            frame = self.frames.get(store, loaded.device)
            vectors, _ = sketch_queries(self.ws, store, loaded, chosen, frame=frame)
            found = top_and_bottom(index, index.doc_ids, vectors, max(request.top, request.rerank), request.bottom)
            if request.rerank:
                exact = self.catalog.reading(lambda: rerank(
                    self.ws, store, loaded, chosen, [[d for d, _ in f["top"][:request.rerank]] for f in found]))
                for f, ranked in zip(found, exact, strict=True):
                    f["top"] = ranked
        ids = [d for f in found for side in ("top", "bottom") for d, _ in f[side]]
        info = self.catalog.read(lambda c: snippets(c, ids))
        results = []
        for query, f in zip(chosen, found, strict=True):
            def hits(items):
                return [DocumentHit(doc_id=d, source=info[d][0], score=s, snippet=info[d][1])
                        for d, s in items if d in info]
            results.append(QueryHits(query_id=query.id, prompt=query.prompt, top=hits(f["top"][:request.top]),
                                     bottom=hits(f["bottom"][:request.bottom]), reranked=request.rerank,
                                     store=store.id, fidelity=store.fidelity))
        return results


def _factors_record(ws, factors_id: str):
    from curator.catalog.database import Catalog

    with Catalog.open(ws) as catalog:
        return get_factors(catalog, factors_id)


def _resolve_index(ws, name: str | None) -> tuple:
    from curator.catalog.database import Catalog
    from curator.catalog.records import find_record

    with Catalog.open(ws) as catalog:
        row = find_record(catalog, "sketch_indexes", name, what="index", id_column="name",
                          create_hint="run `curator index build` first", columns="name, path")
    path = ws.root / row[1]
    return row[0], path.stat().st_mtime_ns if path.exists() else 0
