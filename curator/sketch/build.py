"""`curator sketch`: compressed per-document gradients for fast ad-hoc queries.

Per tracked layer, bases U, V are chosen once (curator/sketch/bases.py). A
document's sketch is Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ per layer, streamed per token with
parameters frozen by the shared document pass, summed over its windows and
flattened; a query's is Uᵀ P_q V (with the query bases where a method has its
own). Their inner product approximates I(q, d).

The store (curator/sketch/store.py) is written shard by shard; a killed run
resumes with the shards on disk, on any number of ranks, and a store over the
whole catalog grows by new shards after another ingest.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from curator.artifacts import content_id
from curator.catalog.database import Catalog
from curator.catalog.documents import document_ids
from curator.catalog.queries import Query, select_queries
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.influence.ekfac import LayerFactors, sketch_eigen_frame, sketch_tokens
from curator.influence.factors import FactorsRecord, get_factors, load_layer_factors, load_model_for
from curator.influence.queries import check_compatible, prepare_queries
from curator.model import distributed
from curator.model.document_pass import NoProgress, PassProgress, PassSettings, Timer, chunks_of, document_pass
from curator.model.loading import LoadedModel
from curator.sketch.bases import build_bases, load_bases, save_bases
from curator.sketch.store import (
    SketchConfig,
    SketchStore,
    read_manifest,
    rebuild_command,
    record_store,
    store_doc_ids,
    store_recorded,
    shard_entry,
    shard_name,
    store_dir,
    write_manifest,
    write_shard,
)


def sketch(ws: Workspace, config: SketchConfig, *, loaded: LoadedModel | None = None,
           progress: PassProgress | None = None, force: bool = False) -> SketchStore:
    """Build (or finish, or extend, or reuse) the sketch store these settings name.

    A store over the whole catalog is named without its documents: after another ingest
    the same command sketches only the new documents and appends their shards. Under
    torchrun rank 0 builds the bases and writes the manifest; every rank writes the shards
    of its share of the chunks.
    """
    ranks = distributed.current()
    progress = progress or NoProgress()
    timer = Timer()
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog, config.factors)
        suite = select_queries(catalog, config.suite)
        ids = document_ids(catalog, config.max_docs, config.seed)
    loaded = loaded or load_model_for(ws, record, model=config.model, device=ranks.device(config.device),
                                      dtype=config.dtype)
    modules = check_compatible(loaded, record, None)
    max_len = record.settings["max_seq_len"]
    documents = "all documents" if config.max_docs is None else ids
    config = _budget_split_chosen(ws, config, record, suite, documents, max_len)
    store_id = _store_id(config, record, suite, documents, max_len)
    directory = store_dir(ws, store_id)

    plan = None
    if ranks.main:
        store = _open_store(ws, directory, store_id, loaded, modules, record, suite, config, max_len, force, timer)
        todo = np.setdiff1d(np.asarray(ids, dtype=np.int64), store_doc_ids(ws, store)).tolist()
        plan = {"store": store, "todo": todo}
    plan = ranks.share(plan)
    store, todo = plan["store"], plan["todo"]
    if not todo and store.complete:
        # Recorded unless the catalog was locked when the run ended: then recording is all that is left.
        if ranks.main and not store_recorded(ws, store):
            record_store(ws, store)
        return store

    bases, _ = load_bases(directory / "bases.safetensors", store.modules, rebuild_command(store))
    device_bases = {n: (u.to(loaded.device), v.to(loaded.device)) for n, (u, v) in bases.items()}
    bounds = list(itertools.accumulate(store.layer_sizes(), initial=0))
    offsets = {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(store.modules)}

    def sketch_layer(name, a, delta, _batch, output):
        lo, hi = offsets[name]
        output[:, lo:hi] = sketch_tokens(a, delta, *device_bases[name]).reshape(output.shape[0], -1)

    def save_shard(_number, chunk, sums):
        if not bool(torch.isfinite(sums).all()):
            bad = chunk[int(torch.nonzero(~torch.isfinite(sums).all(dim=1))[0, 0])]
            raise CuratorError(f"the sketch of document {bad} is NaN or infinite (the model overflowed on it; try "
                               f"--dtype float32)")
        write_shard(directory, shard_name(chunk), chunk, sums.numpy(), store)

    chunks = chunks_of(todo, config.shard_docs)
    settings = PassSettings(max_len=max_len, batch_tokens=config.batch_tokens, chunk_docs=config.shard_docs)
    with Catalog.open(ws, hold=False) as catalog, timer("documents"):
        seen = document_pass(loaded.model, modules, loaded.tokenizer, catalog, todo, settings, sketch_layer,
                             width=store.dim, on_chunk=save_shard,
                             chunk_done=lambda _n, chunk: (directory / f"{shard_name(chunk)}.npy").is_file(),
                             progress=progress, ranks=ranks,
                             description=f"sketch: {store.dim:,} dims, {store.bytes_per_doc:,} bytes/doc")
    tokens = ranks.all_sum(seen.tokens)        # every rank has written its shards once this is in
    if not ranks.main:
        return ranks.share(None)
    added = [shard_entry(shard_name(chunk), len(chunk)) for chunk in chunks]
    present = set(os.listdir(directory))     # a listing also refreshes a network filesystem's view
    missing = [entry["file"] for entry in added if entry["file"] not in present]
    if missing:
        raise CuratorError(f"{len(missing)} shards are missing from {directory} (a rank stopped early?); run the "
                           f"same command again to finish them")
    # A resumed or extended run reports the time and tokens of what it did itself.
    store = store.model_copy(update={"shards": [*store.shards, *added], "documents": store.documents + len(todo),
                                     "complete": True, "seconds": timer.seconds,
                                     "tokens": tokens})
    _remove_unlisted_shards(directory, store)
    write_manifest(directory, store)
    record_store(ws, store)
    return ranks.share(store)


def _store_id(config: SketchConfig, record, suite: list[Query], documents, max_len: int) -> str:
    """What names a store: the fit, the suite's queries, the settings, the documents and the window."""
    return content_id("sketch", record.id, [q.model_dump() for q in suite], config.identity(), documents, max_len)


def _budget_split_chosen(ws: Workspace, config: SketchConfig, record, suite, documents, max_len: int) -> SketchConfig:
    """The config with its budget split decided: as given; else uniform, unless the store the same settings
    made with the energy split (the default before uniform) exists. Then the same command, run again after
    another ingest, extends that store with the new documents, as it did, instead of building a second
    store over every document."""
    if config.budget_split is not None:
        return config
    if config.budget_bytes is not None:
        energy = config.model_copy(update={"budget_split": "energy"})
        if (store_dir(ws, _store_id(energy, record, suite, documents, max_len)) / "manifest.json").is_file():
            return energy
    return config.model_copy(update={"budget_split": "uniform"})


def _open_store(ws: Workspace, directory, store_id: str, loaded: LoadedModel, modules: dict, record, suite, config,
                max_len: int, force: bool, timer: Timer) -> SketchStore:
    """The store's manifest as on disk, or a new store with its bases built (rank 0 only)."""
    import shutil

    manifest_path = directory / "manifest.json"
    if force:
        shutil.rmtree(directory, ignore_errors=True)
    if manifest_path.is_file() and (directory / "bases.safetensors").is_file():
        return read_manifest(manifest_path)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with timer("bases"):
        bases, info = build_bases(loaded, modules, ws, record, suite, config, max_len)
    save_bases(directory / "bases.safetensors", bases, info["query_bases"])
    store = SketchStore(id=store_id, factors_id=record.id, model_id=loaded.info.id,
                        tokenizer_id=loaded.info.tokenizer_id, method=config.method,
                        suite=[q.id for q in suite], modules=list(modules), ranks=info["ranks"],
                        dim=sum(a * b for a, b in info["ranks"].values()), precision=config.precision,
                        seed=config.seed, max_seq_len=max_len, chat_template=config.chat_template,
                        settings=config.model_dump(mode="json"))
    write_manifest(directory, store)
    return store


def _remove_unlisted_shards(directory, store: SketchStore) -> None:
    """Shards of an earlier plan (another shard size) that this store does not list."""
    listed = {name for shard in store.shards for name in (shard["file"], shard["ids"], shard["scales"])}
    for path in directory.glob("shard-*"):      # with the .part of a shard a killed run was writing
        if path.name not in listed:
            path.unlink()


@dataclass
class QueryFrame:
    """What sketching a query takes from a store besides the model: its fit's record, the fit's factors
    and the store's query bases, on one device. Loading them reads the factors file, so a server builds
    one per store and reuses it (curator/service/search.py); the CLI builds one per call."""

    record: FactorsRecord
    factors: dict[str, LayerFactors]
    query_bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    device: str


def load_query_frame(ws: Workspace, store: SketchStore, device, record: FactorsRecord | None = None) -> QueryFrame:
    """Read the store's query bases and its fit's factors onto `device`."""
    if record is None:
        with Catalog.open(ws) as catalog:
            record = get_factors(catalog, store.factors_id)
    _, query_bases = load_bases(store_dir(ws, store.id) / "bases.safetensors", store.modules,
                                rebuild_command(store))
    factors = {name: f.to(device) for name, f in load_layer_factors(ws, record).items()}
    on_device = {name: (u.to(device), v.to(device)) for name, (u, v) in query_bases.items()}
    return QueryFrame(record=record, factors=factors, query_bases=on_device, device=str(device))


def sketch_queries(ws: Workspace, store: SketchStore, loaded: LoadedModel, queries: list[Query],
                   batch_tokens: int = 4096, *, frame: QueryFrame | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """(Q, dim) float32 query sketches Uᵀ P_q V with the store's own bases and settings, and ℓ(q).

    `frame`: the store's factors and query bases already loaded on the model's device (else read here)."""
    frame = frame or load_query_frame(ws, store, loaded.device)
    if frame.device != str(loaded.device):
        raise CuratorError(f"the query frame is on {frame.device} but the model on {loaded.device}")
    modules = check_compatible(loaded, frame.record, None)
    prepared, losses = prepare_queries(loaded, modules, frame.factors, queries, store.max_seq_len,
                                       store.chat_template, None, batch_tokens, eigen_frame=True)
    parts = [sketch_eigen_frame(prepared[name], frame.factors[name], *frame.query_bases[name])
             .reshape(len(queries), -1) for name in store.modules]
    return torch.cat(parts, dim=1).cpu().numpy(), losses
