"""EK-FAC factors on disk: one safetensors file per fit, named in the catalog.

Per tracked layer the file holds the covariances A and S (float64), their
eigenvalues and eigenvectors (float64), the corrected eigenvalues Λ and the
damping λ. The file's metadata repeats the fit's identity, so a file moved
without its catalog row still says what it belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel

from curator.artifacts import atomic_file, reading
from curator.catalog.database import Catalog
from curator.catalog.records import find_record
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.influence.ekfac import LayerFactors


class FactorsRecord(BaseModel):
    id: str
    model_id: str
    tokenizer_id: str
    path: str                 # relative to the workspace
    modules: list[str]
    settings: dict
    stats: dict


def save_tensors(path: Path, layers: dict[str, dict[str, torch.Tensor]], metadata: dict) -> None:
    """Write `path` via `path.part` and a rename, so no half-written file carries the final name."""
    from safetensors.torch import save_file

    flat = {f"{name}::{key}": tensor.detach().cpu().contiguous()
            for name, tensors in layers.items() for key, tensor in tensors.items()}
    with atomic_file(path) as part:
        save_file(flat, str(part), metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_tensors(path: Path, rebuild: str = "curator fit --force") -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The per-layer tensors and the metadata of a factors file; a missing or damaged file is one error
    naming it and the command that rebuilds it."""
    from safetensors import safe_open

    layers: dict[str, dict[str, torch.Tensor]] = {}
    with reading(path, "factors file", rebuild):
        with safe_open(str(path), framework="pt") as handle:
            metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            for key in handle.keys():
                name, field = key.rsplit("::", 1)
                layers.setdefault(name, {})[field] = handle.get_tensor(key)
    return layers, metadata


def finished_factors(path: Path, fit_id: str) -> FactorsRecord | None:
    """The record kept inside a complete factors file of this fit, if there is one (else None)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        record = FactorsRecord.model_validate(json.loads(metadata["record"]))
    except Exception:   # damaged or from an older curator: fit again
        return None
    return record if record.id == fit_id else None


def layer_factors(tensors: dict[str, torch.Tensor]) -> LayerFactors:
    return LayerFactors(q_a=tensors["a_eigvecs"], q_s=tensors["s_eigvecs"],
                        corrected=tensors["corrected"], damping=float(tensors["damping"]))


def record_factors(catalog: Catalog, record: FactorsRecord) -> None:
    catalog.sql("DELETE FROM factors WHERE id = ?", [record.id])
    catalog.sql(
        "INSERT INTO factors (id, model_id, tokenizer_id, path, modules, settings, stats) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [record.id, record.model_id, record.tokenizer_id, record.path, json.dumps(record.modules),
         json.dumps(record.settings), json.dumps(record.stats)],
    )


def get_factors(catalog: Catalog, factors_id: str | None = None) -> FactorsRecord:
    """A fit by id (a unique prefix is enough), or the latest one."""
    row = find_record(catalog, "factors", factors_id, what="fit", create_hint="run `curator fit --model M` first",
                      columns="id, model_id, tokenizer_id, path, modules, settings, stats")
    return FactorsRecord(id=row[0], model_id=row[1], tokenizer_id=row[2], path=row[3],
                         modules=json.loads(row[4]), settings=json.loads(row[5]), stats=json.loads(row[6]))


def load_layer_factors(ws: Workspace, record: FactorsRecord) -> dict[str, LayerFactors]:
    layers, _ = load_tensors(ws.root / record.path, rebuild=refit_command(record))
    missing = [m for m in record.modules if m not in layers]
    if missing:
        raise CuratorError(f"the factors file {ws.root / record.path} lacks layers {missing[:3]}; rebuild it with "
                           f"`{refit_command(record)}`")
    try:
        return {name: layer_factors(layers[name]) for name in record.modules}
    except KeyError as missing:
        raise CuratorError(f"the factors file {ws.root / record.path} lacks {missing}; rebuild it with "
                           f"`{refit_command(record)}`") from None


def refit_command(record: FactorsRecord) -> str:
    """The command that fits these factors again."""
    import shlex

    s = record.settings
    parts = ["curator", "fit", "--model", str(s.get("model")), "--modules", str(s.get("modules")),
             "--layers", str(s.get("layers")), "--max-seq-len", str(s.get("max_seq_len")),
             "--fisher", str(s.get("fisher", "sampled")), "--seed", str(s.get("seed", 0)),
             "--dtype", str(s.get("dtype", "float32"))]
    if s.get("max_docs"):
        parts += ["--max-docs", str(s["max_docs"])]
    if s.get("damping") is not None:
        parts += ["--damping", str(s["damping"])]
    return shlex.join(parts) + " --force"


def load_model_for(ws: Workspace, record: FactorsRecord, *, model: str | None = None, device: str = "cpu",
                   dtype: str = "float32"):
    """The model a fit was made for: `model` if given (checked later against the fit), else the name the fit
    was given (e.g. smollm2-135m) while it still resolves, else where the model was loaded from."""
    from curator.model.loading import ModelLoadError, load_model, resolve

    if model is None:
        try:
            resolve(record.settings["model"])
            model = record.settings["model"]
        except ModelLoadError:
            with Catalog.open(ws) as catalog:
                row = catalog.one("SELECT location FROM models WHERE id = ?", [record.model_id])
            model = row[0] if row else record.settings["model"]
    return load_model(model, device=device, dtype=dtype)
