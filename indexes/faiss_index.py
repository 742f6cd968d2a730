"""FAISS inner-product indexes over sketch vectors.

Any index-factory string works ("Flat" is exact; "IVF1024,PQ32" trades recall
for memory and speed). The index stores vectors in insertion order; the caller
keeps the row → document id map (the catalog's `index_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from curator.artifacts import atomic_file


def build(vectors: Iterable[np.ndarray], dim: int, factory: str = "Flat", train_sample: np.ndarray | None = None):
    """An inner-product index holding every block of vectors, in order."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    if not index.is_trained:
        if train_sample is None:
            raise ValueError(f"the index {factory!r} needs training vectors")
        index.train(np.ascontiguousarray(train_sample, dtype=np.float32))
    for block in vectors:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the k largest inner products per query; rows are -1 past the index's size."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def save(index, path: Path) -> None:
    import faiss

    with atomic_file(path) as part:
        faiss.write_index(index, str(part))


def load(path: Path):
    import faiss

    return faiss.read_index(str(path))
