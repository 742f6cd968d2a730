"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK") of curator's influence scores.

    python benchmarks/lds.py [--docs 3000] [--models 40] [--epochs 3] [--queries-per-task 8]
        [--record docs/evaluation.md]

A small Llama is trained from scratch on a generated corpus of short documents: worked arithmetic,
slope and linear problems in the four non-paper formats of curator's query generator (terse, prose,
code, chat) and in the paper's format at other seeds, beside plain prose. The influence of every
document on held-out queries (the paper's format, generator seed 0) is computed on that model by

  ekfac    curator's exact EK-FAC (`fit` + `score`, every block's MLP tracked);
  sketch   curator's sketch at the demo's budget, k = 16 per layer (`sketch` with a suite of seed-1 queries, then
           `score --method sketch`): what the index answers for queries it was not built from;
  graddot  a plain gradient dot product ∇ℓ(q)·∇L(d) over the same layers (autograd, one document at a
           time), the baseline that ignores curvature;
  random   Gaussian noise, the floor.

Then M models are trained with the same recipe (same initial weights, optimiser, schedule, data-order
seed) on random halves S_j of the corpus, and each query's completion loss ℓ_j(q) is measured. A
method predicts the loss of model j as −Σ_{d∈S_j} I(q, d) (positive influence lowers the loss);
LDS(q) is Spearman's correlation over j of prediction and measurement, and the score is its mean over
queries (± the standard error over queries). Every method is scored on the same subsets and the
same measured losses.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = ("the a river town people walk old bridge evening light market morning road garden window letter "
         "story city small long green quiet house street children music night summer winter field boat").split()


def build_corpus(n: int, seed: int) -> list[str]:
    """n distinct short documents: worked problems in several formats (a third) and plain prose."""
    from curator.catalog.querygen import generate

    rng = random.Random(seed)
    docs: list[str] = []
    seen: set[str] = set()
    families = ["terse", "prose", "code", "chat", "paper"]
    batch = 0
    while len(docs) < n:
        batch += 1
        for task in ("arithmetic", "slope", "linear"):
            family = families[batch % len(families)]
            query = generate(task, 1, seed=1000 + batch, family=family)[0]   # never seed 0 or 1 (the queries)
            text = query.prompt + "\n" + query.completion
            if text not in seen:
                seen.add(text)
                docs.append(text)
        for _ in range(6):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))).capitalize() + "."
            if text not in seen:
                seen.add(text)
                docs.append(text)
    return docs[:n]


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def new_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(initial: dict, vocab: int, encoded: list[list[int]], subset: list[int], args, eos: int):
    """The one recipe: documents (ids in `subset`) packed with EOS into rows of seq_len, a fixed data order
    per epoch, AdamW with warm-up and cosine decay."""
    model = new_model(vocab, 0)
    model.load_state_dict(initial)
    model.train()
    order_rng = random.Random(12345)
    rows = []
    for _ in range(args.epochs):
        chosen = sorted(subset)
        order_rng.shuffle(chosen)
        stream = [t for i in chosen for t in (*encoded[i], eos)]
        usable = len(stream) // args.seq_len * args.seq_len
        rows += torch.tensor(stream[:usable]).reshape(-1, args.seq_len).split(1)
    batches = [torch.cat(rows[i:i + args.batch_rows]) for i in range(0, len(rows), args.batch_rows)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    warm = max(1, len(batches) // 20)
    for step, batch in enumerate(batches):
        scale = (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) /
                                                                                  max(1, len(batches) - warm)))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def completion_losses(model, windows, pad_id: int) -> np.ndarray:
    """ℓ(q): summed nats over each query's completion tokens."""
    from curator.model.tokens import pad_batch

    batch = pad_batch(windows, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1),
                                            reduction="none").reshape(batch.input_ids.shape[0], -1)
    return (nll * batch.target_mask[:, 1:]).sum(dim=1).double().numpy()


def gradient_dot(model, encoded: list[list[int]], windows, max_len: int) -> np.ndarray:
    """(queries, documents) of ∇ℓ(q)·∇L(d) over the MLP weights of every block (what EK-FAC tracks)."""
    names = [n for n, _ in model.named_parameters() if ".mlp." in n]
    params = [p for n, p in model.named_parameters() if n in names]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def grad(ids: list[int], first_target: int) -> torch.Tensor:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits[first_target - 1:], x[0, first_target:], reduction="sum")
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    queries = torch.stack([grad(list(w.ids), w.first_target) for w in windows])
    out = np.zeros((len(windows), len(encoded)))
    for j, ids in enumerate(encoded):
        out[:, j] = (queries @ grad(ids[:max_len], 1)).double().numpy()
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):          # ties share their mean rank
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator else 0.0


def curator_scores(root: Path, docs: list[str], folder: Path, args) -> tuple[dict, list, dict]:
    """(method → (queries, documents) array in corpus order, the held-out queries, timings)."""
    import polars as pl

    from curator.catalog.database import Catalog, create_workspace
    from curator.catalog.ingest import IngestOptions, ingest
    from curator.catalog.queries import store_queries
    from curator.catalog.querygen import generate
    from curator.catalog.records import score_files
    from curator.influence.fit import FitConfig, fit
    from curator.influence.score import ScoreConfig, score
    from curator.sketch.build import sketch
    from curator.sketch.scoring import sketch_score
    from curator.sketch.store import SketchConfig

    ws, _ = create_workspace(root / "ws")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs)))
    ingest(ws, [str(path)], IngestOptions(source="generated"))
    tasks = ("arithmetic", "slope", "linear")
    queries = [q for t in tasks for q in generate(t, args.queries_per_task, seed=0)]
    suite = [q for t in tasks for q in generate(t, args.queries_per_task, seed=1)]
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, queries + suite)
        index = dict(catalog.sql("SELECT id, CAST(external_id AS INTEGER) FROM documents"))
    timings = {}
    started = time.perf_counter()
    fit(ws, FitConfig(model=str(folder), max_seq_len=args.seq_len, layers="all"))
    timings["fit"] = time.perf_counter() - started
    selector = ",".join(f"{t}-s0" for t in tasks)
    out = {}
    started = time.perf_counter()
    exact = score(ws, ScoreConfig(queries=selector, chat_template="none"))
    timings["ekfac score"] = time.perf_counter() - started
    started = time.perf_counter()
    sketch(ws, SketchConfig(suite=",".join(f"{t}-s1" for t in tasks), rank=args.sketch_rank, chat_template="none"))
    sketched = sketch_score(ws, ScoreConfig(queries=selector, method="sketch", chat_template="none"))
    timings["sketch + score"] = time.perf_counter() - started
    qpos = {q.id: i for i, q in enumerate(queries)}
    for name, result in (("ekfac", exact), ("sketch", sketched)):
        table = pl.read_parquet(score_files(result.out_path))
        array = np.zeros((len(queries), len(docs)))
        for qid, doc_id, value in table.select("query_id", "doc_id", "score").iter_rows():
            array[qpos[qid], index[doc_id]] = value
        out[name] = array
    return out, queries, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--models", type=int, default=40, help="subset models (random halves)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--queries-per-task", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sketch-rank", type=int, default=16, help="k per layer (the demo's default)")
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", type=Path, default=None, help="write the table into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from curator.model.tokens import pad_token_id, tokenize_query

    started = time.perf_counter()
    docs = build_corpus(args.docs, seed=0)
    tokenizer = train_tokenizer(docs, args.vocab)
    encoded = [tokenizer(t)["input_ids"] for t in docs]
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    initial = {k: v.clone() for k, v in new_model(vocab, 0).state_dict().items()}
    timings = {}
    t0 = time.perf_counter()
    full = train(initial, vocab, encoded, list(range(len(docs))), args, eos)
    timings["train full model"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "model"
        full.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        scores, queries, more = curator_scores(root, docs, folder, args)
    timings.update(more)
    windows = [tokenize_query(tokenizer, i, q.prompt, q.completion, 512, "none", q.id) for i, q in enumerate(queries)]
    t0 = time.perf_counter()
    scores["graddot"] = gradient_dot(full, encoded, windows, args.seq_len)
    timings["gradient dot"] = time.perf_counter() - t0
    scores["random"] = np.random.default_rng(0).normal(size=scores["ekfac"].shape)
    pad = pad_token_id(tokenizer)
    subsets, measured = [], []
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    for j in range(args.models):
        subset = np.sort(rng.choice(len(docs), size=len(docs) // 2, replace=False))
        model = train(initial, vocab, encoded, subset.tolist(), args, eos)
        subsets.append(subset)
        measured.append(completion_losses(model, windows, pad))
        print(f"subset model {j + 1}/{args.models}: mean ℓ(q) {measured[-1].mean():.3f}", flush=True)
    timings["train subset models"] = time.perf_counter() - t0
    measured = np.stack(measured)                      # (models, queries)
    masks = np.zeros((args.models, len(docs)))
    for j, subset in enumerate(subsets):
        masks[j, subset] = 1.0
    results = {}
    for name, array in scores.items():
        predicted = -(masks @ array.T)                 # (models, queries)
        per_query = [spearman(predicted[:, q], measured[:, q]) for q in range(len(queries))]
        by_task = {t: float(np.mean([v for v, q in zip(per_query, queries, strict=True) if q.task == t]))
                   for t in ("arithmetic", "slope", "linear")}
        results[name] = {"lds": float(np.mean(per_query)),
                         "se": float(np.std(per_query, ddof=1) / math.sqrt(len(per_query))), **by_task}
    base_losses = completion_losses(full, windows, pad)
    spread = float(np.mean(measured.std(axis=0)))
    lines = [f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.python_version()}, "
             f"torch {torch.__version__}. Corpus: {len(docs):,} generated documents "
             f"({sum(map(len, encoded)):,} tokens, vocabulary {vocab}); model: Llama, 2 blocks, hidden 64 "
             f"({sum(p.numel() for p in full.parameters()):,} parameters), {args.epochs} epochs, "
             f"{args.models} models on random halves; {len(queries)} held-out queries (paper format, seed 0; "
             f"mean ℓ(q) {base_losses.mean():.2f} nats on the full model, spread over subset models "
             f"{spread:.3f} nats).", "",
             "| scores | LDS (mean ± s.e. over queries) | arithmetic | slope | linear |",
             "|---|---|---|---|---|"]
    for name in ("ekfac", "sketch", "graddot", "random"):
        r = results[name]
        lines.append(f"| {name} | {r['lds']:.3f} ± {r['se']:.3f} | {r['arithmetic']:.3f} | {r['slope']:.3f} | "
                     f"{r['linear']:.3f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
              + f"; total {time.perf_counter() - started:.0f}."]
    print("\n".join(lines))
    print(json.dumps({"results": results, "timings": timings}, indent=1))
    if args.record:
        from recording import record_section

        record_section(args.record, "lds", "Linear datamodeling score", "lds.py", lines)


if __name__ == "__main__":
    main()
