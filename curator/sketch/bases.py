"""Sketch bases: per tracked layer, U (d_out × k_out) and V (d_in × k_in), chosen once per store.

  whitened-subspace  (default) the top singular vectors of the suite's preconditioned
                  query gradients in whitened eigen-coordinates (a rank-1 fit of
                  √(Λ + λ)); documents and queries use dual bases. Ahead of
                  query-subspace at every rank from 16 up (docs/benchmarks.md);
  mixed           whitened-subspace's suite directions interleaved with query-agnostic ones that
                  carry the documents' own gradient energy in the same whitened frame (a seeded
                  sample of the store's documents), a `document_share` of each side's columns.
                  Measured below whitened-subspace at every share and rank, on cross-format
                  queries too (docs/sketches.md); kept so the comparison reproduces;
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
from curator.influence.ekfac import (
    LayerFactors,
    eigen_bases,
    random_bases,
    subspace_bases,
    whitened_frame_bases,
    whitened_subspace_bases,
    whitening_maps,
    whitening_scales,
)
from curator.influence.factors import FactorsRecord, load_layer_factors, load_tensors, refit_command
from curator.influence.queries import prepare_queries
from curator.model.loading import LoadedModel
from curator.sketch.store import SketchConfig

Bases = dict[str, tuple[torch.Tensor, torch.Tensor]]


def allocate_ranks(energy: dict[str, float], shapes: dict[str, tuple[int, int]], rank: int | None,
                   budget_bytes: int | None, itemsize: int, split: str = "uniform") -> dict[str, list[int]]:
    """[k_out, k_in] per layer: `rank` on each side (capped by the layer's size), or, within the byte
    budget, the same k on every layer (`split` "uniform", the largest that fits) or k² ∝ the layer's
    share of the suite's query energy ("energy"). Uniform is the default: on queries phrased unlike the
    suite it ranked better (Spearman) than the energy split at every budget measured (docs/sketches.md)."""
    if (rank is None) == (budget_bytes is None):
        raise CuratorError("give exactly one of --rank and --budget-bytes")
    if rank is not None:
        return {name: [min(rank, d_out), min(rank, d_in)] for name, (d_out, d_in) in shapes.items()}
    dims = budget_bytes // itemsize
    if split == "uniform":
        def size(k):
            return sum(min(k, d_out) * min(k, d_in) for d_out, d_in in shapes.values())

        k = 1
        while size(k + 1) <= dims and size(k + 1) > size(k):
            k += 1
        ranks = {name: [min(k, d_out), min(k, d_in)] for name, (d_out, d_in) in shapes.items()}
    elif split == "energy":
        total = sum(energy.values()) or 1.0
        ranks = {}
        for name, (d_out, d_in) in shapes.items():
            k = max(1, int(math.sqrt(dims * energy[name] / total)))
            ranks[name] = [min(k, d_out), min(k, d_in)]
    else:
        raise CuratorError(f"no budget split {split!r}; splits: uniform, energy")
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
    ranks = allocate_ranks(energy, shapes, config.rank, config.budget_bytes, itemsize, config.budget_split)
    bases, query_bases = {}, {}
    if config.method == "eigen":
        tensors, _ = load_tensors(ws.root / record.path, rebuild=refit_command(record))
    if config.method == "mixed":
        documents = document_directions(loaded, modules, ws, factors, config, max_len)
    for number, name in enumerate(modules):
        k_out, k_in = ranks[name]
        if config.method == "query-subspace":
            u, v = subspace_bases(prepared[name].cpu(), factors[name].to("cpu"), k_out, k_in)
        elif config.method == "whitened-subspace":
            (u, v), (uq, vq) = whitened_subspace_bases(prepared[name].cpu(), factors[name].to("cpu"), k_out, k_in)
            query_bases[name] = (uq.contiguous(), vq.contiguous())
        elif config.method == "mixed":
            suite_left, suite_right = suite_directions(prepared[name].cpu(), factors[name].to("cpu"))
            doc_left, doc_right = documents[name]
            u = interleave(suite_left, doc_left, k_out, config.document_share)
            v = interleave(suite_right, doc_right, k_in, config.document_share)
            (u, v), (uq, vq) = whitened_frame_bases(u, v, factors[name].to("cpu"))
            query_bases[name] = (uq.contiguous(), vq.contiguous())
        elif config.method == "eigen":
            t = tensors[name]
            u, v = eigen_bases(factors[name].to("cpu"), t["s_eigvals"], t["a_eigvals"], k_out, k_in)
        else:
            # A seed per layer: a layer's draw does not depend on the ranks of the layers before it.
            u, v = random_bases(*shapes[name], k_out, k_in, seed=config.seed * 1_000_003 + number)
        bases[name] = (u.contiguous(), v.contiguous())
    return bases, {"ranks": ranks, "energy": energy, "query_bases": query_bases}


# -- mixed bases -------------------------------------------------------------------------------------

RELATIVE_NULL = 1e-9        # a direction whose energy is below this share of the largest carries none


def leading_directions(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix with non-negligible eigenvalues, largest first (float64)."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    values, vectors = values.flip(0), vectors.flip(1)
    keep = values > RELATIVE_NULL * max(float(values[0]), 0.0)
    return vectors[:, keep] if float(values[0]) > 0 else vectors[:, :0]


def suite_directions(m: torch.Tensor, factors: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """The suite's whitened query directions (left d_out × r, right d_in × r'), most energy first: the
    directions whitened-subspace keeps (curator/influence/ekfac.py, whitened_subspace_bases)."""
    d_s, d_a = whitening_scales(factors)
    w = d_s[:, None] * m.to(torch.float64) * d_a[None, :]
    return (leading_directions(torch.einsum("noi,npi->op", w, w)),
            leading_directions(torch.einsum("noi,noj->ij", w, w)))


def document_directions(loaded: LoadedModel, modules: dict, ws: Workspace, factors: dict[str, LayerFactors],
                        config: SketchConfig, max_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the directions (left, right) along which a seeded sample of documents' whitened
    gradients vary most, most energy first (the eigenvectors of `document_grams`)."""
    grams = document_grams(loaded, modules, ws, factors, config, max_len)
    return {name: (leading_directions(left), leading_directions(right)) for name, (left, right) in grams.items()}


def document_grams(loaded: LoadedModel, modules: dict, ws: Workspace, factors: dict[str, LayerFactors],
                   config: SketchConfig, max_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, Σ (G̃ − Ḡ)(G̃ − Ḡ)ᵀ and Σ (G̃ − Ḡ)ᵀ(G̃ − Ḡ) over the token windows of a seeded sample
    of the store's documents, with G̃ = D_S⁻¹ Q_Sᵀ G Q_A D_A⁻¹ a window's whitened gradient (float64, CPU).

    Centred: a component every document shares shifts all of a query's scores alike and ranks
    nothing. Each token window is one sample (a document's gradient is the sum of its windows').
    Grams come from token Gram matrices, Σ G̃ G̃ᵀ = Σ δ'ᵀ (a' a'ᵀ) δ', so no d_out × d_in gradient
    is squared.
    """
    from curator.catalog.database import Catalog
    from curator.catalog.documents import document_ids, seeded_sample
    from curator.model.document_pass import PassSettings, document_pass

    with Catalog.open(ws) as catalog:
        ids = document_ids(catalog, config.max_docs, config.seed)
        sample = seeded_sample(catalog, ids, config.document_sample, config.seed)
    sums: dict[str, list] = {}
    maps = {name: tuple(m.to(next(loaded.model.parameters()).device) for m in whitening_maps(factors[name]))
            for name in modules}

    def accumulate(name, a, delta, _batch, _output):
        a_w, d_w = a.to(torch.float64) @ maps[name][0], delta.to(torch.float64) @ maps[name][1]
        left = torch.einsum("bto,btu,bup->op", d_w, a_w @ a_w.transpose(1, 2), d_w)
        right = torch.einsum("bti,btu,buj->ij", a_w, d_w @ d_w.transpose(1, 2), a_w)
        total = torch.einsum("bto,bti->oi", d_w, a_w)
        if name not in sums:
            sums[name] = [left, right, total, a.shape[0]]
        else:
            parts = sums[name]
            parts[0] += left
            parts[1] += right
            parts[2] += total
            parts[3] += a.shape[0]

    settings = PassSettings(max_len=max_len, batch_tokens=config.batch_tokens, chunk_docs=max(1, len(sample)))
    with Catalog.open(ws, hold=False) as catalog:     # a pass holds no connection: others take turns
        document_pass(loaded.model, modules, loaded.tokenizer, catalog, sample, settings, accumulate,
                      description="sketch bases: document directions")
    grams = {}
    for name in modules:
        left, right, total, count = sums[name]
        grams[name] = ((left - total @ total.T / count).cpu(), (right - total.T @ total / count).cpu())
    return grams


def interleave(first: torch.Tensor, second: torch.Tensor, k: int, share: float) -> torch.Tensor:
    """k orthonormal columns (d × k, float64) taken in turn from two ranked lists of directions: column j
    comes from `second` when ⌊(j+1)·share⌋ > ⌊j·share⌋ (so a `share` of every prefix does), else from
    `first`. Each candidate is orthogonalised against the columns before it and skipped when nothing is
    left of it; a list that runs out hands over to the other, then to the coordinate axes, so k = d
    always gives a complete basis (exact sketches). The choice of column j depends only on columns
    before it, so the rank-k basis is the first k columns of any larger one (nested)."""
    if not 0.0 <= share <= 1.0:
        raise CuratorError(f"the document share of a mixed basis must be between 0 and 1, not {share}")
    d = first.shape[0]
    if k > d:
        raise CuratorError(f"{k} directions asked of a {d}-dimensional space")
    sources = [first.to(torch.float64), second.to(torch.float64), torch.eye(d, dtype=torch.float64)]
    taken = [0, 0, 0]
    basis = torch.zeros(d, k, dtype=torch.float64)
    for j in range(k):
        preferred = 1 if int((j + 1) * share) > int(j * share) else 0
        for source in (preferred, 1 - preferred, 2):
            column = None
            while taken[source] < sources[source].shape[1]:
                candidate = sources[source][:, taken[source]]
                taken[source] += 1
                for _ in range(2):          # twice: one pass of Gram-Schmidt loses orthogonality
                    candidate = candidate - basis[:, :j] @ (basis[:, :j].T @ candidate)
                norm = float(candidate.norm())
                if norm > 1e-6:
                    column = candidate / norm
                    break
            if column is not None:
                basis[:, j] = column
                break
    return basis


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
