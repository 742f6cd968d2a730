"""`curator score`: the exact influence of every document on every query of a suite.

1. Each query's gradient is preconditioned once, P_q = H⁻¹∇ℓ(q) per layer
   (curator/influence/queries.py), kept dense or as a rank-r SVD: by default
   whichever lets the whole suite fit the query memory (scoring.py).
2. One pass over the documents (curator/model/document_pass.py) scores the
   whole query batch: per layer and window ⟨P_q, G_d⟩, summed over a
   document's windows.
The output is a Parquet dataset (score_dataset.py): one part per query batch and
chunk of documents, named by what it holds. A killed run resumes with whatever
settings do not change the result (batch size, chunk size, query memory, number
of ranks); a run over all documents, repeated after another ingest, scores only
the new documents and adds their parts to the same run.

Under torchrun every rank runs this with the same config: rank 0 prepares each query
batch and shares it, every rank writes the parts of its share of the chunks, and rank 0
publishes the parts and records the run once all ranks are done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from curator.artifacts import NOT_IDENTITY, Settings, atomic_file, content_id
from curator.catalog.database import Catalog
from curator.catalog.documents import document_ids
from curator.catalog.queries import Query, select_queries
from curator.catalog.records import record_model, store_token_counts
from curator.catalog.workspace import Workspace
from curator.constants import DEVICE_PATTERN, ChatTemplate, ModelDType, ScoreMethod
from curator.errors import CuratorError
from curator.influence.factors import get_factors, load_layer_factors, load_model_for
from curator.influence.queries import check_compatible, prepare_queries
from curator.influence.scoring import (
    bytes_per_query,
    choose_query_rank,
    for_documents,
    layer_scores,
    multiply_out_within,
)
from curator.influence.score_dataset import ScoreDataset, part_name, write_part
from curator.model import distributed
from curator.model.document_pass import NoProgress, PassProgress, PassSettings, Timer, chunks_of, document_pass
from curator.model.loading import LoadedModel


# 2: scores are a dataset of parts; a run over the whole catalog is named without its documents.
SCORE_VERSION = 2


class ScoreConfig(Settings):
    """Every knob of a scoring run; stored with the run."""

    queries: str = Field("all", description="query selector: all, tasks, query sets or ids",
                         json_schema_extra=NOT_IDENTITY)      # the queries' content is in the run id instead
    method: ScoreMethod = "exact"
    store: str | None = Field(None, description="sketch store for --method sketch; default: the latest")
    factors: str | None = Field(None, description="fit id (or unique prefix); default: the latest fit",
                                json_schema_extra=NOT_IDENTITY)   # the resolved fit id is in the run id
    model: str | None = Field(None, description="default: the model the factors were fitted on",
                              json_schema_extra=NOT_IDENTITY)
    modules: str | None = Field(None, description="must equal the fit's module set when given",
                                json_schema_extra=NOT_IDENTITY)
    query_rank: Annotated[int, Field(ge=1)] | Literal["auto", "dense"] = Field(
        "auto", description="auto (dense if the suite fits the query memory, else rank 32 or the largest rank "
                            "that fits it in one pass), dense, or a rank K per layer")
    query_memory_mb: float = Field(2048, gt=0, description="budget for preconditioned queries per pass",
                                 json_schema_extra=NOT_IDENTITY)
    max_docs: int | None = Field(None, description="score a seeded sample of documents instead of all")
    max_seq_len: int | None = Field(None, description="default: the fit's window length")
    chat_template: ChatTemplate = "auto"
    batch_tokens: int = Field(4096, ge=2, json_schema_extra=NOT_IDENTITY)
    chunk_docs: int = Field(512, ge=1, description="documents per resumable output chunk",
                            json_schema_extra=NOT_IDENTITY)
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N",
                        json_schema_extra=NOT_IDENTITY)
    dtype: ModelDType = Field("float32", description="the model's dtype")
    seed: int = 0


class ScoreResult(BaseModel):
    run_id: str
    factors_id: str
    out_path: str
    stats: dict
    reused: bool = False


def score(ws: Workspace, config: ScoreConfig, *, out: Path | None = None, loaded: LoadedModel | None = None,
          progress: PassProgress | None = None, force: bool = False, queries: list[Query] | None = None,
          doc_ids: list[int] | None = None, record: bool = True,
          ranks: distributed.Ranks | None = None) -> ScoreResult:
    """Score documents against queries. `queries` and `doc_ids`, when given, replace the selector and the
    document sample (a search re-ranking candidates); `record=False` keeps such a run out of the catalog.
    `ranks` defaults to the torchrun job this process is in; SINGLE scores in this process alone."""
    if config.method != "exact":
        raise CuratorError("curator.influence.score scores exactly; sketch scores come from curator.sketch.search")
    ranks = ranks or distributed.current()
    progress = progress or NoProgress()
    timer = Timer()
    with Catalog.open(ws) as catalog:
        factors_record = get_factors(catalog, config.factors)
        queries = queries if queries is not None else select_queries(catalog, config.queries)
        ids = sorted(doc_ids) if doc_ids is not None else document_ids(catalog, config.max_docs, config.seed)
    # A run over the whole catalog is named without its documents, so after another ingest
    # the same command finds it and adds the new documents.
    whole_catalog = doc_ids is None and config.max_docs is None
    with timer("load model"):
        loaded = loaded or load_model_for(ws, factors_record, model=config.model,
                                          device=ranks.device(config.device), dtype=config.dtype)
    modules = check_compatible(loaded, factors_record, config.modules)
    max_len = config.max_seq_len or factors_record.settings["max_seq_len"]
    factors = None
    if ranks.main:     # only rank 0 preconditions queries; the others receive them
        with timer("load factors"):
            factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, factors_record).items()}
    shapes = ranks.share([tuple(f.corrected.shape) for f in factors.values()] if ranks.main else None)
    budget = int(config.query_memory_mb * 2**20)
    rank, rank_reason = choose_query_rank(config.query_rank, len(queries), shapes, budget)

    resolved = config.model_copy(update={"query_rank": rank if rank is not None else "dense"})
    run_id = content_id("score", SCORE_VERSION, factors_record.id, [q.model_dump() for q in queries],
                        "all documents" if whole_catalog else ids, resolved.identity(), max_len)
    out = Path(out) if out else ws.artifact_dir("scores") / run_id
    dataset = ScoreDataset(out)
    batch_size = max(1, budget // bytes_per_query(shapes, rank))
    fresh_batches = [[q.id for q in queries[i:i + batch_size]] for i in range(0, len(queries), batch_size)]

    # Rank 0 opens the dataset and decides what is left to score; the others follow its plan.
    plan = None
    if ranks.main:
        manifest = dataset.open(run_id, fresh_batches, force=force)
        if max(len(batch) for batch in manifest.query_batches) > batch_size:
            # Less query memory than when the run began (after running out of it, say): batch anew.
            # Parts of other batches hold other documents, so the dataset stays one of each pair.
            manifest = manifest.model_copy(update={"query_batches": fresh_batches})
            dataset.write_manifest(manifest)
        todo = np.setdiff1d(np.asarray(ids, dtype=np.int64), dataset.scored_documents(manifest)).tolist()
        with Catalog.open(ws) as catalog:
            done = catalog.one("SELECT out_path, stats FROM runs WHERE id = ?", [run_id])
        # Reused only when the record covers what is on disk: an extended run whose recording
        # failed (the catalog was locked) is recorded again.
        reused = (record and done is not None and Path(done[0]) == out.resolve() and not todo and not force
                  and json.loads(done[1]).get("documents") == manifest.documents)
        plan = {"manifest": manifest, "todo": todo, "reused": reused and done}
    plan = ranks.share(plan)        # one decision for every rank
    manifest, todo = plan["manifest"], plan["todo"]
    if plan["reused"]:
        out_path, stats = plan["reused"]
        return ScoreResult(run_id=run_id, factors_id=factors_record.id, out_path=out_path,
                           stats=json.loads(stats), reused=True)

    by_id = {q.id: q for q in queries}
    query_batches = [[by_id[qid] for qid in batch] for batch in manifest.query_batches]
    chunks = chunks_of(todo, config.chunk_docs)
    planned = [[part_name(b, batch, chunk) for chunk in chunks] for b, batch in enumerate(manifest.query_batches)]
    if ranks.main:
        dataset.keep_pending({name for names in planned for name in names})
    settings = PassSettings(max_len=max_len, batch_tokens=config.batch_tokens, chunk_docs=config.chunk_docs)
    losses: dict[str, float] = {}
    counts: dict[int, int] = {}
    windows = tokens = 0
    with Catalog.open(ws, hold=False) as catalog:   # a pass holds no connection: others take turns
        for number, query_batch in enumerate(query_batches):
            if not todo:
                break
            prepared, batch_losses = None, None
            if ranks.main:
                with timer("query gradients"):
                    prepared, batch_losses = prepare_queries(loaded, modules, factors, query_batch, max_len,
                                                             config.chat_template, rank, config.batch_tokens)
            prepared, batch_losses = ranks.share((prepared, batch_losses), device=loaded.device)
            if rank is not None:
                prepared = multiply_out_within(prepared, budget, max_len, loaded.model.dtype)
            prepared = for_documents(prepared, loaded.model.dtype)
            losses.update(batch_losses)

            def add_scores(name, a, delta, _batch, output, prepared=prepared):
                output.add_(layer_scores(a, delta, prepared[name]))

            names = planned[number]
            write_part = _part_writer(dataset.pending, names, query_batch, batch_losses)
            with timer("document pass"):
                seen = document_pass(loaded.model, modules, loaded.tokenizer, catalog, todo, settings, add_scores,
                                     width=len(query_batch), on_chunk=write_part,
                                     chunk_done=lambda n, _chunk, names=names: (dataset.pending / names[n]).is_file(),
                                     progress=progress, counts=counts, ranks=ranks,
                                     description=f"score {number + 1}/{len(query_batches)}: "
                                                 f"{len(query_batch)} queries")
            windows += seen.windows
            tokens += seen.tokens
    # Every rank has finished its parts and closed the catalog once these sums are in.
    windows, tokens = ranks.all_sum(windows), ranks.all_sum(tokens)
    pass_seconds = ranks.gather(timer.seconds.get("document pass", 0.0))
    counts = {doc: n for part in ranks.gather(counts) or [] for doc, n in part.items()}
    if not ranks.main:
        return ranks.share(None)

    with timer("publish"):
        manifest = dataset.publish(manifest, [name for names in planned for name in names], np.asarray(todo),
                                   losses)
    with timer("compact"):
        manifest = dataset.compact(manifest)
    stats = {"documents": manifest.documents, "added_documents": len(todo), "queries": len(queries),
             "query_batches": len(query_batches), "query_rank": rank, "query_rank_reason": rank_reason,
             "query_losses": manifest.query_losses, "windows": windows, "tokens": tokens,
             "ranks": ranks.world, "seconds": timer.seconds}
    stats["docs_per_second"] = round(len(todo) / max(max(pass_seconds), 1e-9), 2)
    if record:
        record_run(ws, run_id, resolved, loaded, factors_record.id, queries, out, stats, counts)
    return ranks.share(ScoreResult(run_id=run_id, factors_id=factors_record.id, out_path=str(out.resolve()),
                                   stats=stats))


def record_run(ws: Workspace, run_id: str, config: ScoreConfig, loaded: LoadedModel, factors_id: str,
               queries: list[Query], out: Path, stats: dict, counts: dict[int, int] | None = None) -> None:
    """Record a finished scoring run (exact or from a sketch store) and the token counts it made."""
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


# -- the parts: one Parquet file per (query batch, document chunk) ----------------------------

def _part_writer(pending: Path, names: list[str], queries: list[Query], losses: dict[str, float]):
    per_nat = torch.tensor([losses[q.id] for q in queries], dtype=torch.float64)
    query_ids = [q.id for q in queries]

    def write(number: int, chunk_ids: list[int], totals: torch.Tensor) -> None:
        if not bool(torch.isfinite(totals).all()):
            bad_doc, bad_query = torch.nonzero(~torch.isfinite(totals))[0].tolist()
            raise CuratorError(
                f"the score of document {chunk_ids[bad_doc]} on query {queries[bad_query].id} is NaN or "
                f"infinite (the model overflowed on it; try --dtype float32). Finished parts are kept in "
                f"{pending} and a rerun resumes after them.")
        # Query-major (all of the chunk's documents for the first query, then the next), with the
        # part's summary (score_dataset.write_part).
        with atomic_file(pending / names[number]) as part:
            write_part(part, query_ids, np.asarray(chunk_ids, dtype=np.int64), totals.T.float().numpy(),
                       (totals / per_nat).T.float().numpy())

    return write
