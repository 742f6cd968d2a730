"""How many passes over the documents a query suite takes, and what that costs: `--query-rank auto`
(curator's default) against `--query-rank dense`, on SmolLM2-135M.

    python benchmarks/suite_passes.py [--layers all] [--queries 100] [--docs 16] [--record docs/benchmarks.md]

First the arithmetic for several tracked-layer sets and suite sizes (passes under the default 2 GB
query memory); then one measured run of `curator score` each way on the same documents, the same
fit and the same suite, so the ratio is measured in one run rather than assumed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from influence_smollm2 import build_model  # noqa: E402
from recording import record_section  # noqa: E402

from curator.catalog.database import Catalog, create_workspace  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.catalog.queries import store_queries  # noqa: E402
from curator.catalog.querygen import generate  # noqa: E402
from curator.constants import REASONING_TASKS  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.influence.scoring import bytes_per_query, choose_query_rank, passes_needed  # noqa: E402
from curator.model.loading import tracked_modules  # noqa: E402
from curator.catalog.records import score_files  # noqa: E402

BUDGET_MB = 2048


def plan_table(model) -> list[str]:
    lines = ["| tracked MLPs | queries | dense: passes | auto: kept as | auto: passes |", "|---|---|---|---|---|"]
    for layers in ("last:2", "last:6", "all"):
        shapes = [(m.out_features, m.in_features) for m in tracked_modules(model, "mlp", layers).values()]
        for n in (16, 100, 400):
            budget = BUDGET_MB * 2**20
            dense_passes = passes_needed(n, bytes_per_query(shapes, None), budget)
            rank, _ = choose_query_rank("auto", n, shapes, budget)
            passes = passes_needed(n, bytes_per_query(shapes, rank), budget)
            kept = "dense" if rank is None else f"rank {rank}"
            lines.append(f"| {layers} ({len(shapes)} linears) | {n} | {dense_passes} | {kept} | {passes} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()

    lm = build_model(args)
    lines = ["Passes over the documents for a suite under the default 2 GB of query memory (arithmetic "
             "from the layer shapes, exact):", "", *plan_table(lm.model), ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws, _ = create_workspace(tmp / "ws")
        corpus = build_demo_corpus(tmp / "corpus", DemoSettings(docs_per_source=args.docs, max_chars=600,
                                                                factual_queries=1))
        for source in corpus.sources:
            ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
        with Catalog.open(ws, write=True) as catalog:
            per_task = -(-args.queries // len(REASONING_TASKS))
            for task in REASONING_TASKS:
                store_queries(catalog, generate(task, per_task, seed=0))
        query_ids = sorted(q.id for task in REASONING_TASKS for q in generate(task, per_task, seed=0))
        query_ids = query_ids[: args.queries]
        fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len, fisher="empirical",
                          max_docs=args.docs, device=args.device, batch_tokens=args.batch_tokens), loaded=lm)
        runs = {}
        for setting in ("auto", "dense"):
            start = time.perf_counter()
            result = score(ws, ScoreConfig(queries=",".join(query_ids), query_rank=setting, max_docs=args.docs,
                                           chat_template="none", device=args.device,
                                           batch_tokens=args.batch_tokens), loaded=lm, force=True)
            runs[setting] = (time.perf_counter() - start, result)
            print(setting, runs[setting][0], result.stats["query_batches"], result.stats["query_rank_reason"],
                  flush=True)
        a = pl.read_parquet(score_files(runs["auto"][1].out_path)).sort(["query_id", "doc_id"])["score"].to_numpy()
        d = pl.read_parquet(score_files(runs["dense"][1].out_path)).sort(["query_id", "doc_id"])["score"].to_numpy()
    auto_s, auto = runs["auto"]
    dense_s, dense = runs["dense"]
    lines += [
        f"Measured: `curator score` of {len(query_ids)} queries over {args.docs} demo-corpus documents "
        f"(windows of {args.max_seq_len}), MLPs of {args.layers}, {args.dtype}, each way once, same fit:", "",
        "| --query-rank | kept as | passes | query stage (s) | document passes (s) | total (s) |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {run.stats['query_rank_reason'].split(':')[0]} | {run.stats['query_batches']} | "
          f"{run.stats['seconds'].get('query gradients', 0):.1f} | {run.stats['seconds']['document pass']:.1f} | "
          f"{total:.1f} |" for name, (total, run) in runs.items()),
        "",
        f"auto took {auto_s:.1f} s against {dense_s:.1f} s for dense (**{dense_s / auto_s:.1f}×** faster). Its "
        f"scores against dense: Pearson {np.corrcoef(a, d)[0, 1]:.4f} over all pairs. On a large corpus "
        f"the document passes dominate, and they scale with the number of passes "
        f"({dense.stats['query_batches']} against {auto.stats['query_batches']}).",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}, torch {torch.__version__}.",
    ]
    print("\n".join(lines))
    if args.record:
        record_section(args.record, "suite_passes", "Suite scoring passes: `--query-rank auto` against dense",
                       "suite_passes.py", lines)


if __name__ == "__main__":
    main()
