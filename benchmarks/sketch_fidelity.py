"""Sketch fidelity against exact EK-FAC on held-out queries, and sketching speed, on SmolLM2-135M.

    python benchmarks/sketch_fidelity.py [--docs 60] [--layers last:2] [--max-seq-len 128]
        [--suite-per-task 8] [--held-out-per-task 4] [--ranks 4,16] [--methods query-subspace,eigen,random]
        [--device cpu] [--record docs/benchmarks.md]

One fit and one exact scoring pass of the held-out queries over every document
are the reference. Each (method, rank) then builds a sketch store (one pass
over the documents) and its scores for the held-out queries are compared with
the exact ones: mean Spearman and Pearson over documents, top-10 overlap. The
sketching pass is timed against a plain training forward + backward over the
same batches, measured in the same run.
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

from influence_smollm2 import baseline_pass, build_model  # noqa: E402

from curator.catalog import Catalog  # noqa: E402
from curator.demo import stdlib_paths  # noqa: E402
from curator.fidelity import ranking_agreement  # noqa: E402
from curator.fit import FitConfig, fit  # noqa: E402
from curator.ingest import IngestOptions, ingest  # noqa: E402
from curator.queries import select_queries, store_queries  # noqa: E402
from curator.querygen import generate  # noqa: E402
from curator.score import ScoreConfig, score  # noqa: E402
from curator.search import blocked_scores  # noqa: E402
from curator.sketch import SketchConfig, sketch, sketch_queries  # noqa: E402
from curator.workspace import Workspace  # noqa: E402

BEGIN, END = "<!-- sketch_fidelity:begin -->", "<!-- sketch_fidelity:end -->"
TASKS = ("arithmetic", "slope", "linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--max-chars", type=int, default=1500)
    parser.add_argument("--layers", default="last:2")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--suite-per-task", type=int, default=8)
    parser.add_argument("--held-out-per-task", type=int, default=4)
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--methods", default="query-subspace,eigen,random")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()

    lm = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        ws, _ = Workspace.init(Path(tmp) / "ws")
        ingest(ws, stdlib_paths(), IngestOptions(source="stdlib", kind="code", glob="*.py"))
        with Catalog.open(ws, write=True) as catalog:
            ids = sorted(r[0] for r in catalog.sql(
                "SELECT id FROM documents WHERE chars BETWEEN 300 AND ? ORDER BY hash(id, 0), id LIMIT ?",
                [args.max_chars, args.docs]))
            catalog.sql("DELETE FROM document_rows WHERE id NOT IN (SELECT unnest(?))", [ids])
            for task in TASKS:     # suite: seed 0; held out: seed 1 (different problems, same formats)
                store_queries(catalog, generate(task, args.suite_per_task, seed=0))
                store_queries(catalog, generate(task, args.held_out_per_task, seed=1))
        suite = ",".join(f"{t}-s0" for t in TASKS)
        held_out = ",".join(f"{t}-s1" for t in TASKS)
        baseline_s, tokens = baseline_pass(lm, ws, ids, args.max_seq_len, args.batch_tokens, args.device)
        record = fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len,
                                   device=args.device, batch_tokens=args.batch_tokens), loaded=lm).record
        exact = score(ws, ScoreConfig(queries=held_out, device=args.device, batch_tokens=args.batch_tokens),
                      loaded=lm)
        table = pl.read_parquet(exact.out_path)
        with Catalog.open(ws) as catalog:
            held = select_queries(catalog, held_out)
        rows = []
        for method in args.methods.split(","):
            for rank in (int(r) for r in args.ranks.split(",")):
                start = time.perf_counter()
                store = sketch(ws, SketchConfig(suite=suite, method=method, rank=rank, dtype="float16",
                                                device=args.device, batch_tokens=args.batch_tokens), loaded=lm)
                elapsed = time.perf_counter() - start
                vectors, _ = sketch_queries(ws, store, lm, held)
                doc_ids, products = blocked_scores(ws, store, vectors)
                position = {int(d): i for i, d in enumerate(doc_ids)}
                agreement = []
                for column, query in enumerate(held):
                    mine = table.filter(pl.col("query_id") == query.id).sort("doc_id")
                    rows_of = [position[int(d)] for d in mine["doc_id"]]
                    agreement.append(ranking_agreement(mine["score"].to_numpy().astype(float),
                                                       products[rows_of, column].astype(float)))
                rows.append({"method": method, "rank": rank, "bytes/doc": store.bytes_per_doc,
                             "spearman": float(np.mean([a["spearman"] for a in agreement])),
                             "pearson": float(np.mean([a["pearson"] for a in agreement])),
                             "top-10 overlap": float(np.mean([a["top10_overlap"] for a in agreement])),
                             "sketch s (incl. bases)": round(elapsed, 1)})
                print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    fit_s = record.stats["seconds"]
    lines = [
        f"Model {lm.info.name}, {len(ids)} stdlib modules ({tokens:,} tokens, windows of {args.max_seq_len}), "
        f"MLPs of {args.layers} ({len(record.modules)} linears). Suite: {args.suite_per_task} queries per task "
        f"(seed 0); held out: {args.held_out_per_task} per task (seed 1), arithmetic/slope/linear.",
        f"Baseline, plain forward+backward of the whole model over the same batches: {baseline_s:.1f} s. "
        f"Fit passes: {fit_s['covariances']:.1f} s + {fit_s['eigenvalue correction']:.1f} s. Exact scoring "
        f"document pass: {exact.stats['seconds']['document pass']:.1f} s.",
        "", "| method | rank | bytes/doc | Spearman | Pearson | top-10 overlap | sketch s (incl. bases) | × baseline |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['method']} | {r['rank']} | {r['bytes/doc']:,} | {r['spearman']:.3f} | {r['pearson']:.3f} | "
          f"{r['top-10 overlap']:.2f} | {r['sketch s (incl. bases)']} | "
          f"{r['sketch s (incl. bases)'] / baseline_s:.2f} |" for r in rows),
        "", f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"device {args.device}, torch {torch.__version__}.",
    ]
    print("\n".join(lines))
    if args.record:
        command = " ".join(["python benchmarks/sketch_fidelity.py", *sys.argv[1:]]).replace(
            f" --record {args.record}", "")
        section = "\n".join([BEGIN, f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.", "", *lines, END])
        text = args.record.read_text()
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Sketch fidelity and sketching speed: SmolLM2-135M\n\n" + section + "\n"
        args.record.write_text(text)


if __name__ == "__main__":
    main()
