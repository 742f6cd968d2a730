"""Which documents each arm trains on: the mixtures and their baselines, at equal tokens.

Every arm is an order over candidate documents followed by the same fill (`fill_tokens`): take
documents in order, skip any that would pass the target, stop at the target. So every arm holds
between target − (one document) and target tokens, counted with the ranking's tokenizer.

  mixture          the mixture's documents in selection order (its best first, for `top`);
  random           every ranked document, in a seeded random order;
  source-matched   random documents per source, each source filled to its token share of the first
                   mixture, then topped up in the same random order: "which documents" apart from
                   "which sources";
  bottom           the first mixture's ranking from the most harmful document up: a sign check.

The candidates are the documents of the ranking (those scored, with token counts), less the
held-out text that measures general perplexity. The held-out text is drawn (seeded by the
evaluation, not the arm seed) from ranked documents that no mixture arm trains on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from pydantic import BaseModel

from curator.catalog.database import Catalog
from curator.curate.mix import get_mixture
from curator.errors import CuratorError
from curator.evaluate.config import Arm, EvaluateConfig


class Ranking(BaseModel):
    name: str
    run_id: str
    query_ids: list[str]
    tokenizer_id: str


class Candidate(BaseModel):
    doc_id: int
    source: str
    tokens: int


def fill_tokens(candidates: Iterable[tuple[int, int]], target: int, skip: set[int] | frozenset = frozenset()
                ) -> tuple[list[int], int]:
    """(doc_id, tokens) in order → the ids taken and their tokens: each document that still fits is taken,
    until the target is reached exactly or the candidates run out."""
    taken, total = [], 0
    for doc_id, tokens in candidates:
        if total == target:
            break
        if doc_id in skip or tokens <= 0 or total + tokens > target:
            continue
        taken.append(doc_id)
        total += tokens
    return taken, total


def seeded_order(doc_ids: Iterable[int], seed: int, salt: str) -> list[int]:
    """The ids in an order that depends only on the set of ids, the seed and the salt (a hash per id),
    never on how the catalog happened to return them."""
    def key(doc_id: int) -> bytes:
        return hashlib.blake2b(f"{salt}:{seed}:{doc_id}".encode(), digest_size=8).digest()
    return sorted(doc_ids, key=key)


def source_matched(candidates: Sequence[Candidate], shares: dict[str, float], target: int, seed: int
                   ) -> tuple[list[int], int]:
    """Random documents with each source filled to `shares[source] × target` tokens, then the rest of the
    target from all sources in the same random order."""
    order = seeded_order([c.doc_id for c in candidates], seed, "source-matched")
    by_id = {c.doc_id: c for c in candidates}
    taken: list[int] = []
    total = 0
    for source, share in sorted(shares.items()):
        ids, tokens = fill_tokens(((d, by_id[d].tokens) for d in order if by_id[d].source == source),
                                  min(int(share * target), target - total))
        taken += ids
        total += tokens
    more, tokens = fill_tokens(((d, by_id[d].tokens) for d in order), target - total, skip=set(taken))
    return taken + more, total + tokens


def read_ranking(catalog: Catalog, name: str) -> Ranking:
    row = catalog.one("SELECT name, run_id, query_ids, tokenizer_id FROM rankings WHERE name = ?", [name])
    if row is None:
        raise CuratorError(f"no ranking named {name!r}")
    return Ranking(name=row[0], run_id=row[1], query_ids=json.loads(row[2]), tokenizer_id=row[3])


def mixture_order(catalog: Catalog, name: str) -> list[tuple[int, int]]:
    return [(int(d), int(t)) for d, t in catalog.sql(
        "SELECT doc_id, tokens FROM mixture_docs WHERE mixture = ? ORDER BY position", [name])]


def ranked_candidates(catalog: Catalog, ranking: Ranking) -> list[Candidate]:
    """The ranking's documents with a token count, best first."""
    rows = catalog.sql(
        "SELECT r.doc_id, d.source, t.tokens FROM ranking_scores r JOIN documents d ON d.id = r.doc_id "
        "JOIN token_counts t ON t.doc_id = r.doc_id AND t.tokenizer = ? WHERE r.ranking = ? AND t.tokens > 0 "
        "ORDER BY r.rank", [ranking.tokenizer_id, ranking.name])
    return [Candidate(doc_id=d, source=s, tokens=t) for d, s, t in rows]


class ArmPlan(BaseModel):
    """Every arm of every seed, the held-out documents, and the rankings the mixtures came from."""

    arms: list[Arm]
    heldout_doc_ids: list[int]
    rankings: list[Ranking]
    largest_document: int      # tokens: "equal to within one document" means within this


def plan_arms(catalog: Catalog, config: EvaluateConfig) -> ArmPlan:
    """Select every arm's documents; any impossible request is one error before anything is trained."""
    if len(set(config.mixtures)) != len(config.mixtures):
        raise CuratorError(f"--mixtures names a mixture twice: {', '.join(config.mixtures)}")
    mixtures = [get_mixture(catalog, name) for name in config.mixtures]
    rankings = {}
    for mixture in mixtures:
        if mixture.spec.ranking not in rankings:
            rankings[mixture.spec.ranking] = read_ranking(catalog, mixture.spec.ranking)
    tokenizers = {r.tokenizer_id for r in rankings.values()}
    if len(tokenizers) > 1:
        raise CuratorError("the mixtures come from rankings of models with different tokenizers; equal tokens "
                           "need one tokenizer: evaluate them separately")
    reference = rankings[mixtures[0].spec.ranking]
    candidates = ranked_candidates(catalog, reference)
    if not candidates:
        raise CuratorError(f"ranking {reference.name!r} has no documents with token counts")
    target = config.tokens
    orders = {m.spec.name: mixture_order(catalog, m.spec.name) for m in mixtures}
    largest = max(c.tokens for c in candidates)
    arms: list[Arm] = []
    for mixture in mixtures:
        ids, total = fill_tokens(orders[mixture.spec.name], target)
        biggest = max((t for _, t in orders[mixture.spec.name]), default=0)
        if target - total >= max(biggest, 1):      # short by a whole document or more: too few tokens
            raise CuratorError(
                f"mixture {mixture.spec.name!r} holds {mixture.tokens:,} tokens, fewer than --tokens {target:,}: "
                f"lower --tokens to at most {mixture.tokens:,}, or mix a larger --budget-tokens")
        largest = max(largest, biggest)
        arms += [Arm(name=mixture.spec.name, kind="mixture", seed=s, doc_ids=ids, tokens=total)
                 for s in range(config.seeds)]
    in_mixtures = {d for arm in arms for d in arm.doc_ids}
    outside = [c.doc_id for c in candidates if c.doc_id not in in_mixtures]
    heldout = sorted(seeded_order(outside, config.eval_seed, "heldout-text")[:config.heldout_docs])
    if not heldout:
        raise CuratorError(f"every ranked document is in a mixture arm, so none is left to measure general-text "
                           f"perplexity on: lower --tokens (now {target:,}) or rank more documents")
    pool = [c for c in candidates if c.doc_id not in set(heldout)]
    tokens_of = {c.doc_id: c.tokens for c in pool}
    # The shares of what the first mixture's arm trains on (its first --tokens), not of the whole mixture.
    source_of = {c.doc_id: c.source for c in candidates}
    reference_arm, in_reference = arms[0], set(arms[0].doc_ids)
    shares: dict[str, float] = {}
    for doc_id, tokens in orders[mixtures[0].spec.name]:
        if doc_id in in_reference:
            shares[source_of[doc_id]] = shares.get(source_of[doc_id], 0.0) + tokens / max(reference_arm.tokens, 1)
    for baseline in config.baselines:
        for seed in range(config.seeds):
            if baseline == "random":
                ids, total = fill_tokens(((d, tokens_of[d]) for d in seeded_order(tokens_of, seed, "random")),
                                         target)
            elif baseline == "source-matched":
                ids, total = source_matched(pool, shares, target, seed)
            else:
                ids, total = fill_tokens(((c.doc_id, c.tokens) for c in reversed(pool)), target)
            if target - total >= largest:
                raise CuratorError(f"the {baseline} baseline cannot reach --tokens {target:,}: the ranked documents "
                                   f"outside the held-out text hold only {sum(tokens_of.values()):,} tokens")
            arms.append(Arm(name=baseline, kind=baseline, seed=seed, doc_ids=ids, tokens=total))
    return ArmPlan(arms=arms, heldout_doc_ids=heldout, rankings=list(rankings.values()), largest_document=largest)
