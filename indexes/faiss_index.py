"""FAISS inner-product indexes over sketch vectors.

A factory string is FAISS's ("Flat" is exact; "IVF1024,PQ32" trades recall for
memory and speed), optionally led by curator's own projection term `ProjN`:
"Proj256,IVF1024,PQ64" maps every vector onto the N directions that carry most
of a training sample's energy, then indexes the N-dim images with the rest of
the string. FAISS's own `PCA` term centres the vectors and eigendecomposes a
dim × dim covariance; curator's projection does neither, because

- an inner product ranks documents by `q·x`; with a centring mean `μ` the index
  would rank by `q·(x − μ)` projected, and `A μ · A x` varies by document;
- at sketch dimensions (~24,000) a dense eigendecomposition takes hours, while
  a randomized SVD of a sample takes seconds.

The projection is stored in the index file as a FAISS `LinearTransform` in an
`IndexPreTransform`, so queries pass through it too. The index stores vectors
in insertion order; the caller keeps the row → document id map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from curator.artifacts import atomic_file

PROJECTION = re.compile(r"^Proj(\d+)$")
POWER_ITERATIONS = 3        # of the randomized SVD; enough for the leading directions of a decaying spectrum
OVERSAMPLE = 64             # extra random directions of the randomized SVD


def split_factory(factory: str) -> tuple[int | None, str]:
    """(projection dim or None, the FAISS factory string for what follows it)."""
    head, _, rest = factory.partition(",")
    found = PROJECTION.match(head.strip())
    if not found:
        return None, factory
    if not rest:
        raise ValueError(f"{factory!r}: a projection needs an index after it, e.g. {head},IVF1024,PQ64")
    return int(found.group(1)), rest


def needs_training(factory: str) -> bool:
    """Whether an index of this factory string learns from a sample (projection, IVF, PQ, SQ, …)."""
    import faiss

    projection, rest = split_factory(factory)
    if projection is not None:
        return True
    try:
        return not faiss.index_factory(8, rest, faiss.METRIC_INNER_PRODUCT).is_trained
    except RuntimeError:
        return True          # let `empty` report the bad string with the real dimension


def top_directions(sample: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n × dim: the top right singular vectors of the sample (uncentred), by randomized SVD
    (Halko, Martinsson & Tropp 2011, with power iterations), in float64 for the small factorisations."""
    rows, dim = sample.shape
    if n > min(rows, dim):
        raise ValueError(f"a {n}-dim projection needs at least {n} training vectors of at least {n} dims "
                         f"(got {rows} × {dim})")
    rng = np.random.default_rng(seed)
    width = min(n + OVERSAMPLE, rows, dim)
    basis = orthonormal(sample @ rng.standard_normal((dim, width), dtype=np.float32))
    for _ in range(POWER_ITERATIONS):
        # Re-orthonormalise both ways each round so that small directions are not lost to rounding.
        basis = orthonormal(sample @ orthonormal(sample.T @ basis))
    small = (basis.T @ sample).astype(np.float64)      # width × dim
    _, _, vt = np.linalg.svd(small, full_matrices=False)
    return np.ascontiguousarray(vt[:n], dtype=np.float32)


def orthonormal(block: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns' span, from the eigendecomposition of their float64 Gram
    matrix: one matrix product on the tall block instead of a Householder QR, which is far slower."""
    gram = block.T.astype(np.float64) @ block.astype(np.float64)
    values, vectors = np.linalg.eigh(gram)
    keep = values > values[-1] * 1e-10          # directions the block does span
    return (block @ (vectors[:, keep] / np.sqrt(values[keep])).astype(np.float32)).astype(np.float32)


def projection_transform(directions: np.ndarray):
    """A FAISS LinearTransform y = A x (no bias) with A = directions (n × dim)."""
    import faiss

    n, dim = directions.shape
    transform = faiss.LinearTransform(dim, n, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(directions, dtype=np.float32).ravel(), transform.A)
    transform.is_trained = True
    return transform


def empty(dim: int, factory: str = "Flat", train_sample: np.ndarray | None = None, seed: int = 0,
          more_training: Iterable[np.ndarray] = ()):
    """A trained, empty inner-product index for vectors of `dim` dimensions. With a projection, the
    projection learns from `train_sample` alone and what follows it from the projected sample and the
    blocks of `more_training` (raw vectors, each projected as it comes): an IVF of many lists needs more
    training vectors than an SVD of the full dimension can hold in memory."""
    import faiss

    projection, rest = split_factory(factory)
    inner_dim = projection or dim
    try:
        index = faiss.index_factory(inner_dim, rest, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot build {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
    if projection is None and index.is_trained:
        return index
    if train_sample is None:
        raise ValueError(f"the index {factory!r} needs training vectors")
    sample = np.ascontiguousarray(train_sample, dtype=np.float32)
    if projection is not None:
        transform = projection_transform(top_directions(sample, projection, seed))
        sample = np.concatenate([transform.apply(sample), *(
            transform.apply(np.ascontiguousarray(block, dtype=np.float32)) for block in more_training)])
        if not index.is_trained:
            index.train(sample)
        return faiss.IndexPreTransform(transform, index)     # FAISS's Python layer keeps both alive
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ValueError(f"FAISS cannot train {factory!r} on {len(sample)} vectors: "
                         f"{str(exc).strip().splitlines()[-1]}") from None
    return index


def add(index, vectors: Iterable[np.ndarray]) -> None:
    for block in vectors:
        index.add(np.ascontiguousarray(block, dtype=np.float32))


def build(vectors: Iterable[np.ndarray], dim: int, factory: str = "Flat", train_sample: np.ndarray | None = None):
    """An inner-product index holding every block of vectors, in order."""
    index = empty(dim, factory, train_sample)
    add(index, vectors)
    return index


def without_vectors(index):
    """A copy of a trained index with its vectors removed: what a build over other vectors starts from."""
    import faiss

    copy = faiss.clone_index(index)
    copy.reset()
    return copy


def set_search_parameters(index, parameters: dict[str, float]) -> None:
    """Apply search-time parameters (nprobe, k_factor_rf, efSearch, …) where the index has them,
    through any IndexPreTransform."""
    import faiss

    space = faiss.ParameterSpace()
    for key, value in parameters.items():
        try:
            space.set_index_parameter(index, key, value)
        except RuntimeError:
            pass      # e.g. nprobe on a Flat index: nothing to set


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the k largest inner products per query; rows are -1 past the index's size."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def memory_bytes(index) -> int:
    """The index's size in memory, as FAISS serialises it (vectors, codes, lists, quantizers, transform)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def save(index, path: Path) -> None:
    import faiss

    with atomic_file(path) as part:
        faiss.write_index(index, str(part))


def load(path: Path):
    import faiss

    return faiss.read_index(str(path))
