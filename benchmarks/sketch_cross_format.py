"""Sketch fidelity on queries phrased unlike the suite (issue 19), against bytes per document;
per-layer budgets chosen on held-out families; suites written in several families. SmolLM2-135M
on 1,000+ real documents.

    python benchmarks/sketch_cross_format.py [--docs-per-source 250] [--python-docs 250] [--max-chars 300]
        [--layers last:2] [--fit-docs 128] [--suite-per-task 16] [--cross-per-family 4]
        [--ranks 8,16,32,48,64,73,96,128,147] [--whitened-rank 272] [--budgets 16384,65536,262144]
        [--family-suite-per-family 4] [--family-suite-ranks 32,48,64,73] [--shares ""]
        [--skip-library] [--out FILE.md] [--json FILE.json]

The defaults are those of docs/results/sketch_cross_format.md: about 45 minutes on 2 shared CPU
cores, and 15 more for the library step (2.6 GiB of float32 sketches; 3.8 GiB resident when polled).
--out writes the raw tables only; that page adds notes above them.

Corpus: the demo's four sources plus passages of Python's own documentation
(pydoc_data.topics), every document cut to --max-chars. Suite: the paper's family,
seed 0. Held out: the paper's family with seed 1 ("same") and the four other
families, terse, prose, code and chat ("cross"), seed 1. The reference is one exact
EK-FAC pass (`curator score`) of every held-out query over every document.

One document pass sketches every document on every basis measured, each at its
largest rank (bases are nested, so every smaller rank is the top-left block of
each layer's sketch); float32. The bases ("blocks"):
- paper: whitened-subspace from the paper-format suite, up to --whitened-rank per layer;
- query-subspace, from the same suite (up to --query-subspace-rank; 0 skips it);
- without F, for each held-out family F: whitened-subspace from a suite of the same size
  written in the paper's format and the three families other than F
  (--family-suite-per-family per task in each, the paper's format fills the rest), so F
  is a format that suite never saw;
- mixed S for each document share S in --shares (empty by default: measured worse than
  whitened-subspace at every share and rank).

What is measured:
1. the curve: each block at each rank of --ranks, mean over the same-family and the
   cross-format queries;
2. per-layer budgets at each byte budget of --budgets, on the paper block: uniform
   ranks (what `--budget-bytes` gives by default since this measurement), the
   suite-energy split (`--budget-split energy`, the default before), and ranks chosen by a
   greedy search that maximises the mean cross-format Spearman of three held-out
   families, reported on the fourth (leave-one-family-out) and on the same-family
   queries, none of which the choice saw;
3. suites in several families: "without F" against the paper-format suite on F's
   queries, for each F;
4. unless --skip-library: `curator sketch` builds whitened-subspace at --library-rank on
   the whole corpus, `curator fidelity` measures it (it must agree with the pass's
   point), the store is indexed (Flat) and `curator search --rerank` over the top 5% is
   run for every cross-format query.
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
from curator.catalog.records import score_files  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus, excerpt  # noqa: E402
from curator.influence.ekfac import (  # noqa: E402
    sketch_eigen_frame,
    sketch_tokens,
    subspace_bases,
    whitened_frame_bases,
    whitening_scales,
)
from curator.influence.factors import load_layer_factors  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.influence.queries import check_compatible, prepare_queries  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.model.document_pass import PassSettings, document_pass  # noqa: E402
from curator.sketch.bases import allocate_ranks, document_directions, interleave, suite_directions  # noqa: E402
from curator.sketch.build import sketch  # noqa: E402
from curator.sketch.fidelity import fidelity, ranking_agreement  # noqa: E402
from curator.sketch.store import SketchConfig  # noqa: E402

TASKS = ("arithmetic", "slope", "linear")
KEYS = ("spearman", "pearson", "top10_overlap", "top10_recall_at_5pct")
PAPER = "paper"


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


# -- agreement ---------------------------------------------------------------------------------------

def agreements(exact: np.ndarray, approx: np.ndarray) -> list[dict]:
    """ranking_agreement of every held-out query (columns of documents × queries arrays)."""
    return [ranking_agreement(exact[:, j].astype(float), approx[:, j].astype(float)) for j in range(exact.shape[1])]


def summary(found: list[dict], families: list[str]) -> dict:
    """Means over the same-family queries ("same") and the others ("cross"), and per family."""
    out = {}
    groups = {"same": [a for a, f in zip(found, families) if f == PAPER],
              "cross": [a for a, f in zip(found, families) if f != PAPER]}
    groups.update({f: [a for a, g in zip(found, families) if g == f] for f in HELD_OUT_FAMILIES})
    for group, items in groups.items():
        for key in KEYS:
            out[f"{group}_{key}"] = float(np.mean([a[key] for a in items])) if items else float("nan")
    out["cross_spearman_min"] = float(min(a["spearman"] for a in groups["cross"]))
    return out


def zscored_ranks(x: np.ndarray) -> np.ndarray:
    """Column-wise ranks, centred and scaled so that a column mean of products is Spearman's rho."""
    ranks = np.argsort(np.argsort(x, axis=0), axis=0).astype(np.float64)
    ranks -= ranks.mean(axis=0)
    return ranks / ranks.std(axis=0)


# -- per-layer budgets ---------------------------------------------------------------------------------

def rank_tables(docs: list[torch.Tensor], queries: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, T[k] = the documents × queries scores of the k × k block (k = 0 … K): the scores of
    any per-layer ranks are Σ_l T_l[k_l]. Built shell by shell (row and column k − 1 added to T[k − 1])."""
    tables = []
    for d, q in zip(docs, queries, strict=True):
        top = d.shape[1]
        t = torch.zeros(top + 1, d.shape[0], q.shape[0])
        for k in range(1, top + 1):
            t[k] = t[k - 1] + d[:, k - 1, :k] @ q[:, k - 1, :k].T
            if k > 1:
                t[k] += d[:, :k - 1, k - 1] @ q[:, :k - 1, k - 1].T
        tables.append(t)
    return tables


def choose_ranks(tables: list[torch.Tensor], exact_z: np.ndarray, dims: int, starts: list[list[int]],
                 steps=(4, 16)) -> list[int]:
    """Square per-layer ranks with Σ k² ≤ dims that maximise the mean Spearman over `exact_z`'s columns
    (zscored exact ranks of the selection queries; the tables hold those columns only): from the
    best of `starts`, hill-climb by raising one layer's rank by a step and, when over budget, lowering
    another's until it fits; stop when no move gains 1e-4."""
    top = tables[0].shape[0] - 1

    def value(ks):
        scores = sum(t[k] for t, k in zip(tables, ks, strict=True)).numpy()
        return float((zscored_ranks(scores) * exact_z).mean())

    current = max(starts, key=value)
    best = value(current)
    while True:
        moves = []
        for i in range(len(current)):
            for step in steps:
                up = list(current)
                up[i] = min(top, current[i] + step)
                if up[i] == current[i]:
                    continue
                if sum(k * k for k in up) <= dims:
                    moves.append(up)
                    continue
                for j in range(len(current)):
                    down = list(up)
                    while j != i and sum(k * k for k in down) > dims and down[j] > 1:
                        down[j] -= 1
                    if j != i and sum(k * k for k in down) <= dims:
                        moves.append(down)
        scored = [(value(m), m) for m in moves]
        if not scored or max(scored)[0] <= best + 1e-4:
            return current
        best, current = max(scored)


def budget_rows(tables, exact, families, budgets, energy, shapes) -> list[dict]:
    """Uniform, suite-energy and held-out-chosen per-layer ranks of the paper block at each budget."""
    top = tables[0].shape[0] - 1
    names = list(shapes)
    columns = {f: [j for j, g in enumerate(families) if g == f] for f in HELD_OUT_FAMILIES}
    same = [j for j, g in enumerate(families) if g == PAPER]
    rows = []
    for budget in budgets:
        dims = budget // 2
        uniform = [min(top, math.isqrt(dims // len(names)))] * len(names)
        by_energy = allocate_ranks(energy, shapes, None, budget, 2, split="energy")
        wanted = [min(by_energy[n]) for n in names]
        energy_ks = [min(top, k) for k in wanted]
        for split, ks_of in (("uniform", lambda f: uniform), ("suite energy", lambda f: energy_ks)):
            for family in HELD_OUT_FAMILIES:
                rows.append(budget_point(budget, split, family, ks_of(family), tables, exact, columns[family], same,
                                         capped=split == "suite energy" and energy_ks != wanted))
                print(json.dumps(rows[-1]), flush=True)
        for family in HELD_OUT_FAMILIES:
            chosen_on = [j for f in HELD_OUT_FAMILIES if f != family for j in columns[f]]
            sub = [t[:, :, chosen_on] for t in tables]
            ks = choose_ranks(sub, zscored_ranks(exact[:, chosen_on]), dims, [uniform, energy_ks])
            rows.append(budget_point(budget, "chosen on the other families", family, ks, tables, exact,
                                     columns[family], same, capped=False))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def budget_point(budget, split, family, ks, tables, exact, columns, same, capped) -> dict:
    scores = sum(t[k] for t, k in zip(tables, ks, strict=True)).numpy()
    held = agreements(exact[:, columns], scores[:, columns])
    own = agreements(exact[:, same], scores[:, same])
    return {"budget": budget, "split": split, "held_out": family, "ranks": ks, "bytes": 2 * sum(k * k for k in ks),
            "capped": capped, **{f"cross_{k}": float(np.mean([a[k] for a in held])) for k in KEYS},
            **{f"same_{k}": float(np.mean([a[k] for a in own])) for k in KEYS}}


# -- the run ---------------------------------------------------------------------------------------------

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
    parser.add_argument("--cross-per-family", type=int, default=4, help="per task and held-out family")
    parser.add_argument("--ranks", default="8,16,32,48,64,73,96,128,147")
    parser.add_argument("--whitened-rank", type=int, default=272,
                        help="largest rank of the paper block per layer (per-layer budgets choose within it)")
    parser.add_argument("--budgets", default="16384,65536,262144", help="bytes per document for per-layer budgets")
    parser.add_argument("--query-subspace-rank", type=int, default=96, help="largest query-subspace rank (0: none)")
    parser.add_argument("--family-suite-per-family", type=int, default=4,
                        help="suites in several families: queries per task in each family but the held-out one")
    parser.add_argument("--family-suite-ranks", default="32,48,64,73")
    parser.add_argument("--shares", default="", help="document shares of mixed bases (empty: none)")
    parser.add_argument("--document-sample", type=int, default=128)
    parser.add_argument("--library-rank", type=int, default=73, help="rank of the store built by curator sketch "
                                                                     "(73: 63,948 bytes per document)")
    parser.add_argument("--rerank-queries", type=int, default=0,
                        help="cross-format queries searched with --rerank (0: all)")
    parser.add_argument("--skip-library", action="store_true",
                        help="skip the store built by curator sketch and the search --rerank check")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="markdown file for the raw tables")
    parser.add_argument("--json", type=Path, help="every row as JSON")
    args = parser.parse_args()
    ranks = sorted(int(r) for r in args.ranks.split(","))
    family_ranks = sorted(int(r) for r in args.family_suite_ranks.split(",") if r)
    shares = [float(s) for s in args.shares.split(",") if s]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    paper_part = args.suite_per_task - (len(HELD_OUT_FAMILIES) - 1) * args.family_suite_per_family
    if family_ranks and paper_part < 1:
        raise SystemExit("--family-suite-per-family leaves no paper-format query in a suite of --suite-per-task")
    whitened_top = max(args.whitened_rank, ranks[-1])
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
                    if family_ranks:
                        store_queries(catalog, generate(task, args.family_suite_per_family, seed=0, family=family))
            held = select_queries(catalog, ",".join(held_sets))
            suite = select_queries(catalog, ",".join(suite_sets))
            # The queries that span some basis, in groups: a block's suite is a union of groups.
            first = {q.id for task in TASKS for q in generate(task, paper_part, seed=0)} if family_ranks else set()
            groups = {PAPER: [q for q in suite if q.id in first] or suite,
                      "paper, rest": [q for q in suite if first and q.id not in first]}
            if family_ranks:
                groups.update({f: select_queries(catalog, ",".join(f"{task}-{f}-s0" for task in TASKS))
                               for f in HELD_OUT_FAMILIES})
        members = {PAPER: [PAPER, "paper, rest"]}
        if family_ranks:
            members.update({f"without {f}": [PAPER, *(g for g in HELD_OUT_FAMILIES if g != f)]
                            for f in HELD_OUT_FAMILIES})
        families = [family_of(q) for q in held]
        print(f"{len(ids)} documents {sources}; suite {len(suite)}, held out {len(held)}; suites: "
              f"{ {b: sum(len(groups[g]) for g in parts) for b, parts in members.items()} }", flush=True)

        t = time.perf_counter()
        record = fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len,
                                   max_docs=args.fit_docs, device=args.device, batch_tokens=args.batch_tokens),
                     loaded=lm).record
        timings["fit"] = time.perf_counter() - t
        t = time.perf_counter()
        result = score(ws, ScoreConfig(queries=",".join(q.id for q in held), device=args.device, query_rank="dense",
                                       batch_tokens=args.batch_tokens), loaded=lm)
        frame = pl.read_parquet(score_files(result.out_path))
        position = {d: i for i, d in enumerate(ids)}
        exact = np.zeros((len(ids), len(held)))
        for column, query in enumerate(held):
            mine = frame.filter(pl.col("query_id") == query.id)
            exact[[position[int(d)] for d in mine["doc_id"]], column] = mine["score"].to_numpy()
        timings["exact scores"] = time.perf_counter() - t
        print(f"fit and exact scores: {timings}", flush=True)

        # -- the bases of every block, each at its largest rank -------------------------------------------
        t = time.perf_counter()
        modules = check_compatible(lm, record, None)
        factors = {name: f.to(lm.device) for name, f in load_layer_factors(ws, record).items()}
        cpu = {name: f.to("cpu") for name, f in factors.items()}
        blocks: dict[str, dict[str, tuple]] = {}
        # Every query that spans a basis is prepared once; a block's Gram matrices are sums of its groups'.
        spanning = [q for group in groups.values() for q in group]
        bounds = np.cumsum([0, *(len(group) for group in groups.values())])
        rows = {g: list(range(bounds[i], bounds[i + 1])) for i, g in enumerate(groups)}
        prepared, _ = prepare_queries(lm, modules, factors, spanning, args.max_seq_len, "auto", None,
                                      args.batch_tokens, eigen_frame=True)
        print(f"{len(spanning)} spanning queries prepared ({time.perf_counter() - t:.0f} s)", flush=True)
        tops = {b: (whitened_top if b == PAPER else family_ranks[-1]) for b in members}
        for b in members:
            blocks[b] = {}
        for name in modules:
            d_s, d_a = whitening_scales(cpu[name])
            grams = {}
            for g, r in rows.items():
                if not r:
                    continue
                w = d_s[:, None] * prepared[name][r].cpu().to(torch.float64) * d_a[None, :]
                flat = w.permute(1, 0, 2).reshape(w.shape[1], -1)
                grams[g] = (flat @ flat.T, w.reshape(-1, w.shape[2]).T @ w.reshape(-1, w.shape[2]))
                del w, flat
            for b, parts in members.items():
                left = sum(grams[g][0] for g in parts if g in grams)
                right = sum(grams[g][1] for g in parts if g in grams)
                u = torch.linalg.eigh(left)[1].flip(-1)[:, :min(tops[b], left.shape[0])]
                v = torch.linalg.eigh(right)[1].flip(-1)[:, :min(tops[b], right.shape[0])]
                (u, v), (uq, vq) = whitened_frame_bases(u, v, cpu[name])
                blocks[b][name] = (u, v, uq, vq)
            del grams
        print(f"whitened bases ({time.perf_counter() - t:.0f} s)", flush=True)
        paper_rows = rows[PAPER] + rows["paper, rest"]
        energy = {name: float((p[paper_rows].double() ** 2).sum()) for name, p in prepared.items()}
        shapes = {name: tuple(p.shape[1:]) for name, p in prepared.items()}
        if args.query_subspace_rank:
            blocks["query-subspace"] = {}
            for name in modules:
                u, v = subspace_bases(prepared[name][paper_rows].cpu(), cpu[name],
                                      *(min(args.query_subspace_rank, d) for d in shapes[name]))
                blocks["query-subspace"][name] = (u, v, u, v)
        if shares:
            config = SketchConfig(suite=",".join(suite_sets), method="mixed", rank=ranks[-1],
                                  document_sample=args.document_sample, batch_tokens=args.batch_tokens)
            documents = document_directions(lm, modules, ws, factors, config, args.max_seq_len)
            for share in shares:
                blocks[f"mixed {share}"] = {}
                for name in modules:
                    first, second = suite_directions(prepared[name][paper_rows].cpu(), cpu[name])
                    u = interleave(first, documents[name][0], min(ranks[-1], shapes[name][0]), share)
                    v = interleave(second, documents[name][1], min(ranks[-1], shapes[name][1]), share)
                    (u, v), (uq, vq) = whitened_frame_bases(u, v, cpu[name])
                    blocks[f"mixed {share}"][name] = (u, v, uq, vq)
        del prepared
        timings["bases"] = time.perf_counter() - t

        # -- one document pass sketches every block ---------------------------------------------------------
        sizes = {(b, n): (basis[n][0].shape[1], basis[n][1].shape[1]) for b, basis in blocks.items() for n in modules}
        bounds = np.cumsum([0, *(a * c for a, c in sizes.values())])
        offsets = {key: (int(bounds[i]), int(bounds[i + 1])) for i, key in enumerate(sizes)}
        sketches = {key: np.zeros((len(ids), *size), dtype=np.float32) for key, size in sizes.items()}
        on_device = {(b, n): (basis[n][0].to(lm.device), basis[n][1].to(lm.device))
                     for b, basis in blocks.items() for n in modules}
        print(f"pass width {int(bounds[-1]):,} floats per document "
              f"({int(bounds[-1]) * 4 * len(ids) / 2**30:.2f} GiB)", flush=True)

        def pass_layer(name, a, delta, _batch, output):
            for b in blocks:
                lo, hi = offsets[(b, name)]
                output[:, lo:hi] = sketch_tokens(a, delta, *on_device[(b, name)]).reshape(output.shape[0], -1)

        def keep(_number, chunk, sums):
            rows = [position[d] for d in chunk]
            values = sums.numpy()
            for key, (lo, hi) in offsets.items():
                sketches[key][rows] = values[:, lo:hi].reshape(len(rows), *sizes[key])

        t = time.perf_counter()
        with Catalog.open(ws) as catalog:
            document_pass(lm.model, modules, lm.tokenizer, catalog, ids, PassSettings(
                max_len=args.max_seq_len, batch_tokens=args.batch_tokens, chunk_docs=32), pass_layer,
                width=int(bounds[-1]), on_chunk=keep, description="sketches of every block")
        timings["document pass"] = time.perf_counter() - t
        held_m, _ = prepare_queries(lm, modules, factors, held, args.max_seq_len, "auto", None, args.batch_tokens,
                                    eigen_frame=True)
        query_sketches = {}
        for name in modules:
            m = held_m.pop(name).cpu()
            for b in blocks:
                u, v, uq, vq = blocks[b][name]
                query_sketches[(b, name)] = sketch_eigen_frame(m, cpu[name], uq, vq)
            del m

        # -- 1. the curve, and 3. suites in several families ------------------------------------------------
        t = time.perf_counter()
        docs = {key: torch.from_numpy(s) for key, s in sketches.items()}
        per_query = {}
        curve = []
        for b in blocks:
            wanted = family_ranks if b.startswith("without") else ranks
            top = min(min(sizes[(b, n)]) for n in modules)
            for k in [r for r in wanted if r <= top]:
                scores = sum(docs[(b, n)][:, :k, :k].reshape(len(ids), -1)
                             @ query_sketches[(b, n)][:, :k, :k].reshape(len(held), -1).T for n in modules)
                per_query[(b, k)] = agreements(exact, scores.numpy())
                bytes_per_doc = 2 * sum(min(k, sizes[(b, n)][0]) * min(k, sizes[(b, n)][1]) for n in modules)
                curve.append({"basis": b, "rank": k, "bytes": bytes_per_doc, **summary(per_query[(b, k)], families)})
                print(json.dumps(curve[-1]), flush=True)
        timings["curve"] = time.perf_counter() - t

        # -- 2. per-layer budgets --------------------------------------------------------------------------
        t = time.perf_counter()
        tables = rank_tables([docs[(PAPER, n)] for n in modules], [query_sketches[(PAPER, n)] for n in modules])
        docs = sketches = None
        budget = budget_rows(tables, exact, families, budgets, energy, shapes)
        tables = None
        timings["per-layer budgets"] = time.perf_counter() - t

        # -- 4. the library path ---------------------------------------------------------------------------
        check, rerank_rows = None, []
        if not args.skip_library:
            # What is measured so far, in case the library step does not finish.
            timings["total"] = time.perf_counter() - started
            report(args, curve, budget, ids, sources, held, record, check, rerank_rows, timings, sizes, lm,
                   paper_part)
            t = time.perf_counter()
            store = sketch(ws, SketchConfig(suite=",".join(suite_sets), method="whitened-subspace",
                                            rank=args.library_rank, batch_tokens=args.batch_tokens), loaded=lm)
            timings["library store"] = time.perf_counter() - t
            t = time.perf_counter()
            measured = fidelity(ws, store, lm, held, sample=len(ids))
            timings["library fidelity"] = time.perf_counter() - t
            pool_point = [r for r in curve if r["basis"] == PAPER and r["rank"] == args.library_rank]
            check = {"store": store.id, "bytes_per_doc": store.bytes_per_doc,
                     "library": {g: measured["groups"][g]["mean"] for g in measured["groups"]}, "pool": pool_point}
            print(json.dumps(check, indent=1), flush=True)
            cross = [q for q in held if family_of(q) != PAPER]
            if args.rerank_queries:
                cross = cross[::max(1, len(cross) // args.rerank_queries)][:args.rerank_queries]
            t = time.perf_counter()
            rerank_rows = rerank_check(ws, store, lm, cross, frame, math.ceil(0.05 * len(ids)))
            timings["rerank check"] = time.perf_counter() - t
            print(rerank_rows, flush=True)

    timings["total"] = time.perf_counter() - started
    report(args, curve, budget, ids, sources, held, record, check, rerank_rows, timings, sizes, lm, paper_part)


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


# -- the report ------------------------------------------------------------------------------------------

def report(args, curve, budget, ids, sources, held, record, check, rerank_rows, timings, sizes, lm,
           paper_part) -> None:
    cross_n = sum(family_of(q) != PAPER for q in held)
    five = math.ceil(0.05 * len(ids))
    lines = [
        f"Model {lm.info.name}; {len(ids):,} documents ("
        + ", ".join(f"{name} {n}" for name, n in sorted(sources.items()))
        + f"), each cut to {args.max_chars} characters, windows of {args.max_seq_len} tokens; MLPs of "
        f"{args.layers} ({len(record.modules)} linears), EK-FAC fitted on {args.fit_docs} documents. Suite: "
        f"{args.suite_per_task} queries per task (arithmetic, slope, linear) in the paper's format, seed 0. Held "
        f"out: {len(held) - cross_n} same-family queries (paper format, seed 1) and {cross_n} cross-format "
        f"queries ({args.cross_per_family} per task in each of terse, prose, code, chat; seed 1). Rank k is "
        f"k × k per layer (float16 bytes). \"Top 10 in top 5%\" is the share of the exact top 10 among the "
        f"sketch's top {five} documents: what `search --rerank {five}` returns.",
        "",
        "**1. The curve** (paper: whitened-subspace; mean over queries, worst cross-format query in brackets)",
        "",
        "| basis | rank | bytes/doc | Spearman same | Spearman cross (min) | Pearson cross | top-10 overlap "
        "same | top-10 overlap cross | top 10 in top 5%: same | cross |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['basis']} | {r['rank']} | {r['bytes']:,} | {r['same_spearman']:.3f} | {r['cross_spearman']:.3f} "
          f"({r['cross_spearman_min']:.2f}) | {r['cross_pearson']:.3f} | {r['same_top10_overlap']:.2f} "
          f"| {r['cross_top10_overlap']:.2f} | {r['same_top10_recall_at_5pct']:.2f} "
          f"| {r['cross_top10_recall_at_5pct']:.2f} |"
          for r in curve if not r["basis"].startswith("without")),
    ]
    if budget:
        lines += [
            "", "**2. Per-layer budgets** (paper suite, whitened-subspace). Ranks per layer in module order "
            "(" + ", ".join(n.split(".", 2)[-1] for n in record.modules) + "). Each row is scored on one held-out "
            "family; \"chosen\" ranks were picked on the other three families' queries (greedy, mean Spearman) "
            "and never saw the family scored nor the same-family queries. * : the energy split wanted more than "
            f"rank {args.whitened_rank} in a layer and was capped.",
            "",
            "| budget | split | held-out family | ranks | bytes/doc | Spearman cross | top 10 in top 5% cross "
            "| Spearman same | top 10 in top 5% same |",
            "|---|---|---|---|---|---|---|---|---|",
            *(f"| {r['budget']:,} | {r['split']} | {r['held_out']} | {','.join(map(str, r['ranks']))}"
              f"{'*' if r['capped'] else ''} | {r['bytes']:,} | {r['cross_spearman']:.3f} "
              f"| {r['cross_top10_recall_at_5pct']:.2f} | {r['same_spearman']:.3f} "
              f"| {r['same_top10_recall_at_5pct']:.2f} |" for r in budget),
            "", "Means over the four held-out families:", "",
            "| budget | split | Spearman cross | top 10 in top 5% cross | Spearman same |",
            "|---|---|---|---|---|",
        ]
        table = pl.DataFrame([{k: v for k, v in r.items() if k != "ranks"} for r in budget])
        for (b, split), group in table.group_by(["budget", "split"], maintain_order=True):
            lines.append(f"| {b:,} | {split} | {group['cross_spearman'].mean():.3f} "
                         f"| {group['cross_top10_recall_at_5pct'].mean():.2f} | {group['same_spearman'].mean():.3f} |")
    several = [r for r in curve if r["basis"].startswith("without")]
    if several:
        paper_rows = {r["rank"]: r for r in curve if r["basis"] == PAPER}
        lines += [
            "", f"**3. Suites in several families.** \"without F\": {args.suite_per_task} queries per task, "
            f"{paper_part} in the paper's format and {args.family_suite_per_family} in each family but F (seed 0); "
            f"scored on F's held-out queries, a format it never saw, against the paper-format suite of "
            f"{args.suite_per_task} per task on the same queries. Spearman (top 10 in top 5%).",
            "",
            "| rank | bytes/doc | held-out family | paper-format suite | suite without F | same-family: paper suite "
            "| same-family: suite without F |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in sorted({r["rank"] for r in several}):
            means = {"paper": [], "several": []}
            for family in HELD_OUT_FAMILIES:
                mine = next(r for r in several if r["rank"] == k and r["basis"] == f"without {family}")
                base = paper_rows.get(k)
                if base is None:
                    continue
                means["paper"].append(base[f"{family}_spearman"])
                means["several"].append(mine[f"{family}_spearman"])
                lines.append(f"| {k} | {mine['bytes']:,} | {family} | {base[f'{family}_spearman']:.3f} "
                             f"({base[f'{family}_top10_recall_at_5pct']:.2f}) | {mine[f'{family}_spearman']:.3f} "
                             f"({mine[f'{family}_top10_recall_at_5pct']:.2f}) | {base['same_spearman']:.3f} "
                             f"| {mine['same_spearman']:.3f} |")
            if means["paper"]:
                lines.append(f"| {k} | | **mean** | **{np.mean(means['paper']):.3f}** "
                             f"| **{np.mean(means['several']):.3f}** | | |")
    if check is not None:
        recovered = [r["recovered"] for r in rerank_rows]
        lines += [
            "",
            f"**4. Library check**: `curator sketch` built store {check['store']} ({check['bytes_per_doc']:,} bytes "
            f"per document) and `curator fidelity` measured on it: "
            + "; ".join(f"{g}: Spearman {m['spearman']:.3f}, top-10 overlap {m['top10_overlap']:.2f}, top 10 in "
                        f"top 5% {m['top10_recall_at_5pct']:.2f}" for g, m in check["library"].items())
            + " (float16; the pass's float32 point: "
            + "; ".join(f"same {p['same_spearman']:.3f}, cross {p['cross_spearman']:.3f}, cross top 10 in top 5% "
                        f"{p['cross_top10_recall_at_5pct']:.2f}" for p in check["pool"]) + ").",
            "",
            f"`curator search --rerank {five}` (Flat index) on {len(rerank_rows)} cross-format queries: mean share of "
            f"the exact top 10 returned {np.mean(recovered):.3f} (" + ", ".join(
                f"{r['query']} {r['recovered']:.1f}" for r in rerank_rows) + ")."]
    lines += [
        "",
        "Largest rank per block and layer: " + "; ".join(
            f"{b} {max(a for (c, _), (a, _) in sizes.items() if c == b)}" for b in dict.fromkeys(c for c, _ in sizes))
        + ".",
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
        args.json.write_text(json.dumps({"curve": curve, "budgets": budget, "library": check,
                                         "rerank": rerank_rows}, indent=1))


if __name__ == "__main__":
    main()
