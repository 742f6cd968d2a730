"""`curator fit`: EK-FAC factors for a model on a sample of the catalog.

Two passes over the fitting sample:
1. covariances A and S of the tracked layers' inputs and output gradients,
   then their float64 eigendecompositions;
2. the eigenvalue correction Λ from per-sequence gradients in those bases.
Stage 1's sums are kept in ``<id>.covariance.part`` so a killed fit resumes at
stage 2; the factors file appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import BaseModel, Field

from curator.artifacts import NOT_IDENTITY, Settings, content_id
from curator.catalog.database import Catalog
from curator.constants import DEVICE_PATTERN, Fisher, ModelDType
from curator.catalog.documents import document_ids
from curator.catalog.records import record_model, store_token_counts
from curator.errors import CuratorError
from curator.influence.factors import (FactorsRecord, finished_factors, get_factors, load_tensors, record_factors,
                                       save_tensors)
from curator.influence.ekfac import (
    damping_value,
    eigenbasis,
    rotate,
    sequence_gradients,
    token_covariance,
)
from curator.model import distributed
from curator.model.document_pass import NoProgress, PassProgress, PassSettings, PassTotals, Timer, document_pass
from curator.model.loading import LoadedModel, load_model, tracked_modules
from curator.catalog.workspace import Workspace


# Documents batched together, and the unit handed to a rank. Sampled labels are drawn per
# document window, so neither this nor the batch size changes which labels a fit draws.
FIT_CHUNK_DOCS = 256
# 2: sampled labels drawn per document window (the same on any chunking, batching or ranks).
FIT_VERSION = 2


class FitConfig(Settings):
    """Every knob of a fit; stored with the factors."""

    model: str = Field(description="short name, .gguf file or save_pretrained folder; identified by its weights",
                       json_schema_extra=NOT_IDENTITY)
    modules: str = Field("mlp", description="mlp, attn-mlp, or a regex over names inside a block")
    layers: str = Field("all", description="blocks to track: all, last:N, A-B or A,B,C")
    fisher: Fisher = Field(
        "sampled", description="labels for δ: sampled from the model (true Fisher) or the data's own")
    max_docs: int | None = Field(None, description="fit on a seeded sample of this many documents")
    max_seq_len: int = Field(512, ge=2, description="tokens per window")
    damping: float | None = Field(None, description="λ; None = 0.1 × mean(Λ) per layer")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N",
                        json_schema_extra=NOT_IDENTITY)
    dtype: ModelDType = Field("float32", description="the model's dtype")
    batch_tokens: int = Field(4096, ge=2, description="tokens per forward+backward batch, padding included",
                              json_schema_extra=NOT_IDENTITY)
    chunk_docs: int = Field(FIT_CHUNK_DOCS, ge=1, description="documents per chunk handed to a rank",
                            json_schema_extra=NOT_IDENTITY)
    seed: int = 0


class FitResult(BaseModel):
    record: FactorsRecord
    reused: bool = False


def fit(ws: Workspace, config: FitConfig, *, loaded: LoadedModel | None = None,
        progress: PassProgress | None = None, force: bool = False) -> FitResult:
    """Fit (or reuse, or finish) the factors these settings name. Under torchrun every rank
    runs this with the same config: each passes over its share of the sample, the sums are
    all-reduced, and rank 0 alone decomposes, writes and records (the others get its record)."""
    ranks = distributed.current()
    progress = progress or NoProgress()
    timer = Timer()
    with timer("load model"):
        loaded = loaded or load_model(config.model, device=ranks.device(config.device), dtype=config.dtype)
    modules = tracked_modules(loaded.model, config.modules, config.layers)
    with Catalog.open(ws) as catalog:
        ids = document_ids(catalog, config.max_docs, config.seed)
        # Empirical-Fisher fits draw no labels: their ids stay what they were before FIT_VERSION 2.
        version = [FIT_VERSION] if config.fisher == "sampled" else []
        fit_id = content_id("fit", *version, loaded.info.id, config.identity(), ids)
        existing = catalog.one("SELECT id FROM factors WHERE id = ?", [fit_id])
    path = ws.artifact_dir("factors") / f"{fit_id}.safetensors"
    if existing and path.is_file() and not force:
        with Catalog.open(ws) as catalog:
            return FitResult(record=get_factors(catalog, fit_id), reused=True)
    # A finished file whose catalog row is missing (the catalog was locked when the fit
    # ended) only needs recording.
    finished = None if force else finished_factors(path, fit_id)
    if finished is not None:
        ranks.barrier()          # every rank has closed its read-only catalog before rank 0 writes it
        if ranks.main:
            _record(ws, loaded, finished, {})
        return FitResult(record=finished)

    counts: dict[int, int] = {}
    labels = "sampled" if config.fisher == "sampled" else "data"
    settings = PassSettings(max_len=config.max_seq_len, batch_tokens=config.batch_tokens, chunk_docs=config.chunk_docs,
                            labels=labels, seed=config.seed)
    covariance_path = path.with_name(f"{fit_id}.covariance.part")
    stats: dict = {"documents": len(ids), "ranks": ranks.world}
    resuming = ranks.share(covariance_path.is_file() if ranks.main else None)

    with Catalog.open(ws, hold=False) as catalog:   # a pass holds no connection: others take turns
        # Stage 1: covariances (or their saved sums from a run that was killed later).
        sums = None
        if not resuming:
            with timer("covariances"):
                sums, seen = _covariance_sums(loaded, modules, catalog, ids, settings, progress, counts, ranks)
        if ranks.main:
            if resuming:
                sums, meta = load_tensors(covariance_path,
                                          rebuild=f"curator fit --force (it is {fit_id}'s first pass)")
                stats.update(meta["stats"])
            else:
                if seen.tokens == 0:
                    raise CuratorError("the fitting sample has no document with two or more tokens")
                for name in modules:
                    _require_finite(sums[name]["a_cov"], f"the input covariance of {name}")
                    _require_finite(sums[name]["s_cov"], f"the gradient covariance of {name}")
                stats.update({"sequences": seen.windows, "tokens": seen.tokens})
                save_tensors(covariance_path, sums, {"fit_id": fit_id, "stats": stats})

        # Decomposed once, on rank 0; the other ranks receive the eigenbases.
        layers = {}
        if ranks.main:
            with timer("eigendecomposition"):
                for name in modules:
                    tokens = int(sums[name]["tokens"])
                    a_vals, a_vecs = eigenbasis(sums[name]["a_cov"], tokens)
                    s_vals, s_vecs = eigenbasis(sums[name]["s_cov"], tokens)
                    layers[name] = {"a_cov": sums[name]["a_cov"] / tokens, "s_cov": sums[name]["s_cov"] / tokens,
                                    "a_eigvals": a_vals, "a_eigvecs": a_vecs,
                                    "s_eigvals": s_vals, "s_eigvecs": s_vecs}
        sums = None
        bases = {name: (t["s_eigvecs"].float(), t["a_eigvecs"].float()) for name, t in layers.items()}
        bases = ranks.share(bases if ranks.main else None, device=loaded.device)

        # Stage 2: the eigenvalue correction Λ_ij = E_n[(Q_Sᵀ G_n Q_A)_ij²].
        corrected_sums = {name: 0 for name in modules}

        def accumulate_corrections(name, a, delta, _batch, _output):
            q_s, q_a = bases[name]
            rotated = rotate(sequence_gradients(a, delta), q_s, q_a)
            corrected_sums[name] = corrected_sums[name] + (rotated ** 2).sum(dim=0).double()

        with timer("eigenvalue correction"):
            seen = document_pass(loaded.model, modules, loaded.tokenizer, catalog, ids,
                                 dataclasses.replace(settings, seed=config.seed + 1), accumulate_corrections,
                                 progress=progress, description="fit 2/2: eigenvalue correction", ranks=ranks)
    # Every rank has closed its read-only catalog here: rank 0 may write it after the all-reduces.
    windows = ranks.all_sum(seen.windows)
    for name in modules:
        q_s, q_a = bases[name]
        corrected_sums[name] = ranks.all_reduce(_as_tensor(corrected_sums[name], (q_s.shape[0], q_a.shape[0]),
                                                           q_s.device))
    counts = _merged(ranks.gather(counts))
    if not ranks.main:
        return ranks.share(None)

    for name in modules:
        corrected = (corrected_sums[name] / windows).cpu()
        _require_finite(corrected, f"the corrected eigenvalues of {name}")
        layers[name]["corrected"] = corrected
        layers[name]["damping"] = torch.tensor(damping_value(corrected, config.damping), dtype=torch.float64)
    stats["seconds"] = timer.seconds
    record = FactorsRecord(
        id=fit_id, model_id=loaded.info.id, tokenizer_id=loaded.info.tokenizer_id,
        path=str(path.relative_to(ws.root)), modules=list(modules),
        settings=config.model_dump(), stats=stats,
    )
    save_tensors(path, layers, {"fit_id": fit_id, "model_id": loaded.info.id,
                                "tokenizer_id": loaded.info.tokenizer_id, "modules": list(modules),
                                "settings": config.model_dump(), "record": record.model_dump()})
    covariance_path.unlink(missing_ok=True)
    _record(ws, loaded, record, counts)
    return ranks.share(FitResult(record=record))


def _covariance_sums(loaded: LoadedModel, modules: dict, catalog: Catalog, ids: list[int], settings: PassSettings,
                     progress: PassProgress, counts: dict[int, int], ranks: distributed.Ranks):
    """Σ a aᵀ and Σ δ δᵀ over every token of the sample (summed over ranks), and the pass's totals."""
    sums = {name: {"a_cov": 0, "s_cov": 0} for name in modules}

    def accumulate_covariances(name, a, delta, batch, _output):
        sums[name]["a_cov"] = sums[name]["a_cov"] + token_covariance(a, batch.attention_mask)
        sums[name]["s_cov"] = sums[name]["s_cov"] + token_covariance(delta, batch.attention_mask)

    seen = document_pass(loaded.model, modules, loaded.tokenizer, catalog, ids, settings, accumulate_covariances,
                         progress=progress, description="fit 1/2: covariances", counts=counts, ranks=ranks)
    totals = PassTotals(windows=ranks.all_sum(seen.windows), tokens=ranks.all_sum(seen.tokens))
    for name, module in modules.items():
        d_in = module.in_features + (module.bias is not None)
        for key, size in (("a_cov", d_in), ("s_cov", module.out_features)):
            sums[name][key] = ranks.all_reduce(_as_tensor(sums[name][key], (size, size), loaded.device))
        sums[name]["tokens"] = torch.tensor(totals.tokens)
    return sums, totals


def _as_tensor(total, shape: tuple[int, int], device) -> torch.Tensor:
    """A running sum that is still the integer 0 (a rank without documents) as a float64 tensor
    of the shape the other ranks have, so the all-reduce sees the same tensor on every rank."""
    if isinstance(total, torch.Tensor):
        return total
    return torch.zeros(shape, dtype=torch.float64, device=device)


def _merged(parts: list[dict] | None) -> dict:
    merged: dict = {}
    for part in parts or []:
        merged.update(part)
    return merged


def _record(ws: Workspace, loaded: LoadedModel, record: FactorsRecord, counts: dict[int, int]) -> None:
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        record_model(catalog, loaded.info)
        record_factors(catalog, record)
        store_token_counts(catalog, loaded.info.tokenizer_id, counts)
        catalog.sql("COMMIT")


def _require_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise CuratorError(
            f"{what} contains NaN or infinity: the model's activations or gradients overflowed. Try "
            f"--dtype float32, or check the model's weights; no factors were written.")
