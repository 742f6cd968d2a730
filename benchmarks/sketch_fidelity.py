"""Sketch fidelity against exact EK-FAC on held-out queries, as a curve over bytes per document, for each
sketch method and suite size; and the sketching pass against plain training. SmolLM2-135M by default.

    python benchmarks/sketch_fidelity.py [--docs-per-source 60] [--max-chars 500] [--layers last:2]
        [--max-seq-len 128] [--suite-sizes 4,16] [--held-out-per-task 4] [--ranks 4,8,16,32,64]
        [--methods query-subspace,whitened-subspace,eigen,random] [--device cpu] [--record docs/benchmarks.md]

The corpus is the demo's (stdlib code, package Markdown, trivia, mpmath docs).
The reference is one exact EK-FAC scoring pass of the held-out queries over
every document. Held out are two groups, reported apart (Spearman, Pearson, top-10 overlap and
the exact top 10 in the sketch's top 5%, each the mean over the group's queries): queries of the
suite's own family (the paper's format, seed 1: another seed of the same
generator) and queries of the same three tasks in the other families of
formats (terse, prose, code, chat: what other people send), which share no
template with the suite. Each method and suite size
(suite queries: seed 0, first N per task) builds one store at the largest rank.
Every basis is nested (top singular or eigen-vectors, or Gram-Schmidt of a
fixed Gaussian draw), so the rank-k sketch is the top-left k × k block of each
layer's and every smaller rank is read from the same store. Reported per point:
mean over held-out queries of Spearman and Pearson over documents, top-10
overlap, and the share of the exact top 10 found in the sketch's top 5% (what
`curator search --rerank` over 5% of the corpus would recover). The sketching
pass (bases included) is timed against a plain forward + backward over the
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
from recording import record_section  # noqa: E402

from curator.catalog.database import Catalog  # noqa: E402
from curator.catalog.documents import document_ids  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus  # noqa: E402
from curator.sketch.fidelity import ranking_agreement  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.model.document_pass import document_batches  # noqa: E402
from curator.catalog.queries import select_queries, store_queries  # noqa: E402
from curator.catalog.querygen import HELD_OUT_FAMILIES, family_of, generate  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.sketch.build import sketch, sketch_queries  # noqa: E402
from curator.sketch.store import SketchConfig, iter_shards  # noqa: E402
from curator.catalog.database import create_workspace  # noqa: E402
from curator.catalog.records import score_files  # noqa: E402

TASKS = ("arithmetic", "slope", "linear")
SUBSPACE = ("query-subspace", "whitened-subspace", "mixed")     # built from a suite: one store per suite size


def truncation_columns(store, k: int) -> np.ndarray:
    """Columns of the flattened store vector that make up the rank-k sketch (top-left block per layer)."""
    columns, offset = [], 0
    for name in store.modules:
        k_out, k_in = store.ranks[name]
        rows = np.arange(min(k, k_out))[:, None]
        cols = np.arange(min(k, k_in))[None, :]
        columns.append((offset + rows * k_in + cols).ravel())
        offset += k_out * k_in
    return np.concatenate(columns)


def pct(n: int, percent: int) -> int:
    """How many documents the top `percent`% holds (as curator.sketch.fidelity counts them)."""
    return max(1, int(np.ceil(n * percent / 100)))


KEYS = ("spearman", "pearson", "top10_overlap", "top10_recall_at_1pct", "top10_recall_at_5pct")


def measure(exact: pl.DataFrame, held, doc_ids: np.ndarray, products: np.ndarray) -> dict:
    """Mean agreement over the held-out queries of the suite's family (plain keys) and over the other
    families (keys with a `cross_` prefix)."""
    position = {int(d): i for i, d in enumerate(doc_ids)}
    groups: dict[str, list] = {"": [], "cross_": []}
    for column, query in enumerate(held):
        mine = exact.filter(pl.col("query_id") == query.id).sort("doc_id")
        rows = [position[int(d)] for d in mine["doc_id"]]
        groups["" if family_of(query) == "paper" else "cross_"].append(
            ranking_agreement(mine["score"].to_numpy().astype(float), products[rows, column].astype(float)))
    return {prefix + key: float(np.mean([a[key] for a in found]))
            for prefix, found in groups.items() if found for key in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--docs-per-source", type=int, default=60)
    parser.add_argument("--max-chars", type=int, default=500)
    parser.add_argument("--layers", default="last:2")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--suite-sizes", default="4,16", help="suite queries per task, one store each")
    parser.add_argument("--held-out-per-task", type=int, default=4)
    parser.add_argument("--suite-families", default="paper",
                        help="families the suites are written in (comma-separated); cross-format held-out "
                             "queries come from the other families only")
    parser.add_argument("--cross-families", help="the held-out families (default: every family the suites do not use)")
    parser.add_argument("--cross-format-per-family", type=int, default=1,
                        help="held-out queries per task and per other family (terse, prose, code, chat)")
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--methods", default="query-subspace,whitened-subspace,eigen,random",
                        help="any of whitened-subspace, mixed, query-subspace, eigen, random")
    parser.add_argument("--document-share", type=float, default=0.5, help="mixed: share of document directions")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--plot", type=Path, help="SVG of the curves")
    parser.add_argument("--fit-docs", type=int, help="fit the factors on a seeded sample of this many documents")
    parser.add_argument("--skip-baseline", action="store_true", help="do not time a plain forward + backward")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--section", default="sketch_fidelity",
                        help="name of the docs/benchmarks.md section to replace (one per corpus size)")
    args = parser.parse_args()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    suite_sizes = sorted(int(s) for s in args.suite_sizes.split(","))

    lm = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        ws, _ = create_workspace(Path(tmp) / "ws")
        corpus = build_demo_corpus(Path(tmp) / "corpus", DemoSettings(
            docs_per_source=args.docs_per_source, max_chars=args.max_chars, factual_queries=1))
        for source in corpus.sources:
            ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
        with Catalog.open(ws, write=True) as catalog:
            ids = document_ids(catalog)
            held_sets = []
            suite_families = args.suite_families.split(",")
            cross_families = (args.cross_families.split(",") if args.cross_families else
                              [f for f in HELD_OUT_FAMILIES if f not in suite_families])
            if set(cross_families) & set(suite_families):
                parser.error("--cross-families must not include a suite family")
            suite_ids = {task: [] for task in TASKS}
            for task in TASKS:     # suite: seed 0; held out: seed 1 (different problems)
                for family in suite_families:
                    made = generate(task, suite_sizes[-1], seed=0, family=family)
                    store_queries(catalog, made)
                    suite_ids[task].append([q.id for q in made])
                store_queries(catalog, generate(task, args.held_out_per_task, seed=1))
                held_sets.append(f"{task}-s1")
                for family in cross_families:
                    if args.cross_format_per_family:
                        store_queries(catalog, generate(task, args.cross_format_per_family, seed=1, family=family))
                        held_sets.append(f"{task}-{family}-s1")
            held = select_queries(catalog, ",".join(held_sets))
        baseline_s, tokens = (None, None) if args.skip_baseline else baseline_pass(
            lm, ws, ids, args.max_seq_len, args.batch_tokens, args.device)
        with Catalog.open(ws) as catalog:
            tokens = tokens or sum(b.tokens for _, b in document_batches(
                catalog, lm.tokenizer, ids, args.max_seq_len, args.batch_tokens, "cpu", {}) if b is not None)
        record = fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len,
                                   max_docs=args.fit_docs,
                                   device=args.device, batch_tokens=args.batch_tokens), loaded=lm).record
        result = score(ws, ScoreConfig(queries=",".join(q.id for q in held), device=args.device,
                                       query_rank="dense",
                                       batch_tokens=args.batch_tokens), loaded=lm)
        exact = pl.read_parquet(score_files(result.out_path))

        rows, passes = [], []
        for method in args.methods.split(","):
            for size in (suite_sizes if method in SUBSPACE else suite_sizes[:1]):
                # The first `size` of each suite family, for each task.
                suite = ",".join(i for task in TASKS for ids in suite_ids[task] for i in ids[:size])
                start = time.perf_counter()
                store = sketch(ws, SketchConfig(suite=suite, method=method, rank=ranks[-1], precision="float16",
                                                document_share=args.document_share,
                                                device=args.device, batch_tokens=args.batch_tokens), loaded=lm)
                elapsed = time.perf_counter() - start
                label = f"{method} (suite {size}/task)" if method in SUBSPACE else method
                passes.append({"label": label, "seconds": elapsed, "bases": store.seconds.get("bases", 0.0),
                               "documents": store.seconds["documents"], "tokens": store.tokens})
                queries, _ = sketch_queries(ws, store, lm, held)
                parts = list(iter_shards(ws, store))
                doc_ids = np.concatenate([p[0] for p in parts])
                vectors = np.concatenate([p[1] for p in parts])
                for k in ranks:
                    columns = truncation_columns(store, k)
                    products = vectors[:, columns] @ queries[:, columns].T
                    rows.append({"method": method, "suite": size if method in SUBSPACE else None, "rank": k,
                                 "bytes": 2 * len(columns), **measure(exact, held, doc_ids, products)})
                    print(rows[-1], flush=True)

    frame = pl.DataFrame(rows)
    fit_s = record.stats["seconds"]
    lines = [
        f"Model {lm.info.name}; the demo corpus, {len(ids)} documents ({tokens:,} tokens, windows of "
        f"{args.max_seq_len}); MLPs of {args.layers} ({len(record.modules)} linears), fitted on "
        f"{args.fit_docs or 'all'} documents. The top 1% / 5% hold {pct(len(ids), 1)} / {pct(len(ids), 5)} "
        f"documents. Suites: the first N per task of seed 0 in each of the families {args.suite_families}. "
        f"Held out, reported apart: {args.held_out_per_task} queries per task of the paper's family (seed 1; "
        f"\"same\") and {args.cross_format_per_family} per task in each family the suites do not use, "
        f"{', '.join(cross_families)} (\"cross\"), for "
        f"arithmetic, slope and linear. Float16 sketches; rank k "
        f"is k × k per layer.",
        "",
        "| method | suite/task | rank | bytes/doc | Spearman same | Spearman cross | Pearson same "
        "| top-10 overlap same | top-10 overlap cross | exact top-10 in top 5%: same | cross |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['method']} | {r['suite'] or '–'} | {r['rank']} | {r['bytes']:,} | {r['spearman']:.3f} | "
          f"{_cell(r, 'cross_spearman', '.3f')} | {r['pearson']:.3f} | {r['top10_overlap']:.2f} "
          f"| {_cell(r, 'cross_top10_overlap', '.2f')} "
          f"| {r['top10_recall_at_5pct']:.2f} | {_cell(r, 'cross_top10_recall_at_5pct', '.2f')} |"
          for r in frame.iter_rows(named=True)),
        "",
        (f"Baseline, a plain forward + backward of the whole model over the same batches: {baseline_s:.1f} s "
         f"({tokens / baseline_s:,.0f} tokens/s). "
         if baseline_s else "")
        + f"Fit: {fit_s['covariances']:.1f} s + {fit_s['eigenvalue correction']:.1f} s. Exact scoring of the "
        f"held-out queries: {result.stats['seconds']['document pass']:.1f} s for the document pass.",
        "",
        "| sketch store (rank " + str(ranks[-1]) + ") | bases (s) | document pass (s) | tokens/s "
        "| pass × baseline tokens/s | all × baseline time |",
        "|---|---|---|---|---|---|",
        *(f"| {p['label']} | {p['bases']:.1f} | {p['documents']:.1f} | {p['tokens'] / p['documents']:,.0f} | "
          + (f"{(p['tokens'] / p['documents']) / (tokens / baseline_s):.2f} | {p['seconds'] / baseline_s:.2f}"
             if baseline_s else "– | –") + " |" for p in passes),
        "",
        f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}, torch {torch.__version__}.",
    ]
    print("\n".join(lines))
    if args.plot:
        plot(frame, args.plot)
    if args.record:
        record_section(args.record, args.section, f"Sketch fidelity: SmolLM2-135M, {len(ids)} documents",
                       "sketch_fidelity.py", lines)


def _cell(row: dict, key: str, fmt: str) -> str:
    return "–" if row.get(key) is None else format(row[key], fmt)


def plot(frame: pl.DataFrame, path: Path) -> None:
    """Both curves over bytes per document (log scale), side by side, with a dashed line at 0.9."""
    from curator.plots import PALETTE, Series, lines, svg

    charts = []
    for key, title in (("spearman", "mean Spearman vs exact (held-out queries)"),
                       ("top10_recall_at_5pct", "exact top-10 in sketch top 5%")):
        series = []
        for i, ((method, suite), part) in enumerate(frame.group_by(["method", "suite"], maintain_order=True)):
            part = part.sort("bytes")
            series.append(Series(method + (f", suite {suite}/task" if suite else ""), part[key].to_list(),
                                 PALETTE[i % len(PALETTE)], x=part["bytes"].to_list(), markers=True))
        charts.append(lines(series, width=520, height=340, x_log=True, x_label="bytes per document (float16)",
                            y_label=title, reference=0.9))
    body = "".join(f'<g transform="translate({520 * i} 0)">{chart}</g>' for i, chart in enumerate(charts))
    path.write_text(svg(1040, 340, body))


if __name__ == "__main__":
    main()
