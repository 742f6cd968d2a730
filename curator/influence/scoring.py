"""Exact scores of a batch of document windows against prepared queries: the route and the memory.

Per layer and batch, ⟨P_q, G_n⟩ can be formed three ways (``scoring_costs`` in
ekfac.py counts them); ``layer_scores`` takes the cheapest. How the suite is
held is chosen here too: ``choose_query_rank`` keeps the whole suite within the
query memory, so one pass over the documents scores every query, and
``multiply_out_within`` spends what memory is left on multiplied-out queries.
"""

from __future__ import annotations

import torch

from curator.influence.ekfac import (
    LowRank,
    dense,
    scores_from_gradients,
    scores_from_tokens,
    scores_low_rank_from_gradients,
    scoring_costs,
    scoring_path,
    sequence_gradients,
)

# Grosse et al. (2023): rank-32 preconditioned query gradients keep correlation ≈ 0.995 with full rank.
AUTO_QUERY_RANK = 32
# Below this rank, auto prefers another pass over the documents to a coarser cut.
MIN_AUTO_RANK = 8


def layer_scores(a: torch.Tensor, delta: torch.Tensor, prepared: torch.Tensor | LowRank) -> torch.Tensor:
    """⟨P_q, G_n⟩ for each window n of the batch and each query q, by the cheapest route."""
    if isinstance(prepared, LowRank):
        path = scoring_path(a.shape[0], a.shape[1], delta.shape[-1], a.shape[-1], prepared.u.shape[0],
                            prepared.rank, prepared.full is not None)
        if path == "tokens":
            return scores_from_tokens(a, delta, prepared)
        if path == "dense":
            return dense_scores(a, delta, prepared.full)
        return scores_low_rank_from_gradients(sequence_gradients(a, delta), prepared)
    return dense_scores(a, delta, prepared)


def dense_scores(a: torch.Tensor, delta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """⟨P_q, G_n⟩ in the dtype P is held in: bfloat16 next to a bfloat16 model (`for_documents`)."""
    return scores_from_gradients(sequence_gradients(a, delta, p.dtype), p).float()


def for_documents(prepared: dict[str, torch.Tensor | LowRank], dtype: torch.dtype
                  ) -> dict[str, torch.Tensor | LowRank]:
    """The multiplied-out queries in the dtype the document pass runs in.

    Next to a bfloat16 model, G_n and ⟨P_q, G_n⟩ are formed in bfloat16 (the matrix
    products accumulate in float32): 3.5x faster on a CPU with bfloat16 units, and
    half the memory per query. Measured against float32 on SmolLM2 (96 documents x
    100 queries, docs/influence.md), the scores differ far less than the bfloat16
    model's own scores differ from float32's. Low-rank factors stay in float32.
    """
    out = {}
    for name, p in prepared.items():
        if isinstance(p, LowRank):
            out[name] = p if p.full is None else LowRank(p.u, p.v, p.full.to(dtype))
        else:
            out[name] = p.to(dtype)
    return out


def multiply_out_within(prepared: dict[str, torch.Tensor | LowRank], budget_bytes: int, window_tokens: int,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | LowRank]:
    """Add the multiplied-out P to rank-r queries, layer by layer, while it fits in the budget.

    With many queries × rank, building each window's G and taking one inner product
    per query costs less than projecting every token (`scoring_costs`). Layers that
    save the most per byte go first; the rest keep the token route. `dtype` is the one
    the document pass will hold them in (`for_documents`).
    """
    def saving(p: LowRank) -> float:
        q, d_out, r = p.u.shape
        costs = scoring_costs(1, window_tokens, d_out, p.v.shape[1], q, r)
        return (costs["tokens"] - costs["dense"]) / (q * d_out * p.v.shape[1])

    used = sum(4 * (p.u.numel() + p.v.numel()) if isinstance(p, LowRank) else 4 * p.numel()
               for p in prepared.values())
    out = dict(prepared)
    candidates = [n for n, p in prepared.items() if isinstance(p, LowRank) and saving(p) > 0]
    for name in sorted(candidates, key=lambda n: -saving(prepared[n])):
        p = prepared[name]
        size = dtype.itemsize * p.u.shape[0] * p.u.shape[1] * p.v.shape[1]
        if used + size <= budget_bytes:
            out[name] = LowRank(p.u, p.v, dense(p).to(dtype))
            used += size
    return out


def bytes_per_query(shapes: list[tuple[int, int]], rank: int | None) -> int:
    """Float32 bytes of one preconditioned query over layers of these (d_out, d_in) shapes."""
    return 4 * sum((d_out + d_in) * rank if rank else d_out * d_in for d_out, d_in in shapes)


def passes_needed(n_queries: int, query_bytes: int, budget_bytes: int) -> int:
    """Document passes for a suite: whole queries per pass, at least one query per pass."""
    per_pass = max(1, budget_bytes // query_bytes)
    return -(-n_queries // per_pass)


def choose_query_rank(setting: int | str, n_queries: int, shapes: list[tuple[int, int]], budget_bytes: int
                      ) -> tuple[int | None, str]:
    """The rank to keep queries at (None: dense) and why, for `--query-rank auto|dense|K`.

    auto keeps the suite dense when it fits the budget whole (exact, one pass); else at rank 32
    when that fits; else at the largest rank that still fits the suite in one pass, down to 8;
    below that, rank 32 over several passes.
    """
    if setting == "dense":
        return None, "dense (as asked)"
    if not isinstance(setting, str):
        return int(setting), f"rank {setting} (as asked)"
    n_queries = max(n_queries, 1)
    dense_passes = passes_needed(n_queries, bytes_per_query(shapes, None), budget_bytes)
    if dense_passes <= 1:
        return None, "dense: the whole suite fits the query memory"
    if bytes_per_query(shapes, AUTO_QUERY_RANK) >= bytes_per_query(shapes, None):
        return None, f"dense: on layers this small rank {AUTO_QUERY_RANK} would take as much memory"
    fitting = budget_bytes // (n_queries * bytes_per_query(shapes, 1))
    if fitting >= AUTO_QUERY_RANK:
        return AUTO_QUERY_RANK, f"rank {AUTO_QUERY_RANK} (auto): dense would take {dense_passes} passes"
    if fitting >= MIN_AUTO_RANK:
        return int(fitting), (f"rank {fitting} (auto): the largest that fits the suite in one pass; dense would "
                              f"take {dense_passes} passes")
    return AUTO_QUERY_RANK, (f"rank {AUTO_QUERY_RANK} (auto): the suite does not fit the query memory in one pass "
                             f"even at rank {MIN_AUTO_RANK}")
