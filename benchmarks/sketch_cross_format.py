"""Sketch fidelity on queries phrased unlike the suite (issue 19), against bytes per document, for the
query-subspace, whitened-subspace and mixed bases; SmolLM2-135M on 1,000+ real documents.

    python benchmarks/sketch_cross_format.py [--docs-per-source 250] [--python-docs 250] [--max-chars 300]
        [--layers last:2] [--fit-docs 128] [--suite-per-task 16] [--shares 0.25,0.5,0.75]
        [--ranks 8,16,32,48,64,73,96,128] [--skip-library] [--out FILE.md]

The defaults are those of docs/results/sketch_cross_format.md (about an hour on 2 busy CPU cores
with --skip-library; --out writes the raw table only, that page adds notes above it).

Corpus: the demo's four sources plus passages of Python's own documentation
(pydoc_data.topics), every document cut to --max-chars. Suite: the paper's family,
seed 0. Held out, reported apart: the paper's family with seed 1 ("same") and the
four other families, terse, prose, code and chat ("cross"), seed 1. The reference
is one exact EK-FAC pass (`curator score`) of every held-out query over every
document.

What is cached so that each point costs no model pass: whitened-subspace and the
mixed bases all live in the whitened eigen-frame, and every one of them (any
document share, any rank up to the largest) lies in the span of one pool per
layer and side, an orthonormal basis of the suite's leading directions and the
document sample's. One document pass sketches every document on the pool
(float32); a basis B is then R = Pᵀ B in pool coordinates and a document's
sketch is Rᵀ S R, a query's Rᵀ W R. Bases are nested, so every rank is the
top-left block of the largest. query-subspace's document bases, mapped into the
whitened frame (D_S u, D_A v), are added to the pool, so it is read from the
same pass (its query sketches come from the full P_q). Last, the
mixed basis the curve picks is built by `curator sketch` itself at the
64 KB rank and measured by `curator fidelity` (it must agree with the pool's
point), indexed, and `curator search --rerank` over its top 5% is run for
some cross-format queries to check that it finds what the scores say.
"""

from __future__ import annotations

import argparse
import json
import math
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

from curator.catalog.database import Catalog, create_workspace  # noqa: E402
from curator.catalog.documents import document_ids  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.catalog.queries import select_queries, store_queries  # noqa: E402
from curator.catalog.querygen import HELD_OUT_FAMILIES, family_of, generate  # noqa: E402
from curator.catalog.records import score_source  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus, excerpt  # noqa: E402
from curator.influence.ekfac import sketch_tokens, subspace_bases, whitened_frame_bases, whitening_scales  # noqa: E402
from curator.influence.factors import load_layer_factors  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.influence.queries import check_compatible, prepare_queries  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.model.document_pass import PassSettings, document_pass  # noqa: E402
from curator.sketch.bases import document_directions, interleave, suite_directions  # noqa: E402
from curator.sketch.build import sketch  # noqa: E402
from curator.sketch.fidelity import fidelity, ranking_agreement  # noqa: E402
from curator.sketch.store import SketchConfig  # noqa: E402

TASKS = ("arithmetic", "slope", "linear")
KEYS = ("spearman", "pearson", "top10_overlap", "top10_recall_at_5pct")


def python_doc_passages(n: int, max_chars: int) -> list[dict]:
    """Passages of Python's reference documentation (shipped with the interpreter), paragraph-aligned."""
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        paragraphs = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
        current = ""
        for paragraph in paragraphs:
            if current and len(current) + len(paragraph) > max_chars:
                passages.append({"id": f"{name}-{len(passages)}", "text": excerpt(current, max_chars) + "\n"})
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= 200:
            passages.append({"id": f"{name}-{len(passages)}", "text": excerpt(current, max_chars) + "\n"})
    passages = [p for p in passages if len(p["text"]) >= 200]
    step = max(1, len(passages) // n)
    return passages[::step][:n]


def measure(exact: pl.DataFrame, held, products: np.ndarray, position: dict[int, int]) -> dict:
    """Mean agreement over the held-out queries of the suite's family and, apart, the other families."""
    groups: dict[str, list] = {"same": [], "cross": []}
    per_query = {}
    for column, query in enumerate(held):
        mine = exact.filter(pl.col("query_id") == query.id).sort("doc_id")
        rows = [position[int(d)] for d in mine["doc_id"]]
        found = ranking_agreement(mine["score"].to_numpy().astype(float), products[rows, column].astype(float))
        per_query[query.id] = found
        groups["same" if family_of(query) == "paper" else "cross"].append(found)
    out = {f"{group}_{key}": float(np.mean([a[key] for a in found])) for group, found in groups.items()
           for key in KEYS}
    out["cross_spearman_min"] = float(min(a["spearman"] for a in groups["cross"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--docs-per-source", type=int, default=250)
    parser.add_argument("--python-docs", type=int, default=250, help="passages of Python's documentation")
    parser.add_argument("--max-chars", type=int, default=300)
    parser.add_argument("--layers", default="last:2")
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--fit-docs", type=int, default=128)
    parser.add_argument("--suite-per-task", type=int, default=16)
    parser.add_argument("--same-per-task", type=int, default=4)
    parser.add_argument("--cross-per-family", type=int, default=2, help="per task and held-out family")
    parser.add_argument("--document-sample", type=int, default=128)
    parser.add_argument("--shares", default="0.25,0.5,0.75", help="document shares of the mixed bases")
    parser.add_argument("--ranks", default="8,16,32,48,64,73,96,128")
    parser.add_argument("--library-rank", type=int, default=73, help="rank of the store built by curator sketch "
                                                                     "(73: 63,948 bytes per document)")
    parser.add_argument("--rerank-queries", type=int, default=4, help="cross-format queries searched with --rerank")
    parser.add_argument("--query-subspace-rank", type=int, default=96, help="largest query-subspace rank")
    parser.add_argument("--skip-library", action="store_true",
                        help="skip the store built by curator sketch and the search --rerank check")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="markdown file for the raw tables")
    parser.add_argument("--json", type=Path, help="the rows as JSON")
    args = parser.parse_args()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    shares = [float(s) for s in args.shares.split(",")]
    top_rank = ranks[-1]
    started = time.perf_counter()
    timings = {}

    lm = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        ws, _ = create_workspace(Path(tmp) / "ws")
        corpus = build_demo_corpus(Path(tmp) / "corpus", DemoSettings(
            docs_per_source=args.docs_per_source, max_chars=args.max_chars, factual_queries=1))
        for source in corpus.sources:
            ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
        extra = Path(tmp) / "python-docs.jsonl"
        extra.write_text("".join(json.dumps(p) + "\n" for p in python_doc_passages(args.python_docs, args.max_chars)))
        ingest(ws, [str(extra)], IngestOptions(source="python-docs", kind="other"))
        with Catalog.open(ws, write=True) as catalog:
            ids = document_ids(catalog)
            sources = dict(catalog.sql("SELECT source, count(*) FROM documents GROUP BY source"))
            held_sets, suite_sets = [], []
            for task in TASKS:
                store_queries(catalog, generate(task, args.suite_per_task, seed=0))
                suite_sets.append(f"{task}-s0")
                store_queries(catalog, generate(task, args.same_per_task, seed=1))
                held_sets.append(f"{task}-s1")
                for family in HELD_OUT_FAMILIES:
                    store_queries(catalog, generate(task, args.cross_per_family, seed=1, family=family))
                    held_sets.append(f"{task}-{family}-s1")
            held = select_queries(catalog, ",".join(held_sets))
            suite = select_queries(catalog, ",".join(suite_sets))
        print(f"{len(ids)} documents {sources}; suite {len(suite)}, held out {len(held)}", flush=True)

        t = time.perf_counter()
        record = fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len,
                                   max_docs=args.fit_docs, device=args.device, batch_tokens=args.batch_tokens),
                     loaded=lm).record
        timings["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        result = score(ws, ScoreConfig(queries=",".join(q.id for q in held), device=args.device, query_rank="dense",
                                       batch_tokens=args.batch_tokens), loaded=lm)
        exact = pl.read_parquet(score_source(result.out_path))
        timings["exact scores"] = time.perf_counter() - t
        print(f"fit and exact scores: {timings}", flush=True)

        # -- the pool: one document pass for whitened-subspace and every mixed share ----------------
        t = time.perf_counter()
        modules = check_compatible(lm, record, None)
        factors = {name: f.to(lm.device) for name, f in load_layer_factors(ws, record).items()}
        cpu_factors = {name: f.to("cpu") for name, f in factors.items()}
        config = SketchConfig(suite=",".join(suite_sets), method="mixed", rank=top_rank,
                              document_sample=args.document_sample, batch_tokens=args.batch_tokens)
        prepared, _ = prepare_queries(lm, modules, factors, suite, args.max_seq_len, "auto", None,
                                      args.batch_tokens, eigen_frame=True)
        directions = {name: suite_directions(prepared[name].cpu(), cpu_factors[name]) for name in modules}
        # query-subspace's document sketch uᵀ Q_Sᵀ G Q_A v is (D_S u)ᵀ G̃ (D_A v) in the whitened frame, so
        # the pool holds it too once it spans D_S u and D_A v (u, v: its eigen-frame bases).
        plain = {}
        for name in modules:
            f = cpu_factors[name]
            k_out, k_in = (min(args.query_subspace_rank, d) for d in prepared[name].shape[1:])
            u, v = subspace_bases(prepared[name].cpu(), f, k_out, k_in)
            u, v = f.q_s.double().T @ u.double(), f.q_a.double().T @ v.double()
            d_s, d_a = whitening_scales(f)
            plain[name] = (u, v, d_s[:, None] * u, d_a[:, None] * v)
        del prepared
        documents = document_directions(lm, modules, ws, factors, config, args.max_seq_len)
        timings["document directions"] = time.perf_counter() - t
        bases, pools = {}, {}
        for name in modules:
            sides = []
            for side in (0, 1):
                first, second = directions[name][side], documents[name][side]
                k = min(top_rank, first.shape[0])
                variants = {0.0: interleave(first, second, k, 0.0)}
                variants.update({s: interleave(first, second, k, s) for s in shares})
                extra = plain[name][2 + side]
                stacked = torch.cat([*variants.values(), extra / extra.norm(dim=0).clamp_min(1e-300)], dim=1)
                pool = leading_span(stacked)
                sides.append((variants, pool))
            bases[name] = {s: (sides[0][0][s], sides[1][0][s]) for s in sides[0][0]}
            pools[name] = (sides[0][1], sides[1][1])
        pool_sizes = {name: (p[0].shape[1], p[1].shape[1]) for name, p in pools.items()}
        print(f"pool sizes {pool_sizes}", flush=True)
        pool_docs = {name: whitened_frame_bases(u, v, cpu_factors[name])[0] for name, (u, v) in pools.items()}
        device_docs = {n: (u.to(lm.device), v.to(lm.device)) for n, (u, v) in pool_docs.items()}
        widths = [pool_sizes[n][0] * pool_sizes[n][1] for n in modules]
        bounds = np.cumsum([0, *widths])
        offsets = {n: (int(bounds[i]), int(bounds[i + 1])) for i, n in enumerate(modules)}
        sketches = np.zeros((len(ids), int(bounds[-1])), dtype=np.float32)
        position = {d: i for i, d in enumerate(ids)}

        def pool_layer(name, a, delta, _batch, output):
            lo, hi = offsets[name]
            output[:, lo:hi] = sketch_tokens(a, delta, *device_docs[name]).reshape(output.shape[0], -1)

        def keep(_number, chunk, sums):
            sketches[[position[d] for d in chunk]] = sums.numpy().astype(np.float32)

        t = time.perf_counter()
        with Catalog.open(ws) as catalog:
            document_pass(lm.model, modules, lm.tokenizer, catalog, ids, PassSettings(
                max_len=args.max_seq_len, batch_tokens=args.batch_tokens, chunk_docs=32), pool_layer,
                width=int(bounds[-1]), on_chunk=keep, description="pool sketches")
        timings["pool pass"] = time.perf_counter() - t
        held_m, _ = prepare_queries(lm, modules, factors, held, args.max_seq_len, "auto", None, args.batch_tokens,
                                    eigen_frame=True)
        whitened, eigen_queries = {}, {name: held_m[name].cpu().to(torch.float64) for name in modules}
        for name in modules:
            d_s, d_a = whitening_scales(cpu_factors[name])
            whitened[name] = d_s[:, None] * held_m[name].cpu().to(torch.float64) * d_a[None, :]
        del held_m

        rows = []
        for share in [0.0, *shares]:
            method = "whitened-subspace" if share == 0.0 else "mixed"
            doc_blocks, query_blocks = [], []
            for name in modules:
                p_u, p_v = pools[name]
                b_u, b_v = bases[name][share]
                r_u, r_v = p_u.T @ b_u, p_v.T @ b_v
                # The basis must lie in the pool's span, or the point would be of some other basis.
                assert float((p_u @ r_u - b_u).abs().max()) < 1e-6 and float((p_v @ r_v - b_v).abs().max()) < 1e-6
                lo, hi = offsets[name]
                s = torch.from_numpy(sketches[:, lo:hi]).reshape(len(ids), *pool_sizes[name]).to(torch.float64)
                doc_blocks.append((r_u.T @ s @ r_v).float())
                w = whitened[name] @ p_v
                w = p_u.T @ w
                query_blocks.append((r_u.T @ w @ r_v).float())
            for k in ranks:
                docs = torch.cat([b[:, :k, :k].reshape(len(ids), -1) for b in doc_blocks], dim=1).numpy()
                queries = torch.cat([b[:, :k, :k].reshape(len(held), -1) for b in query_blocks], dim=1).numpy()
                rows.append({"method": method, "share": share, "rank": k, "bytes": 2 * docs.shape[1],
                             **measure(exact, held, docs @ queries.T, position)})
                print(rows[-1], flush=True)
        doc_blocks, query_blocks = [], []
        for name in modules:
            p_u, p_v = pools[name]
            u, v, a_u, a_v = plain[name]
            r_u, r_v = p_u.T @ a_u, p_v.T @ a_v
            assert float((p_u @ r_u - a_u).abs().max()) < 1e-6 * float(a_u.abs().max())
            assert float((p_v @ r_v - a_v).abs().max()) < 1e-6 * float(a_v.abs().max())
            lo, hi = offsets[name]
            s = torch.from_numpy(sketches[:, lo:hi]).reshape(len(ids), *pool_sizes[name]).to(torch.float64)
            doc_blocks.append((r_u.T @ s @ r_v).float())
            query_blocks.append((u.T @ eigen_queries[name] @ v).float())
        for k in [r for r in ranks if r <= args.query_subspace_rank]:
            docs = torch.cat([b[:, :k, :k].reshape(len(ids), -1) for b in doc_blocks], dim=1).numpy()
            queries = torch.cat([b[:, :k, :k].reshape(len(held), -1) for b in query_blocks], dim=1).numpy()
            rows.append({"method": "query-subspace", "share": None, "rank": k, "bytes": 2 * docs.shape[1],
                         **measure(exact, held, docs @ queries.T, position)})
            print(rows[-1], flush=True)
        sketches = None     # the pool copy is no longer needed (GBs at full size)

        frame = pl.DataFrame(rows)
        budget = frame.filter(pl.col("bytes") <= 65536)
        best = (budget.filter(pl.col("method") != "query-subspace").sort(["bytes", "cross_spearman"],
                                                                         descending=True).row(0, named=True))
        print(f"picked at <= 64 KB: {best}", flush=True)

        check, rerank_rows = None, []
        if args.skip_library:
            timings["total"] = time.perf_counter() - started
            report(args, frame, ids, sources, held, record, check, rerank_rows, timings, pool_sizes, lm)
            return
        # -- the picked basis built by `curator sketch`, measured by `curator fidelity` and searched ------
        t = time.perf_counter()
        library_config = SketchConfig(suite=",".join(suite_sets), method=best["method"], rank=args.library_rank,
                                      document_share=best["share"] or 0.5, document_sample=args.document_sample,
                                      batch_tokens=args.batch_tokens)
        store = sketch(ws, library_config, loaded=lm)
        timings["library store"] = time.perf_counter() - t
        measured = fidelity(ws, store, lm, held, sample=len(ids))
        pool_point = frame.filter((pl.col("method") == best["method"]) & (pl.col("share") == best["share"])
                                  & (pl.col("rank") == args.library_rank))
        cross = [q for q in held if family_of(q) != "paper"]
        check = {"store": store.id, "bytes_per_doc": store.bytes_per_doc,
                 "library": {g: measured["groups"][g]["mean"] for g in measured["groups"]},
                 "pool": pool_point.to_dicts()}
        print(json.dumps(check, indent=1), flush=True)
        t = time.perf_counter()
        rerank_rows = rerank_check(ws, store, lm, cross[::max(1, len(cross) // args.rerank_queries)]
                                   [:args.rerank_queries], exact, math.ceil(0.05 * len(ids)))
        timings["rerank check"] = time.perf_counter() - t
        print(rerank_rows, flush=True)

    timings["total"] = time.perf_counter() - started
    report(args, frame, ids, sources, held, record, check, rerank_rows, timings, pool_sizes, lm)


def leading_span(stacked: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns' span (float64)."""
    u, s, _ = torch.linalg.svd(stacked.to(torch.float64), full_matrices=False)
    return u[:, s > 1e-9 * float(s[0])]


def rerank_check(ws, store, lm, queries, exact: pl.DataFrame, candidates: int) -> list[dict]:
    """`curator search --rerank` over the sketch's top 5% (Flat index): the share of the exact top 10
    it returns."""
    from curator.sketch.index import build_index
    from curator.sketch.search import SearchRequest, search

    built = build_index(ws, store.id, "Flat")
    found = search(ws, SearchRequest(queries=",".join(q.id for q in queries), top=10, bottom=0, rerank=candidates,
                                     index=built["name"]), loaded=lm)
    rows = []
    for hits in found:
        truth = exact.filter(pl.col("query_id") == hits.query_id).sort("score", descending=True)["doc_id"][:10]
        rows.append({"query": hits.query_id, "recovered": len(set(truth) & {h.doc_id for h in hits.top}) / 10})
    return rows


def report(args, frame, ids, sources, held, record, check, rerank_rows, timings, pool_sizes, lm) -> None:
    cross_n = sum(family_of(q) != "paper" for q in held)
    lines = [
        f"Model {lm.info.name}; {len(ids):,} documents ("
        + ", ".join(f"{name} {n}" for name, n in sorted(sources.items()))
        + f"), each cut to {args.max_chars} characters, windows of {args.max_seq_len} tokens; MLPs of "
        f"{args.layers} ({len(record.modules)} linears), EK-FAC fitted on {args.fit_docs} documents. Suite: "
        f"{args.suite_per_task} queries per task (arithmetic, slope, linear) in the paper's format, seed 0. Held "
        f"out: {len(held) - cross_n} same-family queries (paper format, seed 1) and {cross_n} cross-format "
        f"queries ({args.cross_per_family} per task in each of terse, prose, code, chat; seed 1). Mixed bases: "
        f"document directions from {args.document_sample} sampled documents. Rank k is k × k per layer (float16 "
        f"bytes). The exact top 10 in the sketch's top 5% ({math.ceil(0.05 * len(ids))} documents) is what "
        f"`search --rerank` over 5% recovers.",
        "",
        "| basis | document share | rank | bytes/doc | Spearman same | Spearman cross (min) | Pearson cross "
        "| top-10 overlap same | top-10 overlap cross | exact top 10 in top 5%: same | cross |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['method']} | {'–' if r['share'] is None else r['share']} | {r['rank']} | {r['bytes']:,} "
          f"| {r['same_spearman']:.3f} | {r['cross_spearman']:.3f} ({r['cross_spearman_min']:.2f}) "
          f"| {r['cross_pearson']:.3f} | {r['same_top10_overlap']:.2f} | {r['cross_top10_overlap']:.2f} "
          f"| {r['same_top10_recall_at_5pct']:.2f} | {r['cross_top10_recall_at_5pct']:.2f} |"
          for r in frame.sort(["method", "share", "rank"], nulls_last=True).iter_rows(named=True)),
        *([] if check is None else [
        "",
        f"Library check: `curator sketch` built store {check['store']} ({check['bytes_per_doc']:,} bytes per "
        f"document) and `curator fidelity` measured on it: "
        + "; ".join(f"{g}: Spearman {m['spearman']:.3f}, top-10 overlap {m['top10_overlap']:.2f}, top 10 in top "
                    f"5% {m['top10_recall_at_5pct']:.2f}" for g, m in check["library"].items())
        + " (float16; the pool's float32 point: "
        + "; ".join(f"same {p['same_spearman']:.3f}, cross {p['cross_spearman']:.3f}" for p in check["pool"]) + ").",
        "",
        f"`curator search --rerank {math.ceil(0.05 * len(ids))}` (Flat index) on {len(rerank_rows)} cross-format "
        f"queries: share of the exact top 10 returned "
        + ", ".join(f"{r['query']} {r['recovered']:.1f}" for r in rerank_rows) + "."]),
        "",
        "Pool per layer (left × right): " + ", ".join(f"{n.split('.')[-2]}.{n.split('.')[-1]} {a}×{b}"
                                                     for n, (a, b) in pool_sizes.items()) + ".",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, device "
        f"{args.device}, torch {torch.__version__}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/sketch_cross_format.py "
                            f"{' '.join(a for a in sys.argv[1:])}`.\n\n{text}\n")
    if args.json:
        args.json.write_text(frame.write_json())


if __name__ == "__main__":
    main()
