"""A sketch store's rows by position, read from its memory-mapped shards and decoded exactly: what a
search re-scores its candidates from, and what an index learns from and is filled with."""

from __future__ import annotations

import numpy as np

from curator.artifacts import reading
from curator.catalog.workspace import Workspace
from curator.sketch.store import SketchStore, rebuild_command, store_dir
from curator.threads import one_torch_thread


def as_float32(values: np.ndarray, scale: np.ndarray | None = None, into=None) -> np.ndarray:
    """Stored sketch values as float32 (exact: every float16 is a float32), times `scale` (one per column:
    a store's layer scales, powers of two, so nothing is rounded) when given; `into` (a float32 torch
    tensor of the values' shape) receives them instead of fresh memory, which re-scoring reuses block
    after block. float16 is decoded by torch, whose conversion uses the CPU's half-precision
    instructions: 3.5× numpy's `astype` on one thread (128 rows of 23,807: 7 ms against 25 ms, medians),
    and decoding is most of re-scoring's time (docs/results/search_scale.md); the scale multiplies the
    decoded rows in place, while they are in the cache. See `one_torch_thread` for the thread count."""
    if values.dtype != np.float16 and into is None:
        decoded = np.asarray(values, dtype=np.float32)
        return decoded if scale is None else decoded * scale
    import warnings

    import torch

    with warnings.catch_warnings():      # a read-only memory map: torch warns, and only reads it here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        source = torch.from_numpy(np.ascontiguousarray(values))
        decoded = source.float() if into is None else into.copy_(source)
    if scale is not None:
        decoded.mul_(torch.from_numpy(scale))
    return decoded.numpy()


class StoreRows:
    """Rows of a store by position (store order), read from memory-mapped shards, for exact re-scoring.

    A float16 shard holds `values / scale` per layer, with scales powers of two, so a document's sketch
    is `values × scale` exactly in float32: the rows a search re-scores are decoded and scaled, and the
    store is never decoded as a whole.
    """

    def __init__(self, ws: Workspace, store: SketchStore, shards: list[dict] | None = None):
        self.store = store
        self.layer_sizes = store.layer_sizes()
        directory = store_dir(ws, store.id)
        self.values, self.scales, counts = [], [], []
        for shard in store.shards if shards is None else shards:
            with reading(directory / shard["file"], "sketch shard", rebuild_command(store)):
                values = np.load(directory / shard["file"], mmap_mode="r")
                scales = np.load(directory / shard["scales"])
                if values.ndim != 2 or values.shape[1] != store.dim or scales.shape != (len(self.layer_sizes),):
                    raise ValueError(f"shape {values.shape} with {scales.shape} scales, where the manifest "
                                     f"says {store.dim} dimensions in {len(self.layer_sizes)} layers")
            self.values.append(values)
            self.scales.append(np.repeat(scales.astype(np.float32), self.layer_sizes))
            counts.append(len(values))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def block(self, shard: int) -> np.ndarray:
        """One shard's sketches as float32 (decoded exactly)."""
        return as_float32(self.values[shard], self.scales[shard])

    def products(self, positions: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """positions × queries exact sketch scores, for sorted store positions: each shard's rows are read
        once, decoded into float32 (exactly) and multiplied by its layer scales (powers of two, so nothing
        is rounded), then by the queries. Measured on 1,000 queries × 16 candidates at 250,000 sketches
        (docs/results/search_scale.md), each choice here took a part of re-scoring away:
          - the queries go in once per call as one contiguous dim × queries block, where scaling and
            transposing them for every shard was 45% of re-scoring;
          - the rows are decoded into one buffer reused shard after shard: a fresh array per shard paid
            its page faults again (a quarter of decoding);
          - the product is torch's (MKL): 0.18 ms for 16 rows × 16 queries, against 0.33 ms for numpy's
            OpenBLAS, and 0.97 ms for the transposed view OpenBLAS had before."""
        import torch

        out = np.empty((len(positions), len(queries)), dtype=np.float32)
        columns = torch.from_numpy(np.ascontiguousarray(np.asarray(queries, dtype=np.float32).T))
        bounds = np.searchsorted(positions, self.starts)
        decoded = torch.empty((int(np.diff(bounds).max(initial=0)), self.store.dim), dtype=torch.float32)
        for shard in range(len(self.values)):
            lo, hi = bounds[shard], bounds[shard + 1]
            if hi > lo:
                block = as_float32(self.values[shard][positions[lo:hi] - self.starts[shard]], self.scales[shard],
                                   into=decoded[:hi - lo])
                out[lo:hi] = torch.mm(torch.from_numpy(block), columns).numpy()
        return out

    def scores(self, query_vectors: np.ndarray, rows: np.ndarray, chunk: int = 16) -> np.ndarray:
        """queries × k exact sketch scores of rows (queries × k store positions; -1 gives -inf).

        Queries go in chunks: a chunk's candidates are read and decoded once however many of its queries
        share them (decoding float16 costs more than the products), then scored by matrix products."""
        rows = np.asarray(rows, dtype=np.int64)
        queries = np.asarray(query_vectors, dtype=np.float32)
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        with one_torch_thread():
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                valid = part >= 0
                unique, inverse = np.unique(part[valid], return_inverse=True)     # sorted: shard by shard
                products = self.products(unique, queries[start:start + chunk])
                out[start:start + chunk][valid] = products[inverse, np.nonzero(valid)[0]]
        return out
