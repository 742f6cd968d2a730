"""Exact suite scoring (100 queries, query gradients kept as `curator score` keeps them by default)
against a plain forward + backward and against kronfluence's pairwise scores of the same queries and
documents.

    python benchmarks/suite_scoring.py [--docs-per-source 40] [--sizes 32,128] [--queries 100]
        [--query-rank auto] [--layers last:2] [--max-seq-len 256] [--device cpu] [--record docs/benchmarks.md]

Documents are the demo corpus's, each within one window, so that both tools
score the same sequences. Both fit EK-FAC with the empirical Fisher on the
largest set of documents and modules (fit times are printed, not compared).
Compared is what a user waits for once factors exist: scoring every (query,
document) pair, query gradients and their preconditioning included. Each tool
scores the first N documents for every N of --sizes; the difference between two
sizes is the cost of documents alone, so the report gives both the end-to-end
time at each size and the documents/s of a large corpus, where the suite's
fixed cost no longer counts. kronfluence gets every query in one batch (one pass
over the documents, its fastest setting) and batches padded to their own longest
row (curator also sorts windows by length before batching). Every time is the
fastest of --repeats runs (the machine may be shared). With --dtype
bfloat16 both tools form per-document gradients and their products with the
queries in bfloat16 (kronfluence's per_sample_gradient_dtype and score_dtype);
preconditioning and the queries' SVDs stay in float32 in both. The baseline is
a plain training forward + backward over curator's document batches, in the
same run. The Pearson correlation of the two score matrices is printed as a
check that the same thing was computed.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from influence_smollm2 import baseline_pass, build_model, synchronize  # noqa: E402
from recording import record_section  # noqa: E402

from curator.catalog.database import Catalog  # noqa: E402
from curator.catalog.documents import document_ids, read_texts  # noqa: E402
from curator.demo import DemoSettings, build_demo_corpus  # noqa: E402
from curator.influence.fit import FitConfig, fit  # noqa: E402
from curator.catalog.ingest import IngestOptions, ingest  # noqa: E402
from curator.model.losses import sequence_losses  # noqa: E402
from curator.model.loading import tracked_modules  # noqa: E402
from curator.model.document_pass import document_batches  # noqa: E402
from curator.catalog.queries import select_queries, store_queries  # noqa: E402
from curator.catalog.querygen import generate  # noqa: E402
from curator.influence.score import ScoreConfig, score  # noqa: E402
from curator.catalog.database import create_workspace  # noqa: E402
from curator.catalog.records import score_files  # noqa: E402

TASKS = ("arithmetic", "slope", "linear")


def kronfluence_scores(rank, args, docs: list[str], queries, sizes: list[int], tmp: Path
                       ) -> tuple[np.ndarray, float, dict[int, float]]:
    """kronfluence's pairwise EK-FAC scores (queries × all documents), its fit seconds, and its scoring
    seconds for the first N documents, for each N of `sizes`."""
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    lm = build_model(args)
    tokenizer, model = lm.tokenizer, lm.model
    modules = list(tracked_modules(model, "mlp", args.layers))

    class SummedLoss(kronfluence.Task):
        def _loss(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")

        def compute_train_loss(self, batch, model, sample=False):
            return self._loss(batch, model)

        def compute_measurement(self, batch, model):
            return self._loss(batch, model)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    def padded(rows):
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        items = []
        for ids, first_target in rows:
            n = len(ids)
            input_ids = torch.full((width,), pad, dtype=torch.long)
            input_ids[:n] = torch.tensor(ids)
            mask = torch.zeros(width, dtype=torch.long)
            mask[:n] = 1
            labels = torch.full((width,), -100, dtype=torch.long)
            labels[first_target:n] = input_ids[first_target:n]
            items.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
        return items

    train = padded([(tokenizer(text)["input_ids"], 1) for text in docs])
    query_rows = []
    for q in queries:
        prompt = tokenizer(q.prompt + "\n")["input_ids"]
        query_rows.append((prompt + tokenizer(q.completion, add_special_tokens=False)["input_ids"], len(prompt)))
    query = padded(query_rows)

    def trimmed(items):
        """Stack a batch and cut the columns that are padding in every row, as a padding collator does."""
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        width = int(batch["attention_mask"].sum(dim=1).max())
        return {key: value[:, :width] for key, value in batch.items()}

    task = SummedLoss()
    model = prepare_model(model, task)
    analyzer = Analyzer("bench", model, task, cpu=args.device == "cpu", disable_tqdm=True,
                        output_dir=str(tmp / "kronfluence"))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=trimmed))
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=8,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    fit_s = time.perf_counter() - start
    model_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    seconds = {}
    for n, repeat in [(n, r) for r in range(args.repeats) for n in sizes]:
        synchronize(args.device)
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(f"scores-{n}-{repeat}", "ekfac", query, train[:n],
                                         per_device_query_batch_size=len(query), per_device_train_batch_size=8,
                                         score_args=ScoreArguments(
                                             damping_factor=None, query_gradient_low_rank=rank,
                                             # The document side in the model's dtype, as curator does it.
                                             per_sample_gradient_dtype=model_dtype, score_dtype=model_dtype))
        synchronize(args.device)
        seconds[n] = min(seconds.get(n, math.inf), time.perf_counter() - start)
    scores = analyzer.load_pairwise_scores(f"scores-{sizes[-1]}-0")["all_modules"].double().numpy()
    return scores, fit_s, seconds


def _rank_setting(text: str):
    return text if text in ("auto", "dense") else int(text)


def forward_pass(lm, ws, ids, max_len, batch_tokens, device) -> float:
    """Seconds for the forward alone (logits and losses, no backward) over the same batches: the part
    of every document pass that no scorer can skip."""
    with Catalog.open(ws) as catalog:
        batches = [b for _, b in document_batches(catalog, lm.tokenizer, ids, max_len, batch_tokens, device, {})
                   if b is not None]
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            sequence_losses(lm.model, batch)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, help="folder with config + tokenizer; random weights")
    parser.add_argument("--docs-per-source", type=int, default=40)
    parser.add_argument("--sizes", default="32,128", help="document counts to score, smallest first")
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--query-rank", default="auto",
                        help="auto (curator's default: the suite in one pass), dense, or K; kronfluence gets the "
                             "rank curator chose")
    parser.add_argument("--layers", default="last:2")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2,
                        help="score each size this many times per tool and keep the fastest (the CPU is shared)")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--section", default="suite_scoring",
                        help="name of the docs/benchmarks.md section to replace (one per dtype or device)")
    args = parser.parse_args()

    lm = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ws, _ = create_workspace(tmp / "ws")
        corpus = build_demo_corpus(tmp / "corpus", DemoSettings(docs_per_source=args.docs_per_source,
                                                                max_chars=args.max_chars, factual_queries=1))
        for source in corpus.sources:
            ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
        with Catalog.open(ws, write=True) as catalog:
            # One window per document, so that kronfluence sees the same sequences.
            rows = [r for part in read_texts(catalog, document_ids(catalog)) for r in part]
            keep = [(i, t) for i, t in rows if len(lm.tokenizer(t)["input_ids"]) <= args.max_seq_len]
            catalog.sql("DELETE FROM document_rows WHERE id NOT IN (SELECT unnest(?))", [[i for i, _ in keep]])
            per_task = -(-args.queries // len(TASKS))
            for task in TASKS:
                store_queries(catalog, generate(task, per_task, seed=0))
            queries = select_queries(catalog, "all")[: args.queries]
        keep = sorted(keep)
        sizes = sorted({min(int(n), len(keep)) for n in args.sizes.split(",")})
        keep = keep[:sizes[-1]]
        ids = [i for i, _ in keep]
        baseline_s, tokens = min(baseline_pass(lm, ws, ids, args.max_seq_len, args.batch_tokens, args.device)
                                 for _ in range(args.repeats))
        forward_s = min(forward_pass(lm, ws, ids, args.max_seq_len, args.batch_tokens, args.device)
                        for _ in range(args.repeats))
        start = time.perf_counter()
        fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len, fisher="empirical",
                          device=args.device, batch_tokens=args.batch_tokens), loaded=lm)
        our_fit_s = time.perf_counter() - start
        ours_s, stats, passes = {}, {}, {}
        for n, _ in [(n, r) for r in range(args.repeats) for n in sizes]:
            start = time.perf_counter()
            result = score(ws, ScoreConfig(queries=",".join(q.id for q in queries), query_rank=_rank_setting(args.query_rank),
                                           chat_template="none", device=args.device,
                                           batch_tokens=args.batch_tokens), loaded=lm, doc_ids=ids[:n],
                           force=True)
            total = time.perf_counter() - start
            if total < ours_s.get(n, math.inf):
                ours_s[n], stats[n] = total, result.stats["seconds"]
            passes[n] = min(passes.get(n, math.inf), result.stats["seconds"]["document pass"])
        ours = (pl.read_parquet(score_files(result.out_path)).pivot(on="doc_id", index="query_id", values="score")
                .sort("query_id").select([str(i) for i in ids]).to_numpy())
        lm_tokenizer = lm.tokenizer
        del lm
        rank, reason, query_batches = (result.stats["query_rank"], result.stats["query_rank_reason"],
                                       result.stats["query_batches"])
        theirs, their_fit_s, theirs_s = kronfluence_scores(rank, args, [t for _, t in keep], queries, sizes, tmp)

    pearson = float(np.corrcoef(ours.reshape(-1), theirs.reshape(-1))[0, 1])
    small, large = sizes[0], sizes[-1]
    lines = [
        f"Model {args.model if not args.shape else 'random-init ' + str(args.shape)}; the first N of {large} "
        f"demo-corpus documents of one window each ({tokens:,} tokens in all); {len(queries)} queries "
        f"(arithmetic, slope, linear); MLPs of {args.layers}; preconditioned query gradients kept "
        f"{reason} (--query-rank {args.query_rank}), {query_batches} pass{'es' * (query_batches != 1)} over the "
        f"documents; empirical Fisher; the model in {args.dtype} for both tools. Fits (not compared): "
        f"curator {our_fit_s:.1f} s, kronfluence {their_fit_s:.1f} s, on all {large} documents. Every time "
        f"below is the fastest of {args.repeats} runs.",
        "",
        "| documents | curator: queries + document pass = total (s) | kronfluence (s) | kronfluence ÷ curator |",
        "|---|---|---|---|",
        *(f"| {n} | {stats[n].get('query gradients', 0):.1f} + {stats[n]['document pass']:.1f} = {ours_s[n]:.1f} "
          f"| {theirs_s[n]:.1f} | **{theirs_s[n] / ours_s[n]:.1f}×** |" for n in sizes),
    ]
    if large > small:
        # Per token, so that the baselines (all documents) and the marginal rates (documents small+1 … large)
        # compare fairly when the two sets' documents differ in length.
        lengths = [len(lm_tokenizer(t)["input_ids"]) for _, t in keep]
        marginal_tokens = tokens * sum(lengths[small:]) / sum(lengths)
        rates = {
            "baseline: plain forward + backward": (large / baseline_s, tokens / baseline_s),
            "the forward alone (no backward)": (large / forward_s, tokens / forward_s),
            # curator times its document pass apart from the queries, whose time varies by a few
            # seconds between runs; kronfluence's marginal is from its totals.
            "curator score (document pass)": ((large - small) / (passes[large] - passes[small]),
                                              marginal_tokens / (passes[large] - passes[small])),
            "kronfluence compute_pairwise_scores": ((large - small) / (theirs_s[large] - theirs_s[small]),
                                                    marginal_tokens / (theirs_s[large] - theirs_s[small])),
        }
        base = tokens / baseline_s
        ours_rate = rates["curator score (document pass)"][1]
        theirs_rate = rates["kronfluence compute_pairwise_scores"][1]
        lines += [
            "",
            f"Documents alone (the time from {small} to {large} documents; what a large corpus costs per "
            f"document). The baselines run over all {large} documents:",
            "",
            "| | documents/s | tokens/s | × baseline tokens/s |",
            "|---|---|---|---|",
            *(f"| {name} | {docs:.2f} | {toks:,.0f} | {toks / base:.2f} |" for name, (docs, toks) in rates.items()),
            "",
            f"On a large corpus curator scores this suite **{ours_rate / theirs_rate:.1f}×** as fast as "
            f"kronfluence, per token (target ≥ 3×). The forward alone runs "
            f"{tokens / forward_s / theirs_rate:.1f}× as fast as kronfluence: the most any scorer that runs "
            f"the model's forward could reach here.",
        ]
    lines += [
        "",
        f"Pearson between the two score matrices ({len(queries)} × {large}): {pearson:.4f}.",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}, torch {torch.__version__}.",
    ]
    print("\n".join(lines))
    if args.record:
        record_section(args.record, args.section,
                       f"Exact suite scoring against kronfluence: SmolLM2-135M, {args.dtype}", "suite_scoring.py",
                       lines)


if __name__ == "__main__":
    main()
