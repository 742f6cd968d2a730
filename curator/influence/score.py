"""`curator score --method exact`: the influence of every document on every query.

1. Each query's gradient is preconditioned once, P_q = H⁻¹∇ℓ(q) per layer
   (optionally kept as a rank-r SVD, which bounds memory).
2. One pass over the documents scores the whole query batch: per layer and
   window, ⟨P_q, G_d⟩, by building G_d = Σ_t δ_t a_tᵀ or, with low-rank queries
   when it is cheaper, by Σ_t Σ_k (δ_tᵀu_k)(v_kᵀa_t). A document's score is the
   sum over its windows.
Queries are processed in batches sized to a memory budget, one document pass
per batch. Finished chunks of documents are written to ``<out>.part/``, so a
killed run resumes; the final Parquet appears under its name only when whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.corpus import document_ids, read_texts, record_model, store_token_counts
from curator.errors import CuratorError
from curator.influence.factors import FactorsRecord, get_factors, load_layer_factors, load_model_for
from curator.influence.ekfac import (
    LayerFactors,
    LowRank,
    dense,
    from_eigen_frame,
    low_rank_from_eigen_frame,
    preconditioned_eigen_frame,
    scores_from_gradients,
    scores_from_tokens,
    scores_low_rank_from_gradients,
    scoring_costs,
    scoring_path,
    sequence_gradients,
)
from curator.model.losses import backward_layers
from curator.model.loading import LoadedModel, tracked_modules
from curator.model.document_pass import NoProgress, PassProgress, Timer
from curator.catalog.queries import Query, select_queries
from curator.model.tokens import batches, pad_token_id, tokenize_documents, tokenize_query
from curator.catalog.workspace import Workspace

SCORE_SCHEMA_COLUMNS = ("query_id", "doc_id", "score", "score_per_nat")


class ScoreConfig(BaseModel):
    """Every knob of a scoring run; stored with the run."""

    queries: str = Field("all", description="query selector: all, tasks, query sets or ids")
    method: Literal["exact", "sketch"] = "exact"
    store: str | None = Field(None, description="sketch store for --method sketch; default: the latest")
    factors: str | None = Field(None, description="fit id (or unique prefix); default: the latest fit")
    model: str | None = Field(None, description="default: the model the factors were fitted on")
    modules: str | None = Field(None, description="must equal the fit's module set when given")
    query_rank: int | None = Field(None, ge=1, description="keep each P_q as a rank-r SVD per layer")
    query_memory_mb: int = Field(2048, ge=1, description="budget for preconditioned queries per pass")
    max_docs: int | None = Field(None, description="score a seeded sample of documents instead of all")
    max_seq_len: int | None = Field(None, description="default: the fit's window length")
    chat_template: Literal["auto", "none"] = "auto"
    batch_tokens: int = Field(4096, ge=2)
    chunk_docs: int = Field(512, ge=1, description="documents per resumable output chunk")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0


class ScoreResult(BaseModel):
    run_id: str
    factors_id: str
    out_path: str
    stats: dict
    reused: bool = False


def score(ws: Workspace, config: ScoreConfig, *, out: Path | None = None, loaded: LoadedModel | None = None,
          progress: PassProgress | None = None, force: bool = False, queries: list[Query] | None = None,
          doc_ids: list[int] | None = None, record: bool = True) -> ScoreResult:
    """Score documents against queries. `queries` and `doc_ids`, when given, replace the selector and the
    document sample (a search re-ranking candidates); `record=False` keeps such a run out of the catalog."""
    progress = progress or NoProgress()
    if config.method == "sketch":
        from curator.sketch.search import sketch_score

        return sketch_score(ws, config, out=out, loaded=loaded, force=force)
    timer = Timer()
    record_it = record
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog, config.factors)
        queries = queries if queries is not None else select_queries(catalog, config.queries)
        ids = sorted(doc_ids) if doc_ids is not None else document_ids(catalog, config.max_docs, config.seed)
    with timer("load model"):
        loaded = loaded or load_model_for(ws, record, model=config.model, device=config.device, dtype=config.dtype)
    modules = check_compatible(loaded, record, config.modules)
    max_len = config.max_seq_len or record.settings["max_seq_len"]

    run_id = _run_id(record, queries, ids, config, max_len)
    out = Path(out) if out else ws.artifact_dir("scores") / f"{run_id}.parquet"
    with Catalog.open(ws) as catalog:
        done = catalog.one("SELECT out_path, stats FROM runs WHERE id = ?", [run_id])
    if record_it and done and Path(done[0]) == out.resolve() and out.is_file() and not force:
        return ScoreResult(run_id=run_id, factors_id=record.id, out_path=done[0], stats=json.loads(done[1]),
                           reused=True)

    with timer("load factors"):
        factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, record).items()}
    chunks_dir = _resumable_dir(out, run_id)
    per_query = _bytes_per_query(factors, config.query_rank)
    batch_size = max(1, config.query_memory_mb * 2**20 // per_query)
    query_batches = [queries[i:i + batch_size] for i in range(0, len(queries), batch_size)]
    losses: dict[str, float] = {}
    counts: dict[int, int] = {}
    totals = {"windows": 0, "tokens": 0}
    with Catalog.open(ws) as catalog:
        for number, query_batch in enumerate(query_batches):
            with timer("query gradients"):
                prepared, batch_losses = prepare_queries(loaded, modules, factors, query_batch, max_len,
                                                         config.chat_template, config.query_rank,
                                                         config.batch_tokens)
                if config.query_rank is not None:
                    prepared = multiply_out_within(prepared, config.query_memory_mb * 2**20, max_len,
                                                   loaded.model.dtype)
                prepared = for_documents(prepared, loaded.model.dtype)
            losses.update(batch_losses)
            progress.stage(f"score {number + 1}/{len(query_batches)}: {len(query_batch)} queries", len(ids))
            with timer("document pass"):
                _document_pass(loaded, modules, prepared, query_batch, batch_losses, catalog, ids, max_len,
                               config, chunks_dir, number, progress, counts, totals)
    with timer("write"):
        _concatenate(chunks_dir, out)
    stats = {"documents": len(ids), "queries": len(queries), "query_batches": len(query_batches),
             "query_losses": losses, **totals, "seconds": timer.seconds}
    stats["docs_per_second"] = round(len(ids) / max(timer.seconds.get("document pass", 0), 1e-9), 2)
    if record_it:
        record_run(ws, run_id, config, loaded, record.id, queries, out, stats, counts)
    shutil.rmtree(chunks_dir, ignore_errors=True)
    return ScoreResult(run_id=run_id, factors_id=record.id, out_path=str(out.resolve()), stats=stats)


def record_run(ws: Workspace, run_id: str, config: ScoreConfig, loaded: LoadedModel, factors_id: str,
               queries: list[Query], out: Path, stats: dict, counts: dict[int, int] | None = None) -> None:
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        record_model(catalog, loaded.info)
        catalog.sql("DELETE FROM runs WHERE id = ?", [run_id])
        catalog.sql(
            "INSERT INTO runs (id, kind, method, model_id, factors_id, query_ids, settings, out_path, stats) "
            "VALUES (?, 'score', ?, ?, ?, ?, ?, ?, ?)",
            [run_id, config.method, loaded.info.id, factors_id, json.dumps([q.id for q in queries]),
             config.model_dump_json(), str(out.resolve()), json.dumps(stats)])
        if counts:
            store_token_counts(catalog, loaded.info.tokenizer_id, counts)
        catalog.sql("COMMIT")


def check_compatible(loaded: LoadedModel, record: FactorsRecord, modules: str | None) -> dict:
    """The tracked modules, after refusing factors fitted for another model, tokenizer or module set."""
    fitted_on = f"{record.settings.get('model')} (model id {record.model_id[:12]})"
    if loaded.info.id != record.model_id:
        raise CuratorError(
            f"the factors {record.id} were fitted for {fitted_on}, but the model given is "
            f"{loaded.info.name} (model id {loaded.info.id[:12]}): its config or weights differ. "
            f"Fit factors for this model with `curator fit --model {loaded.info.name}`.")
    if loaded.info.tokenizer_id != record.tokenizer_id:
        raise CuratorError(
            f"the factors {record.id} were fitted with another tokenizer (id {record.tokenizer_id[:12]}) than "
            f"{loaded.info.name}'s (id {loaded.info.tokenizer_id[:12]}); token ids would not mean the same.")
    chosen = tracked_modules(loaded.model, modules or record.settings["modules"], record.settings["layers"])
    if list(chosen) != record.modules:
        missing = sorted(set(record.modules) - set(chosen))
        extra = sorted(set(chosen) - set(record.modules))
        raise CuratorError(
            f"the factors {record.id} cover the modules {record.settings['modules']!r} of layers "
            f"{record.settings['layers']!r} ({len(record.modules)} layers); --modules {modules!r} selects "
            f"{len(chosen)}. Not fitted: {extra[:3]}; fitted but not selected: {missing[:3]}.")
    return chosen


def prepare_queries(loaded: LoadedModel, modules: dict, factors: dict[str, LayerFactors], queries: list[Query],
                    max_len: int, chat_template: str, rank: int | None, batch_tokens: int, *,
                    eigen_frame: bool = False) -> tuple[dict[str, torch.Tensor | LowRank], dict[str, float]]:
    """P_q = H⁻¹∇ℓ(q) per layer, stacked over queries, and ℓ(q) in nats.

    As rank-r factors when `rank` is set, else dense; with `eigen_frame`, dense in the
    eigenbasis, M_q = Q_Sᵀ P_q Q_A, which is what sketch bases and query sketches read.
    """
    if eigen_frame and rank is not None:
        raise ValueError("eigen-frame queries are dense; rank must be None")
    # A query is one sequence however long the document windows are; the model's context bounds it.
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or max_len)
    windows = [tokenize_query(loaded.tokenizer, i, q.prompt, q.completion, context, chat_template, q.id)
               for i, q in enumerate(queries)]
    parts: dict[str, list] = {name: [None] * len(queries) for name in modules}
    losses: dict[str, float] = {}

    for batch in batches(windows, batch_tokens, pad_token_id(loaded.tokenizer), loaded.device):
        owners = batch.owners.tolist()

        def on_layer(name, a, delta, owners=owners):
            m = preconditioned_eigen_frame(a, delta, factors[name])
            if rank is not None:
                compressed = low_rank_from_eigen_frame(m, factors[name], rank)
                for row, owner in enumerate(owners):
                    parts[name][owner] = (compressed.u[row], compressed.v[row])
            else:
                preconditioned = m if eigen_frame else from_eigen_frame(m, factors[name])
                for row, owner in enumerate(owners):
                    parts[name][owner] = preconditioned[row]

        batch_losses = backward_layers(loaded.model, modules, batch, on_layer, labels="data")
        for owner, loss in zip(owners, batch_losses.tolist(), strict=True):
            if not math.isfinite(loss):
                raise CuratorError(f"query {queries[owner].id}: the completion's loss is {loss} (the model "
                                   f"overflowed; try --dtype float32)")
            losses[queries[owner].id] = loss
    prepared: dict[str, torch.Tensor | LowRank] = {}
    for name, items in parts.items():
        if rank is None:
            prepared[name] = torch.stack(items)
        else:
            prepared[name] = LowRank(torch.stack([u for u, _ in items]), torch.stack([v for _, v in items]))
    return prepared, losses


def _document_pass(loaded, modules, prepared, queries, losses, catalog, ids, max_len, config, chunks_dir,
                   number, progress, counts, totals) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pad = pad_token_id(loaded.tokenizer)
    per_nat = torch.tensor([losses[q.id] for q in queries], dtype=torch.float64)
    query_ids = np.array([q.id for q in queries], dtype=object)
    for chunk_number, start in enumerate(range(0, len(ids), config.chunk_docs)):
        chunk_ids = ids[start:start + config.chunk_docs]
        path = chunks_dir / f"q{number:03d}-c{chunk_number:07d}.parquet"
        if path.is_file():
            progress.advance(len(chunk_ids), 0)
            continue
        rows = [row for part in read_texts(catalog, chunk_ids, chunk=len(chunk_ids)) for row in part]
        windows, chunk_counts = tokenize_documents(loaded.tokenizer, rows, max_len)
        counts.update(chunk_counts)
        position = {doc_id: i for i, doc_id in enumerate(chunk_ids)}
        totals_chunk = torch.zeros(len(chunk_ids), len(queries), dtype=torch.float64)
        for batch in batches(windows, config.batch_tokens, pad, loaded.device):
            batch_scores = torch.zeros(batch.input_ids.shape[0], len(queries), device=loaded.device)

            def on_layer(name, a, delta, batch_scores=batch_scores):
                batch_scores.add_(layer_scores(a, delta, prepared[name]))

            backward_layers(loaded.model, modules, batch, on_layer, labels="data")
            rows_of = torch.tensor([position[o] for o in batch.owners.tolist()])
            totals_chunk.index_add_(0, rows_of, batch_scores.double().cpu())
            totals["windows"] += batch.input_ids.shape[0]
            totals["tokens"] += batch.tokens
            progress.advance(0, batch.tokens)
        if not bool(torch.isfinite(totals_chunk).all()):
            bad_doc, bad_query = torch.nonzero(~torch.isfinite(totals_chunk))[0].tolist()
            raise CuratorError(
                f"the score of document {chunk_ids[bad_doc]} on query {queries[bad_query].id} is NaN or "
                f"infinite (the model overflowed on it; try --dtype float32). Finished chunks are kept in "
                f"{chunks_dir} and a rerun resumes after them.")
        n_docs = len(chunk_ids)
        # Query-major: all of the chunk's documents for the first query, then the next.
        table = pa.table({
            "query_id": pa.array(np.repeat(query_ids, n_docs), pa.string()),
            "doc_id": pa.array(np.tile(np.asarray(chunk_ids, dtype=np.int64), len(queries))),
            "score": pa.array(totals_chunk.T.reshape(-1).float().numpy()),
            "score_per_nat": pa.array((totals_chunk / per_nat).T.reshape(-1).float().numpy()),
        })
        part = path.with_name(path.name + ".tmp")
        pq.write_table(table, part)
        part.replace(path)
        progress.advance(len(chunk_ids), 0)


def layer_scores(a: torch.Tensor, delta: torch.Tensor, prepared: torch.Tensor | LowRank) -> torch.Tensor:
    """⟨P_q, G_n⟩ for each window n of the batch and each query q, by the cheapest route."""
    if isinstance(prepared, LowRank):
        path = scoring_path(a.shape[0], a.shape[1], delta.shape[-1], a.shape[-1], prepared.u.shape[0],
                            prepared.rank, prepared.full is not None)
        if path == "tokens":
            return scores_from_tokens(a, delta, prepared)
        if path == "dense":
            return _dense_scores(a, delta, prepared.full)
        return scores_low_rank_from_gradients(sequence_gradients(a, delta), prepared)
    return _dense_scores(a, delta, prepared)


def _dense_scores(a: torch.Tensor, delta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """⟨P_q, G_n⟩ in the dtype P is held in: bfloat16 next to a bfloat16 model (`for_documents`)."""
    return scores_from_gradients(sequence_gradients(a, delta, p.dtype), p).float()


def for_documents(prepared: dict[str, torch.Tensor | LowRank], dtype: torch.dtype
                  ) -> dict[str, torch.Tensor | LowRank]:
    """The multiplied-out queries in the dtype the document pass runs in.

    Next to a bfloat16 model, G_n and ⟨P_q, G_n⟩ are formed in bfloat16 (the matrix
    products accumulate in float32): 3.5x faster on a CPU with bfloat16 units, and
    half the memory per query. Measured against float32 on SmolLM2 (96 documents x
    100 queries, docs/influence.md), the scores differ far less than the bfloat16
    model's own scores differ from float32's. Low-rank factors stay in float32.
    """
    out = {}
    for name, p in prepared.items():
        if isinstance(p, LowRank):
            out[name] = p if p.full is None else LowRank(p.u, p.v, p.full.to(dtype))
        else:
            out[name] = p.to(dtype)
    return out


def multiply_out_within(prepared: dict[str, torch.Tensor | LowRank], budget_bytes: int, window_tokens: int,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | LowRank]:
    """Add the multiplied-out P to rank-r queries, layer by layer, while it fits in the budget.

    With many queries × rank, building each window's G and taking one inner product
    per query costs less than projecting every token (`scoring_costs`). Layers that
    save the most per byte go first; the rest keep the token route. `dtype` is the one
    the document pass will hold them in (`for_documents`).
    """
    def saving(p: LowRank) -> float:
        q, d_out, r = p.u.shape
        costs = scoring_costs(1, window_tokens, d_out, p.v.shape[1], q, r)
        return (costs["tokens"] - costs["dense"]) / (q * d_out * p.v.shape[1])

    used = sum(4 * (p.u.numel() + p.v.numel()) if isinstance(p, LowRank) else 4 * p.numel()
               for p in prepared.values())
    out = dict(prepared)
    candidates = [n for n, p in prepared.items() if isinstance(p, LowRank) and saving(p) > 0]
    for name in sorted(candidates, key=lambda n: -saving(prepared[n])):
        p = prepared[name]
        size = dtype.itemsize * p.u.shape[0] * p.u.shape[1] * p.v.shape[1]
        if used + size <= budget_bytes:
            out[name] = LowRank(p.u, p.v, dense(p).to(dtype))
            used += size
    return out


def _bytes_per_query(factors: dict[str, LayerFactors], rank: int | None) -> int:
    total = 0
    for f in factors.values():
        d_out, d_in = f.corrected.shape
        total += (d_out + d_in) * rank if rank else d_out * d_in
    return 4 * total


def _run_id(record: FactorsRecord, queries: list[Query], ids: list[int], config: ScoreConfig, max_len: int) -> str:
    digest = hashlib.blake2b(digest_size=6)
    identity = config.model_dump(exclude={"device", "batch_tokens", "chunk_docs", "query_memory_mb", "model",
                                          "factors", "queries"})
    digest.update(json.dumps([record.id, [q.model_dump() for q in queries], ids, identity, max_len],
                             sort_keys=True, default=str).encode())
    return f"score-{digest.hexdigest()}"


def _resumable_dir(out: Path, run_id: str) -> Path:
    """`<out>.part/`, reused only if it belongs to this same run."""
    directory = out.with_name(out.name + ".part")
    marker = directory / "RUN"
    if directory.exists() and (not marker.is_file() or marker.read_text() != run_id):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return directory


def _concatenate(chunks_dir: Path, out: Path) -> None:
    import pyarrow.parquet as pq

    files = sorted(chunks_dir.glob("q*-c*.parquet"))
    if not files:
        raise CuratorError("scoring produced no output chunks")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".tmp")
    schema = pq.read_schema(files[0])
    with pq.ParquetWriter(part, schema.remove_metadata()) as writer:
        for file in files:
            writer.write_table(pq.read_table(file).cast(schema.remove_metadata()))
    part.replace(out)
