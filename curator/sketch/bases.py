"""Sketch bases: per tracked layer, U (d_out × k_out) and V (d_in × k_in), chosen once per store.

  whitened-subspace  (default) the top singular vectors of the suite's preconditioned
                  query gradients in whitened eigen-coordinates (a rank-1 fit of
                  √(Λ + λ)); documents and queries use dual bases. Ahead of
                  query-subspace at every rank from 16 up (docs/benchmarks.md);
  query-subspace  the same subspace chosen from the P_q themselves (DESIGN.md, "Sketches");
  eigen, random   baselines that ignore the queries (top Fisher eigenvectors, or seeded
                  Gaussian projections), kept so comparisons reproduce.
The math is in curator/influence/ekfac.py; this module picks ranks and saves the bases.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from curator.artifacts import atomic_file, reading
from curator.catalog.queries import Query
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError
from curator.influence.ekfac import (eigen_bases, random_bases, subspace_bases, whitened_subspace_bases)
from curator.influence.factors import FactorsRecord, load_layer_factors, load_tensors, refit_command
from curator.influence.queries import prepare_queries
from curator.model.loading import LoadedModel
from curator.sketch.store import SketchConfig

Bases = dict[str, tuple[torch.Tensor, torch.Tensor]]


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


def build_bases(loaded: LoadedModel, modules: dict, ws: Workspace, record: FactorsRecord, suite: list[Query],
                config: SketchConfig, max_len: int) -> tuple[Bases, dict]:
    """The bases of every tracked layer, and what chose them: {"ranks", "energy", "query_bases"}."""
    factors = {name: f.to(loaded.device) for name, f in load_layer_factors(ws, record).items()}
    prepared, _ = prepare_queries(loaded, modules, factors, suite, max_len, config.chat_template, None,
                                  config.batch_tokens, eigen_frame=True)
    energy = {name: float((p.double() ** 2).sum()) for name, p in prepared.items()}
    shapes = {name: tuple(p.shape[1:]) for name, p in prepared.items()}
    itemsize = np.dtype(config.precision).itemsize
    ranks = allocate_ranks(energy, shapes, config.rank, config.budget_bytes, itemsize)
    bases, query_bases = {}, {}
    if config.method == "eigen":
        tensors, _ = load_tensors(ws.root / record.path, rebuild=refit_command(record))
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


def save_bases(path: Path, bases: Bases, query_bases: Bases) -> None:
    """Documents are sketched with u, v; queries with uq, vq where a method has its own (else u, v)."""
    from safetensors.torch import save_file

    tensors = {f"{n}::{k}": t for n, (u, v) in bases.items() for k, t in (("u", u), ("v", v))}
    tensors.update({f"{n}::{k}": t for n, (u, v) in query_bases.items() for k, t in (("uq", u), ("vq", v))})
    with atomic_file(path) as part:
        save_file(tensors, str(part))


def load_bases(path: Path, modules: list[str], rebuild: str) -> tuple[Bases, Bases]:
    """(document bases, query bases) per layer."""
    from safetensors.torch import load_file

    with reading(path, "sketch bases file", rebuild):
        flat = load_file(str(path))
        documents = {name: (flat[f"{name}::u"], flat[f"{name}::v"]) for name in modules}
        queries = {name: (flat.get(f"{name}::uq", flat[f"{name}::u"]), flat.get(f"{name}::vq", flat[f"{name}::v"]))
                   for name in modules}
    return documents, queries
