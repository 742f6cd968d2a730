"""`curator sketch`: compressed per-document gradients for fast ad-hoc queries.

Per tracked layer, bases U (d_out × k) and V (d_in × k) are chosen once:
  query-subspace  the top singular vectors of a suite's preconditioned query
                  gradients P_q (DESIGN.md, "Sketches"): exact for suite queries
                  at full rank, and the approach that ranks held-out queries well;
  whitened-subspace  the same, with the subspace chosen in whitened
                  eigen-coordinates (a rank-1 fit of √(Λ + λ)); documents and
                  queries then use different, dual bases;
  eigen, random   baselines that ignore the queries (top Fisher eigenvectors, or
                  seeded Gaussian projections), kept so comparisons reproduce.
A document's sketch is Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ per layer, streamed per token with
parameters frozen, summed over its windows and flattened; a query's is Uᵀ P_q V.
Their inner product approximates I(q, d).

The store is a folder of shards plus a manifest: shards are written as `.part`
and renamed, so a killed run resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.corpus import document_ids, read_texts
from curator.errors import CuratorError
from curator.influence.factors import FactorsRecord, get_factors, load_layer_factors, load_model_for, load_tensors
from curator.influence.ekfac import (eigen_bases, random_bases, sketch_eigen_frame, sketch_tokens, subspace_bases,
                               whitened_subspace_bases)
from curator.model.losses import backward_layers
from curator.model.loading import LoadedModel
from curator.model.document_pass import NoProgress, PassProgress, Timer
from curator.catalog.queries import Query, select_queries
from curator.influence.score import check_compatible, prepare_queries
from curator.model.tokens import batches, pad_token_id, tokenize_documents
from curator.catalog.workspace import Workspace

STORE_VERSION = 1


class SketchConfig(BaseModel):
    suite: str = Field(description="query selector whose preconditioned gradients span the bases")
    method: Literal["query-subspace", "whitened-subspace", "eigen", "random"] = "query-subspace"
    rank: int | None = Field(None, ge=1, description="k per layer (sketch k × k per layer)")
    budget_bytes: int | None = Field(None, ge=1, description="bytes per document, spread over layers")
    dtype: Literal["float16", "float32"] = "float16"
    factors: str | None = None
    model: str | None = None
    chat_template: Literal["auto", "none"] = "auto"
    max_docs: int | None = None
    batch_tokens: int = Field(4096, ge=2)
    shard_docs: int = Field(4096, ge=1)
    device: str = "cpu"
    seed: int = 0


class SketchStore(BaseModel):
    """The manifest: everything needed to sketch a query the same way, and the shards."""

    id: str
    version: int = STORE_VERSION
    factors_id: str
    model_id: str
    tokenizer_id: str
    method: str
    suite: list[str]
    modules: list[str]
    ranks: dict[str, list[int]]      # [k_out, k_in] per layer
    dim: int
    dtype: str
    seed: int
    max_seq_len: int
    chat_template: str
    shards: list[dict] = Field(default_factory=list)
    documents: int = 0
    complete: bool = False
    fidelity: dict | None = None     # mean agreement with exact scores on held-out queries
    seconds: dict[str, float] = Field(default_factory=dict)   # "bases", "documents" (this run's part)
    tokens: int = 0                  # tokens sketched, padding excluded

    @property
    def bytes_per_doc(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize


def allocate_ranks(energy: dict[str, float], shapes: dict[str, tuple[int, int]], rank: int | None,
                   budget_bytes: int | None, itemsize: int) -> dict[str, list[int]]:
    """[k_out, k_in] per layer: `rank` on each side (capped by the layer's size), or k² ∝ the layer's share
    of the suite's query energy within the byte budget."""
    if (rank is None) == (budget_bytes is None):
        raise CuratorError("give exactly one of --rank and --budget-bytes")
    if rank is not None:
        return {name: [min(rank, d_out), min(rank, d_in)] for name, (d_out, d_in) in shapes.items()}
    dims = budget_bytes // itemsize
    total = sum(energy.values()) or 1.0
    ranks = {}
    for name, (d_out, d_in) in shapes.items():
        k = max(1, int(math.sqrt(dims * energy[name] / total)))
        ranks[name] = [min(k, d_out), min(k, d_in)]
    if sum(a * b for a, b in ranks.values()) > dims:
        raise CuratorError(f"--budget-bytes {budget_bytes:,} is too small for one dimension per layer "
                           f"({len(shapes)} layers × {itemsize} bytes)")
    return ranks


def _store_id(record: FactorsRecord, suite: list[Query], config: SketchConfig, ids: list[int], max_len: int) -> str:
    digest = hashlib.blake2b(digest_size=6)
    settings = config.model_dump(include={"method", "rank", "budget_bytes", "dtype", "chat_template", "seed"})
    digest.update(json.dumps([record.id, [q.model_dump() for q in suite], settings, ids, max_len],
                             sort_keys=True).encode())
    return f"sketch-{digest.hexdigest()}"


def build_bases(loaded: LoadedModel, modules: dict, ws: Workspace, record: FactorsRecord, suite: list[Query],
                config: SketchConfig, max_len: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, record).items()}
    prepared, _ = prepare_queries(loaded, modules, factors, suite, max_len, config.chat_template, None,
                                  config.batch_tokens, eigen_frame=True)
    energy = {name: float((p.double() ** 2).sum()) for name, p in prepared.items()}
    shapes = {name: tuple(p.shape[1:]) for name, p in prepared.items()}
    itemsize = np.dtype(config.dtype).itemsize
    ranks = allocate_ranks(energy, shapes, config.rank, config.budget_bytes, itemsize)
    bases, query_bases = {}, {}
    if config.method == "eigen":
        tensors, _ = load_tensors(ws.root / record.path)
    for number, name in enumerate(modules):
        k_out, k_in = ranks[name]
        if config.method == "query-subspace":
            u, v = subspace_bases(prepared[name].cpu(), factors[name].to("cpu"), k_out, k_in)
        elif config.method == "whitened-subspace":
            (u, v), (uq, vq) = whitened_subspace_bases(prepared[name].cpu(), factors[name].to("cpu"), k_out, k_in)
            query_bases[name] = (uq.contiguous(), vq.contiguous())
        elif config.method == "eigen":
            t = tensors[name]
            u, v = eigen_bases(factors[name].to("cpu"), t["s_eigvals"], t["a_eigvals"], k_out, k_in)
        else:
            # A seed per layer: a layer's draw does not depend on the ranks of the layers before it.
            u, v = random_bases(*shapes[name], k_out, k_in, seed=config.seed * 1_000_003 + number)
        bases[name] = (u.contiguous(), v.contiguous())
    return bases, {"ranks": ranks, "energy": energy, "query_bases": query_bases}


def sketch(ws: Workspace, config: SketchConfig, *, loaded: LoadedModel | None = None,
           progress: PassProgress | None = None) -> SketchStore:
    from safetensors.torch import load_file, save_file

    progress = progress or NoProgress()
    timer = Timer()
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog, config.factors)
        suite = select_queries(catalog, config.suite)
        ids = document_ids(catalog, config.max_docs, config.seed)
    loaded = loaded or load_model_for(ws, record, model=config.model, device=config.device)
    modules = check_compatible(loaded, record, None)
    max_len = record.settings["max_seq_len"]
    store_id = _store_id(record, suite, config, ids, max_len)
    directory = ws.artifact_dir("sketches") / store_id
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file() and (directory / "bases.safetensors").is_file():
        store = SketchStore.model_validate_json(manifest_path.read_text())
        if store.complete:
            return store
        flat = load_file(str(directory / "bases.safetensors"))
        bases = {name: (flat[f"{name}::u"], flat[f"{name}::v"]) for name in store.modules}
    else:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        with timer("bases"):
            bases, info = build_bases(loaded, modules, ws, record, suite, config, max_len)
        # Documents are sketched with u, v; queries with uq, vq where a method has its own (else u, v).
        tensors = {f"{n}::{k}": t for n, (u, v) in bases.items() for k, t in (("u", u), ("v", v))}
        tensors.update({f"{n}::{k}": t for n, (u, v) in info["query_bases"].items() for k, t in (("uq", u), ("vq", v))})
        save_file(tensors, str(directory / "bases.safetensors"))
        store = SketchStore(id=store_id, factors_id=record.id, model_id=loaded.info.id,
                            tokenizer_id=loaded.info.tokenizer_id, method=config.method,
                            suite=[q.id for q in suite], modules=list(modules), ranks=info["ranks"],
                            dim=sum(a * b for a, b in info["ranks"].values()), dtype=config.dtype, seed=config.seed,
                            max_seq_len=max_len, chat_template=config.chat_template)
        _write_manifest(directory, store)
    device_bases = {n: (u.to(loaded.device), v.to(loaded.device)) for n, (u, v) in bases.items()}
    progress.stage(f"sketch: {store.dim:,} dims, {store.bytes_per_doc:,} bytes/doc", len(ids))
    shards, tokens = [], 0
    with Catalog.open(ws) as catalog:
        for number, start in enumerate(range(0, len(ids), config.shard_docs)):
            shard_ids = ids[start:start + config.shard_docs]
            name = f"shard-{number:05d}"
            if not (directory / f"{name}.npy").is_file():
                with timer("documents"):
                    vectors, shard_tokens = sketch_documents(loaded, modules, device_bases, catalog, shard_ids,
                                                             max_len, config.batch_tokens, progress)
                tokens += shard_tokens
                _save_array(directory / f"{name}.ids.npy", np.asarray(shard_ids, dtype=np.int64))
                _save_array(directory / f"{name}.npy", vectors.astype(config.dtype))
            else:
                progress.advance(len(shard_ids), 0)
            shards.append({"file": f"{name}.npy", "ids": f"{name}.ids.npy", "documents": len(shard_ids)})
    # A resumed run reports the time and tokens of what it did itself.
    store = store.model_copy(update={"shards": shards, "documents": len(ids), "complete": True,
                                     "seconds": timer.seconds, "tokens": tokens})
    _write_manifest(directory, store)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("DELETE FROM sketch_stores WHERE id = ?", [store.id])
        catalog.sql("INSERT INTO sketch_stores (id, path, factors_id, method, manifest) VALUES (?, ?, ?, ?, ?)",
                    [store.id, str(directory.relative_to(ws.root)), store.factors_id, store.method,
                     store.model_dump_json()])
    return store


def sketch_documents(loaded, modules, bases, catalog, ids, max_len, batch_tokens, progress
                     ) -> tuple[np.ndarray, int]:
    """(len(ids), dim) float64 sketches, each the sum over the document's windows, and the tokens sketched."""
    position = {doc_id: i for i, doc_id in enumerate(ids)}
    rows = [row for part in read_texts(catalog, ids, chunk=len(ids)) for row in part]
    windows, _ = tokenize_documents(loaded.tokenizer, rows, max_len)
    offsets, start = {}, 0
    for name in modules:
        k_out, k_in = bases[name][0].shape[1], bases[name][1].shape[1]
        offsets[name] = (start, start + k_out * k_in)
        start += k_out * k_in
    out = torch.zeros(len(ids), start, dtype=torch.float64)
    tokens = 0
    for batch in batches(windows, batch_tokens, pad_token_id(loaded.tokenizer), loaded.device):
        part = torch.zeros(batch.input_ids.shape[0], start, device=loaded.device)

        def on_layer(name, a, delta, part=part):
            lo, hi = offsets[name]
            part[:, lo:hi] = sketch_tokens(a, delta, *bases[name]).reshape(part.shape[0], -1)

        backward_layers(loaded.model, modules, batch, on_layer, labels="data")
        out.index_add_(0, torch.tensor([position[o] for o in batch.owners.tolist()]), part.double().cpu())
        progress.advance(0, batch.tokens)
        tokens += batch.tokens
    progress.advance(len(ids), 0)
    if not bool(torch.isfinite(out).all()):
        bad = ids[int(torch.nonzero(~torch.isfinite(out).all(dim=1))[0, 0])]
        raise CuratorError(f"the sketch of document {bad} is NaN or infinite (the model overflowed on it)")
    return out.numpy(), tokens


def sketch_queries(ws: Workspace, store: SketchStore, loaded: LoadedModel, queries: list[Query],
                   batch_tokens: int = 4096) -> tuple[np.ndarray, dict[str, float]]:
    """(Q, dim) float32 query sketches Uᵀ P_q V with the store's own bases and settings, and ℓ(q)."""
    from safetensors.torch import load_file

    directory = ws.root / "sketches" / store.id
    flat = load_file(str(directory / "bases.safetensors"))
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog, store.factors_id)
    modules = check_compatible(loaded, record, None)
    factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, record).items()}
    prepared, losses = prepare_queries(loaded, modules, factors, queries, store.max_seq_len, store.chat_template,
                                       None, batch_tokens, eigen_frame=True)
    parts = [sketch_eigen_frame(prepared[name], factors[name],
                                flat.get(f"{name}::uq", flat[f"{name}::u"]).to(loaded.device),
                                flat.get(f"{name}::vq", flat[f"{name}::v"]).to(loaded.device)).reshape(len(queries), -1)
             for name in store.modules]
    return torch.cat(parts, dim=1).cpu().numpy(), losses


def load_store(ws: Workspace, store_id: str | None = None) -> SketchStore:
    with Catalog.open(ws) as catalog:
        if store_id is None:
            row = catalog.one("SELECT manifest FROM sketch_stores ORDER BY created_at DESC LIMIT 1")
        else:
            row = catalog.one("SELECT manifest FROM sketch_stores WHERE starts_with(id, ?)", [store_id])
    if row is None:
        raise CuratorError("no sketch store" + (f" matches {store_id!r}" if store_id else "; run `curator sketch`"))
    return SketchStore.model_validate_json(row[0])


def iter_shards(ws: Workspace, store: SketchStore):
    """(doc ids, float32 vectors) per shard, in store order."""
    directory = ws.root / "sketches" / store.id
    for shard in store.shards:
        yield np.load(directory / shard["ids"]), np.load(directory / shard["file"]).astype(np.float32)


def _save_array(path: Path, array: np.ndarray) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as handle:
        np.save(handle, array)
    part.replace(path)


def _write_manifest(directory: Path, store: SketchStore) -> None:
    part = directory / "manifest.json.part"
    part.write_text(store.model_dump_json(indent=2))
    part.replace(directory / "manifest.json")


def record_fidelity(ws: Workspace, store: SketchStore, result: dict) -> SketchStore:
    """Keep a fidelity measurement with the store (manifest and catalog)."""
    store = store.model_copy(update={"fidelity": {k: result[k] for k in ("queries", "documents", "mean")}})
    _write_manifest(ws.root / "sketches" / store.id, store)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("UPDATE sketch_stores SET manifest = ? WHERE id = ?", [store.model_dump_json(), store.id])
    return store
