"""IVF lists against nprobe on a kept synthetic store: which list count finds the exact top 10 in the
least time. The index's IVF search alone (the projection and the re-scoring are the same for all).

    python benchmarks/search_latency.py --docs 250000 --small 0 --keep /tmp/sk250 --write-only   # once
    python benchmarks/ivf_lists.py --store /tmp/sk250/store-250000 [--settings 512:128,2048:384]

One projection (`curator index build`'s: the top 256 directions of a 20,000-row store sample) maps
every sketch once (cached beside the store as projected.npy, with the exact top 10 of the 1,000
queries as truth.npy); then for each lists:nprobe an IVF-SQ8 is trained on 39 projected rows per list
(as `auto` trains it), every sketch is added, and the 1,000 queries are searched for 16 candidates,
best of two. The share of the exact top 10 among the candidates is what re-scoring returns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_latency as sl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a store folder kept by search_latency.py --keep")
    parser.add_argument("--settings", default="512:64,512:128,1024:192,1024:256,2048:256,2048:320,2048:384,4096:512")
    parser.add_argument("--candidates", type=int, default=16)
    args = parser.parse_args()
    import faiss

    from curator.catalog.workspace import Workspace
    from curator.indexes import faiss_index
    from curator.sketch.index import LIST_SAMPLE, TRAIN_SAMPLE, training_sample
    from curator.sketch.rows import StoreRows
    from curator.sketch.store import load_store

    ws = Workspace(args.store / "ws")
    store = load_store(ws, None)
    rows = StoreRows(ws, store)
    spectrum = json.loads(sl.SPECTRUM.read_text())
    eigenvalues, _, _ = sl.full_spectrum(spectrum, spectrum["dim"])
    queries = sl.draw(1000, eigenvalues, sl.Rotation(len(eigenvalues), 0), np.random.default_rng(2))
    truth_file, projected_file = args.store / "truth.npy", args.store / "projected.npy"
    if not truth_file.is_file():
        np.save(truth_file, sl.exact_top10(rows, queries))
    truth = np.load(truth_file)
    transform = faiss_index.projection_transform(faiss_index.top_directions(training_sample(rows, TRAIN_SAMPLE, 0),
                                                                            256, 0))
    if not projected_file.is_file():
        np.save(projected_file, np.concatenate([transform.apply(np.ascontiguousarray(rows.block(s), np.float32))
                                                for s in range(len(rows.values))]))
    vectors = np.load(projected_file)
    projected_queries = transform.apply(np.ascontiguousarray(queries, np.float32))
    print(f"{len(vectors):,} sketches projected to {vectors.shape[1]} dims; {faiss.omp_get_max_threads()} FAISS threads")
    print(f"| lists | nprobe | trained on | 1,000 queries (IVF search, best of 2) | recall@10 of {args.candidates} candidates |")
    print("|---|---|---|---|---|")
    trained: dict[int, object] = {}
    for setting in args.settings.split(","):
        lists, nprobe = (int(x) for x in setting.split(":"))
        if lists not in trained:
            sample = min(len(vectors), LIST_SAMPLE * lists)
            chosen = np.sort(np.random.default_rng(0).choice(len(vectors), sample, replace=False))
            index = faiss.index_factory(vectors.shape[1], f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
            index.train(vectors[chosen])
            index.add(vectors)
            trained[lists] = (index, sample)
        index, sample = trained[lists]
        index.nprobe = nprobe
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            _, found = index.search(projected_queries, args.candidates)
            best = min(best, time.perf_counter() - started)
        print(f"| {lists:,} | {nprobe} | {sample:,} | {best:.2f} s | {sl.recall(found, truth):.3f} |", flush=True)


if __name__ == "__main__":
    main()
