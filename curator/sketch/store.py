"""A sketch store on disk: a folder of shards plus a manifest (DESIGN.md, "Conventions").

    sketches/<store id>/manifest.json         the SketchStore below (settings, ranks, shards)
    sketches/<store id>/bases.safetensors     U, V per layer (and Uq, Vq where queries use their own)
    sketches/<store id>/<shard>.npy           documents × dim sketches, float16 or float32
    sketches/<store id>/<shard>.ids.npy       their document ids
    sketches/<store id>/<shard>.scales.npy    one scale per layer: stored values × scale = the sketch

A shard is named by the documents it holds, so a resumed run with another shard
size never takes a shard for one it is not. float16 shards are scaled per layer
(by a power of two, so the scaling itself is exact) to put each layer's largest
value near 2¹⁴: a layer whose values pass float16's 65,504 or fall below its
smallest normal number is stored without overflow or underflow.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from curator.artifacts import NOT_IDENTITY, Settings, content_id, reading, write_numpy_atomic, write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.records import find_record
from curator.catalog.workspace import Workspace
from curator.constants import DEVICE_PATTERN, ChatTemplate, ModelDType, SketchBudgetSplit, SketchMethod, SketchPrecision
from curator.errors import ArtifactError, CuratorError

# 2: float16 shards carry per-layer scales; `precision` replaced `dtype`.
STORE_VERSION = 2
FLOAT16_TARGET = 2.0 ** 14     # a layer's largest magnitude after scaling: headroom below 65,504


class SketchConfig(Settings):
    """Every knob of a sketch store; its identity names the store."""

    suite: str = Field(description="query selector whose preconditioned gradients span the bases",
                       json_schema_extra=NOT_IDENTITY)      # the suite's content is in the store id instead
    method: SketchMethod = "whitened-subspace"
    rank: int | None = Field(None, ge=1, description="k per layer (sketch k × k per layer)")
    budget_bytes: int | None = Field(None, ge=1, description="bytes per document, spread over layers")
    budget_split: SketchBudgetSplit | None = Field(
        None, description="how budget_bytes is spread: the same k on every layer, or k² in proportion to the "
                          "suite's query energy per layer; None: uniform, unless the store these settings built "
                          "with the energy split (the default until 2026-12-02) exists, which is then extended")
    precision: SketchPrecision = Field("float16", description="storage precision of the sketches")
    factors: str | None = Field(None, description="fit id (or unique prefix); default: the latest fit",
                                json_schema_extra=NOT_IDENTITY)   # the resolved fit id is in the store id
    model: str | None = Field(None, json_schema_extra=NOT_IDENTITY)
    dtype: ModelDType = Field("float32", description="the model's dtype")
    chat_template: ChatTemplate = "auto"
    max_docs: int | None = None
    batch_tokens: int = Field(4096, ge=2, json_schema_extra=NOT_IDENTITY)
    shard_docs: int = Field(4096, ge=1, description="documents per shard", json_schema_extra=NOT_IDENTITY)
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N",
                        json_schema_extra=NOT_IDENTITY)
    seed: int = 0
    document_share: float = Field(0.25, ge=0.0, le=1.0,
                                  description="mixed: share of each layer's directions (per side) that carry the "
                                              "documents' own gradient energy instead of the suite's")
    document_sample: int = Field(256, ge=2, description="mixed: documents whose gradients give those directions")

    def identity(self) -> dict:
        # Settings of the mixed bases mean nothing to other methods: leaving them out keeps those
        # stores' ids what they were before the fields existed.
        found = super().identity()
        if self.method != "mixed":
            found.pop("document_share", None)
            found.pop("document_sample", None)
        # The split means nothing to --rank, and every budgeted store before the setting existed was
        # split by energy: leaving it out then keeps those ids. Not chosen yet means uniform.
        if self.budget_bytes is None or self.budget_split == "energy":
            found.pop("budget_split", None)
        else:
            found["budget_split"] = self.budget_split or "uniform"
        return found


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
    precision: str                   # float16 | float32
    seed: int
    max_seq_len: int
    chat_template: str
    shards: list[dict] = Field(default_factory=list)
    documents: int = 0
    complete: bool = False
    fidelity: dict | None = None     # mean agreement with exact scores on held-out queries
    seconds: dict[str, float] = Field(default_factory=dict)   # "bases", "documents" (this run's part)
    tokens: int = 0                  # tokens sketched, padding excluded
    settings: dict = Field(default_factory=dict)   # the SketchConfig that built it, as given

    @property
    def bytes_per_doc(self) -> int:
        return self.dim * np.dtype(self.precision).itemsize

    def layer_sizes(self) -> list[int]:
        return [self.ranks[name][0] * self.ranks[name][1] for name in self.modules]


def store_dir(ws: Workspace, store_id: str) -> Path:
    return ws.root / "sketches" / store_id


def rebuild_command(store: SketchStore) -> str:
    """The `curator sketch` command that builds this store again (same settings, so the same id)."""
    s = store.settings
    parts = ["curator", "sketch", "--suite", s.get("suite") or ",".join(store.suite), "--method", store.method,
             "--factors", store.factors_id, "--precision", store.precision, "--seed", str(store.seed)]
    if s.get("rank") is not None:
        parts += ["--rank", str(s["rank"])]
    if s.get("budget_bytes") is not None:
        # A store from before the split was a setting spread its budget by energy.
        parts += ["--budget-bytes", str(s["budget_bytes"]), "--budget-split", s.get("budget_split") or "energy"]
    if store.method == "mixed":
        parts += ["--document-share", str(s.get("document_share", 0.25)),
                  "--document-sample", str(s.get("document_sample", 256))]
    if s.get("dtype", "float32") != "float32":
        parts += ["--dtype", s["dtype"]]
    return shlex.join(parts) + " --force"


MANIFEST_REBUILD = "curator sketch --suite QUERIES --force (with the store's settings)"


def shard_name(doc_ids: list[int]) -> str:
    return content_id("shard", doc_ids)


# -- float16 encoding -------------------------------------------------------------

def encode(vectors: np.ndarray, layer_sizes: list[int], precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored values, per-layer scales) for float64 sketches (documents × dim).

    float32 stores keep scale 1. float16 divides each layer's block by a power of two that
    brings its largest magnitude to about 2¹⁴; the result is checked after the cast.
    """
    scales = np.ones(len(layer_sizes), dtype=np.float64)     # float64: a tiny layer's scale must not underflow
    if not np.isfinite(vectors).all():
        raise CuratorError("a sketch is not finite (the model overflowed); nothing was written")
    if precision == "float32":
        stored = vectors.astype(np.float32)
    else:
        stored = np.empty(vectors.shape, dtype=np.float16)
        start = 0
        for layer, size in enumerate(layer_sizes):
            block = vectors[:, start:start + size]
            peak = float(np.abs(block).max()) if block.size else 0.0
            if peak > 0:
                scales[layer] = 2.0 ** math.floor(math.log2(peak / FLOAT16_TARGET))
            stored[:, start:start + size] = block / scales[layer]
            start += size
    if not np.isfinite(stored).all():
        raise CuratorError(f"a sketch is not finite after the cast to {precision}; nothing was written")
    return stored, scales


def decode(stored: np.ndarray, scales: np.ndarray, layer_sizes: list[int]) -> np.ndarray:
    """float32 sketches from stored values and per-layer scales."""
    return (stored.astype(np.float64) * np.repeat(scales, layer_sizes)[None, :]).astype(np.float32)


# -- files ----------------------------------------------------------------------------

def write_shard(directory: Path, name: str, doc_ids: list[int], vectors: np.ndarray, store: SketchStore) -> dict:
    stored, scales = encode(vectors, store.layer_sizes(), store.precision)
    write_numpy_atomic(directory / f"{name}.ids.npy", np.asarray(doc_ids, dtype=np.int64))
    write_numpy_atomic(directory / f"{name}.scales.npy", scales)
    # The vectors go last: their file is what marks the shard as done.
    write_numpy_atomic(directory / f"{name}.npy", stored)
    return shard_entry(name, len(doc_ids))


def shard_entry(name: str, documents: int) -> dict:
    return {"file": f"{name}.npy", "ids": f"{name}.ids.npy", "scales": f"{name}.scales.npy", "documents": documents}


def write_manifest(directory: Path, store: SketchStore) -> None:
    write_text_atomic(directory / "manifest.json", store.model_dump_json(indent=2))


def read_manifest(path: Path) -> SketchStore:
    """A store's manifest; one from another store version, or damaged, is an error saying how to rebuild."""
    with reading(path, "sketch store manifest", MANIFEST_REBUILD):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ArtifactError(f"the sketch store manifest {path} is damaged (not a JSON object); rebuild it with "
                            f"`{MANIFEST_REBUILD}`")
    if data.get("version") != STORE_VERSION:
        raise ArtifactError(f"the sketch store {path.parent} has format version {data.get('version')!r}; this "
                            f"curator reads version {STORE_VERSION}. Rebuild it with `{MANIFEST_REBUILD}`")
    try:
        return SketchStore.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"the sketch store manifest {path} is damaged ({exc.errors()[0]['msg']}); rebuild it "
                            f"with `{MANIFEST_REBUILD}`") from None


def iter_shards(ws: Workspace, store: SketchStore) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(doc ids, float32 vectors) per shard, in store order."""
    directory = store_dir(ws, store.id)
    sizes = store.layer_sizes()
    for shard in store.shards:
        path = directory / shard["file"]
        with reading(directory / shard["ids"], "sketch shard's document ids", rebuild_command(store)):
            ids = np.load(directory / shard["ids"])
        with reading(directory / shard["scales"], "sketch shard's layer scales", rebuild_command(store)):
            scales = np.load(directory / shard["scales"])
        with reading(path, "sketch shard", rebuild_command(store)):
            vectors = np.load(path)
            if vectors.shape != (len(ids), store.dim) or scales.shape != (len(sizes),):
                raise ValueError(f"shape {vectors.shape} for {len(ids)} documents of {store.dim} dimensions")
        yield ids, decode(vectors, scales, sizes)


def store_doc_ids(ws: Workspace, store: SketchStore) -> np.ndarray:
    """The documents a store holds, in store order (without reading the vectors)."""
    directory = store_dir(ws, store.id)
    parts = []
    for shard in store.shards:
        with reading(directory / shard["ids"], "sketch shard", rebuild_command(store)):
            parts.append(np.load(directory / shard["ids"]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# -- the catalog's view ----------------------------------------------------------------

def load_store(ws: Workspace, store_id: str | None = None) -> SketchStore:
    """A store by id (a unique prefix is enough), or the latest one, read from its manifest."""
    with Catalog.open(ws) as catalog:
        row = find_record(catalog, "sketch_stores", store_id, what="sketch store",
                          create_hint="run `curator sketch --suite QUERIES` first", columns="id, path")
    return read_manifest(ws.root / row[1] / "manifest.json")


def record_store(ws: Workspace, store: SketchStore) -> None:
    directory = store_dir(ws, store.id)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        catalog.sql("DELETE FROM sketch_stores WHERE id = ?", [store.id])
        catalog.sql("INSERT INTO sketch_stores (id, path, factors_id, method, manifest) VALUES (?, ?, ?, ?, ?)",
                    [store.id, str(directory.relative_to(ws.root)), store.factors_id, store.method,
                     store.model_dump_json()])
        catalog.sql("COMMIT")


def store_recorded(ws: Workspace, store: SketchStore) -> bool:
    """Whether the catalog's record of the store is this manifest's (an extended store whose recording
    failed has an older one)."""
    with Catalog.open(ws) as catalog:
        row = catalog.one("SELECT manifest FROM sketch_stores WHERE id = ?", [store.id])
    return row is not None and json.loads(row[0]).get("documents") == store.documents


def record_fidelity(ws: Workspace, store: SketchStore, result: dict) -> SketchStore:
    """Keep a fidelity measurement with the store (manifest and catalog)."""
    store = store.model_copy(update={"fidelity": {k: result[k] for k in ("queries", "documents", "mean", "groups")}})
    write_manifest(store_dir(ws, store.id), store)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("UPDATE sketch_stores SET manifest = ? WHERE id = ?", [store.model_dump_json(), store.id])
    return store
