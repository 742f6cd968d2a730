"""Distributed scaling of the model passes: `curator fit` and exact `curator score` under torchrun with
1, 2, … processes on the same documents, measured in one run.

    python benchmarks/distributed_scaling.py [--model smollm2-135m | --shape DIR] [--ranks 1,2]
        [--threads 1] [--docs 32] [--device cpu|cuda] [--record docs/benchmarks.md]

Each process gets `--threads` torch threads (default 1), so on a CPU the processes do not share
cores and the ratio is honest. On GPUs each rank takes one GPU (`--device cuda`). With `--shape`
(a folder with a config and tokenizer, e.g. from `influence_smollm2.py --save-shape`) the model
has random weights of that shape, saved next to the workspace: what travels to a GPU machine is
the shape, not the weights.

Reported per world size: the time of each pass as the job sees it (the slowest rank's pass and
the all-reduce), documents per second, per process, and the scaling efficiency
(docs/s at N processes ÷ N × docs/s at one). The baseline is the one-process run of the same
command in the same run. The factors and scores of every world size are compared with the
one-process ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recording import record_section  # noqa: E402

from curator.catalog.database import Catalog, create_workspace  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.catalog.queries import store_queries  # noqa: E402
from curator.catalog.querygen import generate  # noqa: E402
from curator.catalog.records import score_files  # noqa: E402
from curator.catalog.workspace import Workspace  # noqa: E402
from curator.constants import REASONING_TASKS  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus  # noqa: E402
from curator.influence.factors import load_tensors  # noqa: E402

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def random_model(shape: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape).save_pretrained(out)
    return out


def prepare(tmp: Path, args) -> Path:
    ws, _ = create_workspace(tmp / "base")
    corpus = build_demo_corpus(tmp / "corpus", DemoSettings(docs_per_source=args.docs, max_chars=args.max_chars,
                                                            factual_queries=1))
    for source in corpus.sources:
        ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
    with Catalog.open(ws, write=True) as catalog:
        for task in REASONING_TASKS:
            store_queries(catalog, generate(task, -(-args.queries // len(REASONING_TASKS)), seed=0))
    return ws.root


def torchrun(ranks: int, threads: int, *args) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CURATOR_DIST_TIMEOUT": "3600"}
    start = time.perf_counter()
    result = subprocess.run([TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "-m", "curator",
                             *map(str, args)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"torchrun {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def measure(base: Path, tmp: Path, ranks: int, model: str, args) -> dict:
    root = tmp / f"ranks-{ranks}"
    shutil.copytree(base, root)
    common = ["--device", args.device, "--dtype", args.dtype, "--batch-tokens", str(args.batch_tokens),
              "--chunk-docs", str(args.chunk_docs), "-w", root]
    fit_wall = torchrun(ranks, args.threads, "fit", "--model", model, "--layers", args.layers,
                        "--max-seq-len", str(args.max_seq_len), *common)
    score_wall = torchrun(ranks, args.threads, "score", "--out", root / "scores", *common)
    with Catalog.open(Workspace(root)) as catalog:
        fit_stats = json.loads(catalog.one("SELECT stats FROM factors")[0])
        run_stats = json.loads(catalog.one("SELECT stats FROM runs")[0])
    (factors_path,) = (root / "factors").glob("fit-*.safetensors")
    return {"ranks": ranks, "fit_wall": fit_wall, "score_wall": score_wall, "fit": fit_stats, "run": run_stats,
            "factors": load_tensors(factors_path)[0],
            "scores": pl.read_parquet(score_files(root / "scores")).sort(["query_id", "doc_id"])}


def agreement(one: dict, other: dict) -> tuple[float, float]:
    """Largest relative difference of Λ over layers, and of the scores, against the one-process run."""
    lam = max(float((other["factors"][n]["corrected"] - t["corrected"]).abs().max() / t["corrected"].abs().max())
              for n, t in one["factors"].items())
    a, b = one["scores"]["score"].to_numpy(), other["scores"]["score"].to_numpy()
    return lam, float(np.abs(a - b).max() / np.abs(a).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--docs", type=int, default=8, help="documents per demo source (5 sources)")
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--layers", default="last:4")
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--chunk-docs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(random_model(args.shape, tmp / "model")) if args.shape else args.model
        base = prepare(tmp, args)
        results = []
        for ranks in [int(r) for r in args.ranks.split(",")]:
            results.append(measure(base, tmp, ranks, model, args))
            r = results[-1]
            print(f"{ranks} ranks: fit {r['fit_wall']:.1f} s, score {r['score_wall']:.1f} s", flush=True)
    one = results[0]
    docs = one["run"]["documents"]
    fit_one = sum(one["fit"]["seconds"][k] for k in ("covariances", "eigenvalue correction"))
    lines = [
        f"`curator fit` (two passes) and exact `curator score` ({one['run']['queries']} queries, one pass) of "
        f"{docs} demo-corpus documents ({one['run']['tokens']:,} tokens in windows of {args.max_seq_len}), MLPs "
        f"of {args.layers}, model {args.shape or args.model}{' (random weights)' if args.shape else ''}, "
        f"{args.dtype}, {args.threads} torch thread(s) per process, launched with torchrun.", "",
        "| processes | fit passes (s) | fit docs/s | per process | efficiency | score pass (s) | score docs/s | "
        "per process | efficiency | wall fit + score (s) | max rel. diff Λ / scores vs 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n = r["ranks"]
        fit_s = sum(r["fit"]["seconds"][k] for k in ("covariances", "eigenvalue correction"))
        fit_rate, fit_rate_one = docs / fit_s, docs / fit_one
        score_rate = r["run"]["docs_per_second"]
        lam, scores = agreement(one, r)
        lines.append(
            f"| {n} | {fit_s:.1f} | {fit_rate:.2f} | {fit_rate / n:.2f} | {fit_rate / (n * fit_rate_one):.0%} | "
            f"{docs / score_rate:.1f} | {score_rate:.2f} | {score_rate / n:.2f} | "
            f"{score_rate / (n * one['run']['docs_per_second']):.0%} | {r['fit_wall'] + r['score_wall']:.1f} | "
            f"{lam:.1e} / {scores:.1e} |")
    lines += [
        "",
        "Fit passes: the time rank 0 spent in both passes including the all-reduces, which wait for the "
        "slowest rank. Score pass: the slowest rank's document pass. Wall time includes starting the "
        "processes and loading the model in each.",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}, torch "
        f"{torch.__version__}; load average before the run {load[0]:.1f}, "
        f"{load[1]:.1f}, {load[2]:.1f}.",
    ]
    print("\n".join(lines))
    if args.record:
        record_section(args.record, f"distributed_scaling_{args.device}", f"Distributed scaling: {args.device}",
                       "distributed_scaling.py", lines)


if __name__ == "__main__":
    main()
