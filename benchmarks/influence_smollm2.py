"""EK-FAC fit + exact scoring throughput on SmolLM2-135M, against a plain training pass.

    python benchmarks/influence_smollm2.py [--docs 64] [--max-seq-len 256] [--layers last:8]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--shape DIR] [--record docs/benchmarks.md]

Documents are real text (standard-library modules, ingested into a temporary
workspace); 16 queries of the paper's three reasoning tasks. The baseline,
measured in the same run over exactly the same padded batches, is a plain
training forward + backward of the whole model (weight gradients, no hooks):
what one step of ordinary training costs on these documents.

With --shape DIR the model is built from the config and tokenizer saved in DIR
with random weights (speed does not depend on the weights); that is how it
runs on a GPU machine where the real weights do not travel. Make DIR with
--save-shape DIR on a machine that has the model.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curator.catalog.database import Catalog  # noqa: E402
from curator.demo import stdlib_paths  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.model.losses import sequence_losses  # noqa: E402
from curator.model.loading import load_model, wrap_model  # noqa: E402
from curator.model.document_pass import document_batches  # noqa: E402
from curator.catalog.queries import store_queries  # noqa: E402
from curator.catalog.querygen import generate  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.catalog.database import create_workspace  # noqa: E402

BEGIN, END = "<!-- influence_smollm2:begin -->", "<!-- influence_smollm2:end -->"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_pass(lm, ws, ids, max_len, batch_tokens, device) -> tuple[float, int]:
    """A plain training forward + backward over the same batches: weight gradients of every parameter."""
    model = lm.model
    model.requires_grad_(True)
    tokens = 0
    with Catalog.open(ws) as catalog:
        batches = [b for _, b in document_batches(catalog, lm.tokenizer, ids, max_len, batch_tokens, device, {})
                   if b is not None]
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        sequence_losses(model, batch).sum().backward()
        tokens += batch.tokens
    synchronize(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return elapsed, tokens


def build_model(args):
    if args.shape:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(args.shape)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(args.shape)
        return wrap_model(model, tokenizer, name=f"random-init {args.shape}", device=args.device, dtype=args.dtype)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--save-shape", type=Path, help="write the model's config + tokenizer here and exit")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--max-chars", type=int, default=3000, help="only documents up to this size")
    parser.add_argument("--layers", default="last:8")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--query-rank", type=int, default=None)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()

    if args.save_shape:
        lm = load_model(args.model)
        lm.model.config.save_pretrained(args.save_shape)
        lm.tokenizer.save_pretrained(args.save_shape)
        print(f"saved config and tokenizer of {args.model} to {args.save_shape}")
        return

    started = time.perf_counter()
    lm = build_model(args)
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        ws, _ = create_workspace(Path(tmp) / "ws")
        ingest(ws, stdlib_paths(), IngestOptions(source="stdlib", kind="code", glob="*.py"))
        with Catalog.open(ws, write=True) as catalog:
            per_task = [args.queries // 3 + (i < args.queries % 3) for i in range(3)]
            for task, n in zip(("arithmetic", "slope", "linear"), per_task, strict=True):
                store_queries(catalog, generate(task, n, seed=0))
        with Catalog.open(ws) as catalog:
            # Modules of moderate size (a few windows each), a seeded sample of them.
            ids = sorted(r[0] for r in catalog.sql(
                "SELECT id FROM documents WHERE chars BETWEEN 500 AND ? ORDER BY hash(id, 0), id LIMIT ?",
                [args.max_chars, args.docs]))

        baseline_s, tokens = baseline_pass(lm, ws, ids, args.max_seq_len, args.batch_tokens, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        # The same documents for fit and scoring: the benchmark's sample is the whole catalog.
        with Catalog.open(ws, write=True) as catalog:
            catalog.sql("DELETE FROM document_rows WHERE id NOT IN (SELECT unnest(?))", [ids])
        fit_config = FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len,
                               device=args.device, dtype=args.dtype, batch_tokens=args.batch_tokens)
        record = fit(ws, fit_config, loaded=lm).record
        run = score(ws, ScoreConfig(query_rank=args.query_rank or "dense", device=args.device,
                                    dtype=args.dtype, batch_tokens=args.batch_tokens), loaded=lm)
        peak = peak_memory_mb(args.device)

    fit_s, score_s = record.stats["seconds"], run.stats["seconds"]
    n = len(ids)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows = [
        ("model", f"{lm.info.name} ({lm.info.parameters / 1e6:.0f}M parameters, {args.dtype})"),
        ("documents", f"{n} stdlib modules, {tokens:,} tokens in windows of {args.max_seq_len}"),
        ("tracked", f"MLPs of {args.layers} ({len(record.modules)} linears); {run.stats['queries']} queries"
                    + (f", rank {args.query_rank}" if args.query_rank else ", dense")),
        ("baseline: plain forward+backward", f"{baseline_s:.1f} s, {n / baseline_s:.2f} docs/s"),
        ("fit pass 1 (covariances)", f"{fit_s['covariances']:.1f} s, {n / fit_s['covariances']:.2f} docs/s, "
                                     f"{fit_s['covariances'] / baseline_s:.2f}× baseline"),
        ("fit eigendecomposition", f"{fit_s['eigendecomposition']:.1f} s"),
        ("fit pass 2 (eigenvalue correction)", f"{fit_s['eigenvalue correction']:.1f} s, "
                                               f"{n / fit_s['eigenvalue correction']:.2f} docs/s, "
                                               f"{fit_s['eigenvalue correction'] / baseline_s:.2f}× baseline"),
        ("score: query gradients", f"{score_s['query gradients']:.1f} s"),
        ("score: document pass", f"{score_s['document pass']:.1f} s, {n / score_s['document pass']:.2f} docs/s, "
                                 f"{score_s['document pass'] / baseline_s:.2f}× baseline"),
        ("model load", f"{load_s:.1f} s"),
        ("peak memory", f"{peak:,.0f} MB ({'GPU allocated' if args.device.startswith('cuda') else 'RSS'})"),
        ("machine", f"{platform.system()} {platform.machine()}, {device_name}, "
                    f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.record:
        record_rows(args.record, rows, args)


def record_rows(path: Path, rows, args) -> None:
    label = f"{args.device}, {args.dtype}"
    begin, end = BEGIN.replace("begin", f"begin {label}"), END.replace("end", f"end {label}")
    command = " ".join(["python benchmarks/influence_smollm2.py", *sys.argv[1:]]).replace(
        f" --record {args.record}", "")
    section = "\n".join([begin, f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.", "",
                         "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        heading = "## EK-FAC fit and exact scoring: SmolLM2-135M"
        if heading not in text:
            text = text.rstrip() + f"\n\n{heading}\n\nTimes are per stage over the same documents; ratios " \
                                   "divide by the baseline's time (above 1× is slower than plain training).\n"
        text = text.rstrip() + f"\n\n### {label}\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
