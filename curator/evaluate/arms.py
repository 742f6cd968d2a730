"""Which documents each arm trains on: the mixtures and their baselines, at equal tokens.

Every arm is an order over candidate documents followed by the same fill (`fill_tokens`): take
documents in order, skip any that would pass the target, stop at the target. So every arm holds
between target − (one document) and target tokens, counted with the ranking's tokenizer.

  mixture          the mixture's documents in selection order (its best first, for `top`);
  random           every document of the catalog, in a seeded random order;
  source-matched   random documents of the catalog per source, each source filled to its token share of
                   the first mixture, then topped up in the same random order: "which documents" apart
                   from "which sources";
  bottom           the first mixture's ranking from the most harmful document up: a sign check.

The random and source-matched candidates are every document in the catalog's `documents` view, less
the held-out text that measures general perplexity, whether the ranking scored them or not. Their
tokens come from the catalog's cache (`token_counts`, written by `curator fit` and `curator score`);
a document without a cached count is counted with the ranking's tokenizer when the fill reaches it,
a chunk at a time (`TokenCounts`), so a draw of a few thousand documents from millions tokenizes
about as many. Counted over the whole catalog, a fill could walk every document looking for one
small enough to close the last few tokens: these fills stop after `FILL_PATIENCE` documents in a row
that did not fit, which still leaves them within one document (the last one that did not fit) of the
target. The counts made here go to the cache when the evaluation starts (run.py).

The held-out text is drawn (seeded by the evaluation, not the arm seed) from ranked documents that no
mixture arm trains on, and left out of every baseline's candidates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from pydantic import BaseModel, Field

from curator.catalog.database import Catalog
from curator.catalog.documents import read_texts
from curator.catalog.records import get_run
from curator.curate.mix import get_mixture
from curator.errors import CuratorError
from curator.evaluate.config import Arm, EvaluateConfig

COUNT_CHUNK = 256       # documents whose counts are looked up (and, when not cached, tokenized) at a time
FILL_PATIENCE = 256     # a fill over the whole catalog stops after this many documents in a row that did not fit


class Ranking(BaseModel):
    name: str
    run_id: str
    query_ids: list[str]
    tokenizer_id: str


class Candidate(BaseModel):
    doc_id: int
    source: str
    tokens: int


def fill_tokens(candidates: Iterable[tuple[int, int]], target: int, skip: set[int] | frozenset = frozenset(),
                patience: int | None = None) -> tuple[list[int], int]:
    """(doc_id, tokens) in order → the ids taken and their tokens: each document that still fits is taken,
    until the target is reached exactly, the candidates run out, or (with `patience`) that many documents
    in a row did not fit. Candidates are drawn only as far as the fill goes."""
    taken: list[int] = []
    total = misses = 0
    if target <= 0:
        return taken, total
    for doc_id, tokens in candidates:
        if doc_id in skip or tokens <= 0:
            continue
        if total + tokens > target:
            misses += 1
            if patience is not None and misses >= patience:
                break
            continue
        taken.append(doc_id)
        total += tokens
        misses = 0
        if total == target:
            break
    return taken, total


def _key(doc_id: int, seed: int, salt: str) -> bytes:
    return hashlib.blake2b(f"{salt}:{seed}:{doc_id}".encode(), digest_size=8).digest()


def seeded_order(doc_ids: Iterable[int], seed: int, salt: str) -> list[int]:
    """The ids in an order that depends only on the set of ids, the seed and the salt (a hash per id),
    never on how the catalog happened to return them."""
    return sorted(doc_ids, key=lambda doc_id: _key(doc_id, seed, salt))


def seeded_positions(doc_ids: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """`seeded_order` for a whole catalog: the positions that put `doc_ids` in that order (each 8-byte key
    read as a big-endian integer sorts as the bytes do; a stable sort keeps ties as `sorted` does)."""
    keys = np.fromiter((int.from_bytes(_key(d, seed, salt), "big") for d in doc_ids.tolist()), dtype=np.uint64,
                       count=len(doc_ids))
    return np.argsort(keys, kind="stable")


class TokenCounts:
    """Documents' tokens under the ranking's tokenizer, looked up as a walk reaches them: the cached counts
    first, the others counted from their text (the tokenizer loaded on first need), `COUNT_CHUNK` at a time.
    `new` holds the counts made here, for the catalog's cache."""

    def __init__(self, catalog: Catalog, tokenizer_id: str, load_tokenizer: Callable[[], object]):
        self.catalog, self.tokenizer_id, self._load = catalog, tokenizer_id, load_tokenizer
        self.known: dict[int, int] = {}
        self.new: dict[int, int] = {}
        self.largest = 0
        self._tokenizer = None

    def add(self, counts: Iterable[tuple[int, int]]) -> None:
        for doc_id, tokens in counts:
            self.known[doc_id] = tokens
            self.largest = max(self.largest, tokens)

    def walk(self, doc_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
        """(doc_id, tokens) in the given order; a chunk is counted only when the walk reaches it."""
        for start in range(0, len(doc_ids), COUNT_CHUNK):
            chunk = [int(d) for d in doc_ids[start:start + COUNT_CHUNK]]
            self._count([d for d in chunk if d not in self.known])
            for doc_id in chunk:
                yield doc_id, self.known.get(doc_id, 0)

    def _count(self, doc_ids: list[int]) -> None:
        if not doc_ids:
            return
        self.add(self.catalog.sql("SELECT doc_id, tokens FROM token_counts WHERE tokenizer = ? AND doc_id IN "
                                  "(SELECT unnest(?::BIGINT[]))", [self.tokenizer_id, doc_ids]))
        missing = [d for d in doc_ids if d not in self.known]
        if not missing:
            return
        if self._tokenizer is None:
            self._tokenizer = self._load()
        for rows in read_texts(self.catalog, missing):
            # Counted as `curator score` counts (curator.model.tokens.tokenize_documents): special tokens in.
            encoded = self._tokenizer([text for _, text in rows], add_special_tokens=True)["input_ids"]
            counts = [(doc_id, len(ids)) for (doc_id, _), ids in zip(rows, encoded, strict=True)]
            self.add(counts)
            self.new.update(counts)


def catalog_documents(catalog: Catalog, excluded: Iterable[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every document of the catalog less `excluded`: (ids ascending, each one's source as an index into
    the returned source names)."""
    names = sorted(r[0] for r in catalog.sql("SELECT DISTINCT source FROM documents"))
    found = catalog.con.execute(
        "SELECT d.id, s.code FROM documents d JOIN (SELECT unnest(?::VARCHAR[]) AS source, "
        "unnest(?::INTEGER[]) AS code) s ON s.source = d.source ORDER BY d.id",
        [names, list(range(len(names)))]).fetchnumpy()
    ids, codes = np.asarray(found["id"], dtype=np.int64), np.asarray(found["code"], dtype=np.int32)
    keep = ~np.isin(ids, np.fromiter(excluded, dtype=np.int64))
    return ids[keep], codes[keep], names


def source_matched(order: Sequence[int], sources: Sequence,
                   tokens: Callable[[Sequence[int]], Iterable[tuple[int, int]]], shares: dict, target: int,
                   patience: int | None = None) -> tuple[list[int], int]:
    """Random documents with each source filled to `shares[source] × target` tokens, then the rest of the
    target from all sources in the same random order. `order`: the documents in the arm's random order,
    `sources[i]` the source of `order[i]`; `tokens(ids)`: (doc_id, tokens) of `ids` in that order."""
    order, sources = np.asarray(order), np.asarray(sources)
    taken: list[int] = []
    total = 0
    for source, share in sorted(shares.items()):
        ids, got = fill_tokens(tokens(order[sources == source]), min(int(share * target), target - total),
                               patience=patience)
        taken += ids
        total += got
    more, got = fill_tokens(tokens(order), target - total, skip=set(taken), patience=patience)
    return taken + more, total + got


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


def starting_model(catalog: Catalog, ranking: Ranking, model: str | None) -> tuple[str, str]:
    """(what load_model is given: --model, else where the ranking's model was loaded from, else its name;
    the ranking's model id)."""
    run = get_run(catalog, ranking.run_id)
    row = catalog.one("SELECT name, location FROM models WHERE id = ?", [run.model_id])
    if row is None:
        raise CuratorError(f"the catalog does not know the model of run {run.id}")
    return model or row[1] or row[0], run.model_id


def ranking_tokenizer(name: str, ranking: Ranking):
    """The tokenizer of the model `name`, refused unless it is the ranking's (the one its counts came from)."""
    from curator.model.loading import load_tokenizer, tokenizer_hash

    tokenizer = load_tokenizer(name)
    if tokenizer_hash(tokenizer) != ranking.tokenizer_id:
        raise CuratorError(f"the tokenizer of {name} is not the ranking's: the documents the ranking's run did not "
                           f"count cannot be counted with it")
    return tokenizer


class ArmPlan(BaseModel):
    """Every arm of every seed, the held-out documents, and the rankings the mixtures came from."""

    arms: list[Arm]
    heldout_doc_ids: list[int]
    rankings: list[Ranking]
    largest_document: int      # tokens: "equal to within one document" means within this
    new_counts: dict[int, int] = Field(default_factory=dict)    # counted here, not in the catalog's cache yet


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
    counts = TokenCounts(catalog, reference.tokenizer_id,
                         lambda: ranking_tokenizer(starting_model(catalog, reference, config.model)[0], reference))
    counts.add((c.doc_id, c.tokens) for c in candidates)
    arms: list[Arm] = []
    for mixture in mixtures:
        ids, total = fill_tokens(orders[mixture.spec.name], target)
        biggest = max((t for _, t in orders[mixture.spec.name]), default=0)
        if target - total >= max(biggest, 1):      # short by a whole document or more: too few tokens
            raise CuratorError(
                f"mixture {mixture.spec.name!r} holds {mixture.tokens:,} tokens, fewer than --tokens {target:,}: "
                f"lower --tokens to at most {mixture.tokens:,}, or mix a larger --budget-tokens")
        counts.add(orders[mixture.spec.name])
        arms += [Arm(name=mixture.spec.name, kind="mixture", seed=s, doc_ids=ids, tokens=total)
                 for s in range(config.seeds)]
    in_mixtures = {d for arm in arms for d in arm.doc_ids}
    outside = [c.doc_id for c in candidates if c.doc_id not in in_mixtures]
    heldout = sorted(seeded_order(outside, config.eval_seed, "heldout-text")[:config.heldout_docs])
    if not heldout:
        raise CuratorError(f"every ranked document is in a mixture arm, so none is left to measure general-text "
                           f"perplexity on: lower --tokens (now {target:,}) or rank more documents")
    ranked_pool = [c for c in candidates if c.doc_id not in set(heldout)]
    catalog_ids, catalog_sources, source_names = (catalog_documents(catalog, heldout)
                                                  if {"random", "source-matched"} & set(config.baselines)
                                                  else (np.zeros(0, np.int64), np.zeros(0, np.int32), []))
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
                order = catalog_ids[seeded_positions(catalog_ids, seed, "random")]
                ids, total = fill_tokens(counts.walk(order), target, patience=FILL_PATIENCE)
            elif baseline == "source-matched":
                at = seeded_positions(catalog_ids, seed, "source-matched")
                ids, total = source_matched(catalog_ids[at], catalog_sources[at], counts.walk,
                                            {source_names.index(s): share for s, share in shares.items()}, target,
                                            patience=FILL_PATIENCE)
            else:
                ids, total = fill_tokens(((c.doc_id, c.tokens) for c in reversed(ranked_pool)), target)
            if target - total >= counts.largest:
                where = ("the ranked documents outside the held-out text hold only "
                         f"{sum(c.tokens for c in ranked_pool):,} tokens" if baseline == "bottom" else
                         f"the catalog's {len(catalog_ids):,} documents outside the held-out text hold only "
                         f"{sum(counts.known.get(int(d), 0) for d in catalog_ids):,} tokens")
                raise CuratorError(f"the {baseline} baseline cannot reach --tokens {target:,}: {where}")
            arms.append(Arm(name=baseline, kind=baseline, seed=seed, doc_ids=ids, tokens=total))
    return ArmPlan(arms=arms, heldout_doc_ids=heldout, rankings=list(rankings.values()),
                   largest_document=counts.largest, new_counts=counts.new)
