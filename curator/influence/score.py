"""`curator score`: the exact influence of every document on every query of a suite.

1. Each query's gradient is preconditioned once, P_q = H⁻¹∇ℓ(q) per layer
   (curator/influence/queries.py), kept dense or as a rank-r SVD: by default
   whichever lets the whole suite fit the query memory (scoring.py).
2. One pass over the documents (curator/model/document_pass.py) scores the
   whole query batch: per layer and window ⟨P_q, G_d⟩, summed over a
   document's windows.
Each chunk of documents is written to ``<out>.chunks/`` under a name derived from
the queries and documents it holds, so a killed run resumes with whatever
settings that do not change the result (batch size, chunk size, query memory)
and never mixes chunks of different plans; the Parquet file appears under its
name only when whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from curator.artifacts import NOT_IDENTITY, Settings, atomic_file, content_id, write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.documents import document_ids
from curator.catalog.queries import Query, select_queries
from curator.catalog.records import record_model, store_token_counts
from curator.catalog.workspace import Workspace
from curator.constants import ChatTemplate, ModelDType, ScoreMethod
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
from curator.model.document_pass import NoProgress, PassProgress, PassSettings, Timer, chunks_of, document_pass
from curator.model.loading import LoadedModel


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
    device: str = Field("cpu", json_schema_extra=NOT_IDENTITY)
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
          doc_ids: list[int] | None = None, record: bool = True) -> ScoreResult:
    """Score documents against queries. `queries` and `doc_ids`, when given, replace the selector and the
    document sample (a search re-ranking candidates); `record=False` keeps such a run out of the catalog."""
    if config.method != "exact":
        raise CuratorError("curator.influence.score scores exactly; sketch scores come from curator.sketch.search")
    progress = progress or NoProgress()
    timer = Timer()
    with Catalog.open(ws) as catalog:
        factors_record = get_factors(catalog, config.factors)
        queries = queries if queries is not None else select_queries(catalog, config.queries)
        ids = sorted(doc_ids) if doc_ids is not None else document_ids(catalog, config.max_docs, config.seed)
    with timer("load model"):
        loaded = loaded or load_model_for(ws, factors_record, model=config.model, device=config.device,
                                          dtype=config.dtype)
    modules = check_compatible(loaded, factors_record, config.modules)
    max_len = config.max_seq_len or factors_record.settings["max_seq_len"]
    with timer("load factors"):
        factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, factors_record).items()}
    shapes = [tuple(f.corrected.shape) for f in factors.values()]
    budget = int(config.query_memory_mb * 2**20)
    rank, rank_reason = choose_query_rank(config.query_rank, len(queries), shapes, budget)

    resolved = config.model_copy(update={"query_rank": rank if rank is not None else "dense"})
    run_id = content_id("score", factors_record.id, [q.model_dump() for q in queries], ids, resolved.identity(),
                        max_len)
    out = Path(out) if out else ws.artifact_dir("scores") / f"{run_id}.parquet"
    with Catalog.open(ws) as catalog:
        done = catalog.one("SELECT out_path, stats FROM runs WHERE id = ?", [run_id])
    if record and done and Path(done[0]) == out.resolve() and out.is_file() and not force:
        return ScoreResult(run_id=run_id, factors_id=factors_record.id, out_path=done[0],
                           stats=json.loads(done[1]), reused=True)

    chunks_dir = _resumable_dir(out, run_id)
    batch_size = max(1, budget // bytes_per_query(shapes, rank))
    query_batches = [queries[i:i + batch_size] for i in range(0, len(queries), batch_size)]
    settings = PassSettings(max_len=max_len, batch_tokens=config.batch_tokens, chunk_docs=config.chunk_docs)
    losses: dict[str, float] = {}
    counts: dict[int, int] = {}
    windows = tokens = 0
    files: list[Path] = []
    with Catalog.open(ws) as catalog:
        for number, query_batch in enumerate(query_batches):
            planned = {n: chunks_dir / _chunk_name(query_batch, chunk)
                       for n, chunk in enumerate(chunks_of(ids, config.chunk_docs))}
            files.extend(planned.values())
            losses_path = chunks_dir / (content_id("losses", [q.id for q in query_batch]) + ".json")
            if all(path.is_file() for path in [*planned.values(), losses_path]):
                losses.update(json.loads(losses_path.read_text()))
                continue
            with timer("query gradients"):
                prepared, batch_losses = prepare_queries(loaded, modules, factors, query_batch, max_len,
                                                         config.chat_template, rank, config.batch_tokens)
                if rank is not None:
                    prepared = multiply_out_within(prepared, budget, max_len, loaded.model.dtype)
                prepared = for_documents(prepared, loaded.model.dtype)
            losses.update(batch_losses)
            write_text_atomic(losses_path, json.dumps(batch_losses))
            progress.stage(f"score {number + 1}/{len(query_batches)}: {len(query_batch)} queries", len(ids))

            def add_scores(name, a, delta, _batch, output, prepared=prepared):
                output.add_(layer_scores(a, delta, prepared[name]))

            write_chunk = _chunk_writer(planned, query_batch, batch_losses, chunks_dir)
            with timer("document pass"):
                seen = document_pass(loaded.model, modules, loaded.tokenizer, catalog, ids, settings, add_scores,
                                     width=len(query_batch), on_chunk=write_chunk,
                                     chunk_done=lambda n, _chunk, planned=planned: planned[n].is_file(),
                                     progress=progress, counts=counts)
            windows += seen.windows
            tokens += seen.tokens
    with timer("write"):
        _concatenate(files, out)
    stats = {"documents": len(ids), "queries": len(queries), "query_batches": len(query_batches),
             "query_rank": rank, "query_rank_reason": rank_reason, "query_losses": losses,
             "windows": windows, "tokens": tokens, "seconds": timer.seconds}
    stats["docs_per_second"] = round(len(ids) / max(timer.seconds.get("document pass", 0), 1e-9), 2)
    if record:
        record_run(ws, run_id, resolved, loaded, factors_record.id, queries, out, stats, counts)
    shutil.rmtree(chunks_dir, ignore_errors=True)
    return ScoreResult(run_id=run_id, factors_id=factors_record.id, out_path=str(out.resolve()), stats=stats)


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


# -- the resumable output: one Parquet file per (query batch, document chunk) ---------------------

def _chunk_name(queries: list[Query], doc_ids: list[int]) -> str:
    """Named by what it holds, so a resumed run with another query batching or chunk size
    reuses only the files that hold exactly the scores it needs."""
    return content_id("chunk", [q.id for q in queries], doc_ids) + ".parquet"


def _chunk_writer(planned: dict[int, Path], queries: list[Query], losses: dict[str, float], chunks_dir: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_nat = torch.tensor([losses[q.id] for q in queries], dtype=torch.float64)
    query_ids = np.array([q.id for q in queries], dtype=object)

    def write(number: int, chunk_ids: list[int], totals: torch.Tensor) -> None:
        if not bool(torch.isfinite(totals).all()):
            bad_doc, bad_query = torch.nonzero(~torch.isfinite(totals))[0].tolist()
            raise CuratorError(
                f"the score of document {chunk_ids[bad_doc]} on query {queries[bad_query].id} is NaN or "
                f"infinite (the model overflowed on it; try --dtype float32). Finished chunks are kept in "
                f"{chunks_dir} and a rerun resumes after them.")
        n_docs = len(chunk_ids)
        # Query-major: all of the chunk's documents for the first query, then the next.
        table = pa.table({
            "query_id": pa.array(np.repeat(query_ids, n_docs), pa.string()),
            "doc_id": pa.array(np.tile(np.asarray(chunk_ids, dtype=np.int64), len(queries))),
            "score": pa.array(totals.T.reshape(-1).float().numpy()),
            "score_per_nat": pa.array((totals / per_nat).T.reshape(-1).float().numpy()),
        })
        with atomic_file(planned[number]) as part:
            pq.write_table(table, part)

    return write


def _resumable_dir(out: Path, run_id: str) -> Path:
    """`<out>.chunks/`, reused only if it belongs to this same run."""
    directory = out.with_name(out.name + ".chunks")
    marker = directory / "RUN"
    if directory.exists() and (not marker.is_file() or marker.read_text() != run_id):
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return directory


def _concatenate(files: list[Path], out: Path) -> None:
    import pyarrow.parquet as pq

    if not files:
        raise CuratorError("scoring produced no output chunks")
    schema = pq.read_schema(files[0]).remove_metadata()
    with atomic_file(out) as part, pq.ParquetWriter(part, schema) as writer:
        for file in files:
            writer.write_table(pq.read_table(file).cast(schema))
