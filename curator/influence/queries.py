"""Queries on the model side: the compatibility check, and preconditioned query gradients.

A query's gradient ∇ℓ(q) is taken over its completion tokens only and
preconditioned once, P_q = H⁻¹∇ℓ(q) per tracked layer (DESIGN.md, "Exact
scoring"). It is built in the eigenbasis, where the damped eigenvalues divide
it, and kept either dense, as rank-r factors, or (for sketches) in that frame.
"""

from __future__ import annotations

import math

import torch

from curator.catalog.queries import Query
from curator.errors import CuratorError
from curator.influence.ekfac import (
    LayerFactors,
    LowRank,
    from_eigen_frame,
    low_rank_from_eigen_frame,
    preconditioned_eigen_frame,
)
from curator.influence.factors import FactorsRecord
from curator.model.loading import LoadedModel, tracked_modules
from curator.model.losses import backward_layers
from curator.model.tokens import batches, pad_token_id, tokenize_query


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
