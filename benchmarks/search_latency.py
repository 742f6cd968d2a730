"""Search latency: 1,000 queries over 1M stored sketches on the CPU, through curator's FAISS wrapper.

    python benchmarks/search_latency.py [--docs 1000000] [--dim 256] [--queries 1000]
        [--factory Flat --factory IVF1024,PQ32] [--record docs/benchmarks.md]

Sketches are synthetic (speed does not depend on their values): Gaussian
vectors with a few dominant directions, as real gradient sketches have. The
baseline, measured in the same run, is the blocked matrix product that
`curator score --method sketch` uses (numpy, shards of 65,536 documents) plus
an argpartition for the top 10. Recall@10 is against that exact top 10.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recording import record_section  # noqa: E402

from curator.indexes import faiss_index  # noqa: E402



def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.ones(dim, dtype=np.float32)
    scales[:8] = 10.0
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32) * scales
    return out


def blocked_top10(vectors: np.ndarray, queries: np.ndarray, block: int = 65_536) -> np.ndarray:
    best_scores = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 10), dtype=np.int64)
    for start in range(0, len(vectors), block):
        scores = queries @ vectors[start:start + block].T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        merged_rows = np.concatenate([best_rows, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :10]
        best_scores = np.take_along_axis(merged_scores, keep, axis=1)
        best_rows = np.take_along_axis(merged_rows, keep, axis=1)
    return best_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--factory", action="append")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()
    factories = args.factory or ["Flat", "IVF1024,Flat"]

    vectors = synthetic(args.docs, args.dim, 0)
    queries = synthetic(args.queries, args.dim, 1)
    start = time.perf_counter()
    truth = blocked_top10(vectors, queries)
    baseline = time.perf_counter() - start
    rows = [("store", f"{args.docs:,} synthetic sketches × {args.dim} dims (float32, "
                      f"{args.docs * args.dim * 4 / 2**30:.1f} GiB)"),
            ("queries", f"{args.queries:,}, top 10 each"),
            ("baseline: blocked matrix product", f"{baseline:.2f} s")]
    for factory in factories:
        start = time.perf_counter()
        index = faiss_index.build([vectors], args.dim, factory,
                                  train_sample=vectors[:100_000] if "IVF" in factory else None)
        if hasattr(index, "nprobe"):
            index.nprobe = 16
        built = time.perf_counter() - start
        start = time.perf_counter()
        _, found = faiss_index.search(index, queries, 10)
        elapsed = time.perf_counter() - start
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        rows.append((f"FAISS {factory}" + (" (nprobe 16)" if hasattr(index, "nprobe") else ""),
                     f"{elapsed:.2f} s for {args.queries:,} queries ({elapsed / baseline:.2f}× baseline), "
                     f"recall@10 {recall:.3f}, built in {built:.1f} s"))
    import faiss

    rows.append(("machine", f"{platform.system()} {platform.machine()}, {faiss.omp_get_max_threads()} threads, "
                            f"faiss {faiss.__version__}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.record:
        record_section(args.record, "search_latency", "Sketch search latency (CPU)",
                       "search_latency.py", ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


if __name__ == "__main__":
    main()
