"""`curator mix`: a token-budgeted mixture from a ranking, under source quotas.

Every strategy reduces to an *order* over the candidate documents, then one
fill rule:
  top        best reasoning score first;
  threshold  every candidate above --min-score counts as good: a seeded shuffle;
  sample     a seeded sample without replacement with probability ∝ exp(z / T),
             z the standardised score (Gumbel top-k), T = --temperature.
The fill takes documents in that order, first for each source's minimum share,
then for the rest of the budget, skipping any document that would pass the
budget or its source's maximum share. So the budget and every maximum are never
exceeded, and the budget is met to within one document unless the candidates
run out (an error says which constraint stopped it). Shares are of the budget.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from curator.arrays import arrow_of, numpy_of
from curator.artifacts import write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.constants import MixStrategy as Strategy
from curator.curate.scores import arrow_batches, bounded, spill_folder
from curator.errors import CuratorError

if TYPE_CHECKING:
    import polars as pl


class Quota(BaseModel):
    source: str
    min: float = Field(0.0, ge=0, le=1)
    max: float = Field(1.0, ge=0, le=1)


class MixSpec(BaseModel):
    """A mixture's full recipe; stored with it and in export manifests."""

    name: str = Field(min_length=1)
    ranking: str
    budget_tokens: int = Field(gt=0)
    strategy: Strategy = "top"
    temperature: float = Field(1.0, gt=0)
    quotas: list[Quota] = Field(default_factory=list)
    weights: dict[str, float] | None = None
    min_score: float | None = None
    seed: int = 0


_QUOTA = re.compile(r"^(?P<source>[^=]+)=(?P<min>[0-9.]*%?)?:(?P<max>[0-9.]*%?)?$")


def parse_quota(text: str) -> Quota:
    """SOURCE=MIN:MAX with shares as fractions or percentages; either side may be empty."""
    match = _QUOTA.match(text.strip())
    if not match:
        raise CuratorError(f"--quota {text!r}: expected SOURCE=MIN:MAX, e.g. web=0.2:0.4 or code=:40%")

    def share(value: str | None, default: float) -> float:
        if not value:
            return default
        number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
        if not 0 <= number <= 1:
            raise CuratorError(f"--quota {text!r}: shares must be between 0 and 1 (or 0% and 100%)")
        return number

    quota = Quota(source=match["source"].strip(), min=share(match["min"], 0.0), max=share(match["max"], 1.0))
    if quota.min > quota.max:
        raise CuratorError(f"--quota {text!r}: the minimum share is above the maximum")
    return quota


def read_weights(path: Path) -> dict[str, float]:
    """Per-source weights from `curator mix-weights --out` or a plain {source: weight} JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CuratorError(f"cannot read weights from {path}: {exc}") from None
    weights = data.get("weights", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(v, (int, float)) and v >= 0 for v in weights.values()):
        raise CuratorError(f"{path}: expected {{source: weight, ...}} with non-negative numbers")
    total = sum(weights.values())
    if total <= 0:
        raise CuratorError(f"{path}: the weights add up to 0")
    return {source: float(w) / total for source, w in weights.items()}


def save_weights(path: Path, ranking: str, frame: pl.DataFrame) -> dict[str, float]:
    """Write `mixture_weights`' frame as the JSON that `read_weights` (`curator mix --weights`) reads;
    returns the {source: weight} it wrote."""
    by_source = dict(zip(frame["source"].to_list(), frame["weight"].to_list(), strict=True))
    write_text_atomic(path, json.dumps({"ranking": ranking, "weights": by_source}, indent=2) + "\n")
    return by_source


# -- the fill, streamed ------------------------------------------------------------
#
# Candidates are ordered in DuckDB (which spills a large sort to disk) and read back in record
# batches; the fill keeps only running totals, the ids taken for minimum shares, and the rows it
# has chosen so far, which go to a Parquet file a batch at a time.

# Seeded, order-free randomness: a uniform (0, 1) number per document from a hash of its id and the
# seed, so the same seed picks the same documents however DuckDB happens to read them.
_UNIFORM = "((hash(doc_id, {seed}) >> 11)::DOUBLE + 0.5) / 9007199254740992.0"


def order_key(strategy: str, temperature: float = 1.0, seed: int = 0) -> str:
    """SQL for each candidate's sort key (descending, ties by the smaller doc id) over a relation with
    doc_id and score:
      top        the score;
      threshold  a seeded uniform number: an even shuffle;
      sample     z / T + Gumbel noise (z the score standardised over the candidates): taking the
                 largest keys samples without replacement with probability ∝ exp(z / T)."""
    uniform = _UNIFORM.format(seed=int(seed))
    if strategy == "top":
        return "score"
    if strategy == "threshold":
        return uniform
    if strategy == "sample":
        z = ("CASE WHEN stddev_pop(score) OVER () > 0 THEN (score - avg(score) OVER ()) / stddev_pop(score) OVER () "
             "ELSE 0.0 END")
        return f"({z}) / {float(temperature)!r} - ln(-ln({uniform}))"
    raise CuratorError(f"--strategy {strategy!r}: expected top, threshold or sample")


@dataclass
class Fill:
    """The running state of a fill: totals (per source code, an index into `sources`), the documents
    taken for minimum shares, and the chosen rows not yet written.

    Rows are taken a batch at a time (`take`), as numpy arrays: in fill order, every row that fits now
    is taken until the first that fits alone but not after the ones before it, which the rule rejects;
    then the same again from the row after it. A row that does not fit alone never fits later (totals
    only grow), so it is rejected at once. That is the one-row-at-a-time rule of the module's docstring,
    without a Python step per candidate (2M candidates: ~10 s in Python)."""

    budget: int
    sources: list[str]
    maximum: dict[str, int]
    out: object                      # a pyarrow ParquetWriter for the chosen rows, in order
    total: int = 0
    documents: int = 0
    taken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # sorted: minimum-share picks
    left_smallest: int | None = None  # the smallest document rejected (not one taken for a minimum share)
    chunks: list[tuple] = field(default_factory=list)
    pending: int = 0

    def __post_init__(self):
        self.caps = np.array([self.maximum.get(s, self.budget) for s in self.sources], dtype=np.int64)
        self.source_tokens = np.zeros(len(self.sources), dtype=np.int64)
        self.source_docs = np.zeros(len(self.sources), dtype=np.int64)

    @property
    def per_source(self) -> dict[str, int]:
        return {s: int(t) for s, t in zip(self.sources, self.source_tokens, strict=True) if t}

    @property
    def per_source_docs(self) -> dict[str, int]:
        return {s: int(n) for s, n in zip(self.sources, self.source_docs, strict=True) if n}

    def take(self, doc_id: np.ndarray, code: np.ndarray, tokens: np.ndarray, score: np.ndarray, *,
             need: int | None = None, remember: bool = False) -> bool:
        """Take rows of one batch in order by the rule; True when the fill is over: the budget is met,
        or, with `need` (a minimum share, the batch all of one source), that source holds `need` tokens.
        Rows are looked at a window at a time; the window shrinks where rows are refused often (near a
        maximum share or the budget) so that each step costs about the rows it decides."""
        fresh = ~_member(doc_id, self.taken)
        at, window = 0, 4096
        while at < len(doc_id):
            if self._over(code[at], need):
                return True
            rows = slice(at, min(len(doc_id), at + window))
            t, c = tokens[rows], code[rows]
            room, room_source = self.budget - self.total, self.caps[c] - self.source_tokens[c]
            alone = fresh[rows] & (t <= room) & (t <= room_source)      # fits after what is taken so far
            kept = np.where(alone, t, 0)
            within = _cumsum_by_group(kept, c)
            fits = alone & (np.cumsum(kept) <= room) & (within <= room_source)   # ... and after the rows before
            refused = np.flatnonzero(alone & ~fits)
            end = int(refused[0]) if len(refused) else len(t)           # rows before it are decided by now
            met = False
            if need is not None:        # a minimum share stops at the row that completes it
                reached = np.flatnonzero(fits[:end] & (self.source_tokens[c[:end]] + within[:end] >= need))
                if len(reached):
                    end, met = int(reached[0]) + 1, True
            self._reject(t[:end][~alone[:end] & fresh[rows][:end]])
            chosen = np.flatnonzero(fits[:end])
            self._commit(doc_id[rows][chosen], c[chosen], t[chosen], score[rows][chosen], remember)
            if met:
                return True
            if end < len(t):            # the refused row: it fitted alone, not after the rows taken before it
                self._reject(t[end:end + 1])
                end += 1
            window = min(window * 2, 2**16) if end == len(t) else max(256, window // 2)
            at += end
        return self._over(code[-1], need) if len(code) else self.total == self.budget

    def _over(self, code: int, need: int | None) -> bool:
        return self.total == self.budget or (need is not None and self.source_tokens[code] >= need)

    def _reject(self, tokens: np.ndarray) -> None:
        if len(tokens):
            low = int(tokens.min())
            self.left_smallest = low if self.left_smallest is None else min(self.left_smallest, low)

    def _commit(self, doc_id, code, tokens, score, remember: bool) -> None:
        if not len(doc_id):
            return
        self.chunks.append((np.arange(self.documents, self.documents + len(doc_id)), doc_id, tokens, score))
        if remember:
            self.taken = np.union1d(self.taken, doc_id)
        np.add.at(self.source_tokens, code, tokens)
        self.source_docs += np.bincount(code, minlength=len(self.sources))
        self.total += int(tokens.sum())
        self.documents += len(doc_id)
        self.pending += len(doc_id)
        if self.pending >= 65_536:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.chunks:
            position, doc_id, tokens, score = (np.concatenate(c) for c in zip(*self.chunks, strict=True))
            self.out.write_table(pa.table({"position": arrow_of(position, "int64"),
                                           "doc_id": arrow_of(doc_id, "int64"),
                                           "tokens": arrow_of(tokens, "int64"),
                                           "score": arrow_of(score, "double")}))
            self.chunks, self.pending = [], 0


TABLE_SPAN = 2**26      # ids spanning at most this many values are looked up in a table of that many bytes


def _member(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """For each of `ids`: is it in `sorted_ids` (ascending, unique)? A table over their span where that is
    small (catalog ids are consecutive), a binary search otherwise: np.isin's default sorted both arrays on
    every call, 27 ms for a batch of 100,000 candidates against 150,000 ids taken for a minimum share
    (2.3 s of a 5M-document mix), against 1.2 ms by table and 11 ms by search."""
    if not len(sorted_ids) or not len(ids):
        return np.zeros(len(ids), dtype=bool)
    if int(sorted_ids[-1]) - int(sorted_ids[0]) < TABLE_SPAN:
        return np.isin(ids, sorted_ids, kind="table")
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def _cumsum_by_group(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For each position, the sum of `values` up to and including it over the positions of its group."""
    order = np.argsort(groups, kind="stable")
    running = np.cumsum(values[order])
    ordered_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, ordered_groups[1:] != ordered_groups[:-1]])
    before = np.r_[0, running][starts]                  # the running sum before each group starts
    out = np.empty_like(running)
    out[order] = running - np.repeat(before, np.diff(np.r_[starts, len(order)]))
    return out


CHOSEN_SCHEMA = (("position", "int64"), ("doc_id", "int64"), ("tokens", "int64"), ("score", "float64"))


def _ordered(catalog: Catalog, sources: list[str], source: str | None = None):
    """The candidates in fill order, a batch at a time, as numpy arrays: doc_id, source code (index into
    `sources`), tokens, score."""
    where = "WHERE source = ?" if source is not None else ""
    reader = arrow_batches(catalog, f"SELECT doc_id, source, tokens, score FROM mix_candidates {where} "
                                    "ORDER BY key DESC, doc_id", [source] if source is not None else None)
    index = {s: i for i, s in enumerate(sources)}
    for batch in reader:
        names = batch.column(1).dictionary_encode()
        codes = np.array([index[s] for s in names.dictionary.to_pylist()], dtype=np.int64)
        yield (numpy_of(batch.column(0)), codes[numpy_of(names.indices)],
               numpy_of(batch.column(2)).astype(np.int64), numpy_of(batch.column(3)))


def fill(ordered, fill_state: Fill, quotas: dict[str, Quota], available: dict[str, int], smallest: int) -> None:
    """Select documents in order: minimum shares first, then the rest of the budget (the rule of this
    module's docstring). `ordered(source)` yields the candidates (of one source, or of all for None) in
    fill order, a batch of arrays at a time (`_ordered`)."""
    budget = fill_state.budget
    for source, quota in quotas.items():
        need = math.ceil(quota.min * budget)
        if need == 0:
            continue
        for batch in ordered(source):
            if fill_state.take(*batch, need=need, remember=True):
                break
        if fill_state.per_source.get(source, 0) < need:
            have = available.get(source, 0)
            reason = (f"the candidates of {source!r} hold only {have:,} tokens" if have < need else
                      "its documents do not fit under the budget and its maximum share")
            raise CuratorError(f"quota {source}={quota.min:g}:{quota.max:g} cannot be met: it needs {need:,} "
                               f"tokens ({quota.min:.0%} of {budget:,}), but {reason}")
    fill_state.left_smallest = None      # the smallest document left out, once every candidate has been seen
    done = False
    for batch in ordered(None):
        if fill_state.take(*batch):
            done = True
            break
    fill_state.flush()
    if not done:
        _check_budget(budget, fill_state.total, fill_state.left_smallest, available, fill_state.maximum, smallest)


def _check_budget(budget: int, total: int, left_smallest: int | None, available: dict[str, int],
                  maximum: dict[str, int], smallest: int) -> None:
    """Accept the fill or say which constraint stopped it.

    Met: the gap is smaller than any document left out, or every source with
    documents left is within one document of its maximum share while the
    shares and candidates together could reach the budget (whole documents
    cannot hit a share exactly).
    """
    if total == budget or (left_smallest is not None and budget - total < left_smallest):
        return
    if left_smallest is None:
        raise CuratorError(f"the budget of {budget:,} tokens cannot be met: all candidates together hold only "
                           f"{total:,} tokens (lower --budget-tokens or --min-score)")
    reachable = {s: min(maximum.get(s, budget), tokens) for s, tokens in available.items()}
    if sum(reachable.values()) + smallest > budget:
        return

    def limit(s: str) -> str:
        capped = s in maximum and maximum[s] < available[s]
        return f"{s}: {reachable[s]:,} ({f'max {maximum[s] / budget:.0%}' if capped else 'all it has'})"

    limits = ", ".join(limit(s) for s in sorted(reachable))
    raise CuratorError(f"the budget of {budget:,} tokens cannot be met: the maximum shares and the candidates "
                       f"allow at most {sum(reachable.values()):,} tokens ({limits})")


def effective_quotas(spec: MixSpec, sources: list[str]) -> dict[str, Quota]:
    """Explicit quotas, plus weights as maximum shares (every listed source, the rest excluded)."""
    quotas = {q.source: q for q in spec.quotas}
    unknown = sorted(set(quotas) - set(sources))
    if unknown:
        raise CuratorError(f"--quota names sources that have no ranked documents: {', '.join(unknown)} "
                           f"(sources: {', '.join(sorted(sources))})")
    if sum(q.min for q in quotas.values()) > 1 + 1e-9:
        raise CuratorError("the minimum shares of --quota add up to more than 100%")
    if spec.weights:
        both = sorted(set(quotas) & set(spec.weights))
        if both:
            raise CuratorError(f"--weights and --quota both set {', '.join(both)}; use one")
        for source in sources:
            quotas[source] = Quota(source=source, max=spec.weights.get(source, 0.0))
    return quotas


# -- catalog -----------------------------------------------------------------------

class MixResult(BaseModel):
    spec: MixSpec
    documents: int
    tokens: int
    per_source: dict[str, dict]


def build_mixture(catalog_ro: Catalog, spec: MixSpec, chosen_path: Path) -> dict[str, dict]:
    """Select the documents (read-only) into the Parquet file `chosen_path` (position, doc_id, tokens,
    score, in selection order); returns the per-source summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ranking = catalog_ro.one("SELECT tokenizer_id FROM rankings WHERE name = ?", [spec.ranking])
    if ranking is None:
        known = [r[0] for r in catalog_ro.sql("SELECT name FROM rankings ORDER BY name")]
        raise CuratorError(f"no ranking named {spec.ranking!r} (rankings: {', '.join(known) or 'none'})")
    bounded(catalog_ro)
    catalog_ro.sql(
        "CREATE OR REPLACE TEMP TABLE mix_candidates AS "
        f"SELECT *, {order_key(spec.strategy, spec.temperature, spec.seed)} AS key FROM ("
        "SELECT r.doc_id, d.source, t.tokens, r.score FROM ranking_scores r JOIN documents d ON d.id = r.doc_id "
        "JOIN token_counts t ON t.doc_id = r.doc_id AND t.tokenizer = ? "
        "WHERE r.ranking = ? AND (?::DOUBLE IS NULL OR r.score >= ?) AND t.tokens > 0)",
        [ranking[0], spec.ranking, spec.min_score, spec.min_score])
    available = dict(catalog_ro.sql("SELECT source, sum(tokens) FROM mix_candidates GROUP BY source"))
    if not available:
        raise CuratorError(f"ranking {spec.ranking!r} has no candidate documents"
                           + (f" with score ≥ {spec.min_score}" if spec.min_score is not None else ""))
    if spec.strategy == "threshold" and spec.min_score is None:
        raise CuratorError("--strategy threshold needs --min-score: the documents above it are sampled evenly")
    smallest = catalog_ro.one("SELECT min(tokens) FROM mix_candidates")[0]
    sources = sorted(available)
    quotas = effective_quotas(spec, sources)
    maximum = {s: math.floor(q.max * spec.budget_tokens) for s, q in quotas.items()}
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in CHOSEN_SCHEMA])
    with pq.ParquetWriter(chosen_path, schema) as out:
        state = Fill(budget=spec.budget_tokens, sources=sources, maximum=maximum, out=out)
        fill(lambda source: _ordered(catalog_ro, sources, source), state, quotas, available, smallest)
    per_source = {}
    for source in sources:
        tokens = state.per_source.get(source, 0)
        quota = quotas.get(source)
        per_source[source] = {"documents": state.per_source_docs.get(source, 0), "tokens": tokens,
                              "share": tokens / state.total if state.total else 0.0,
                              "min": quota.min if quota else 0.0, "max": quota.max if quota else 1.0}
    return per_source


def mix(ws: Workspace, spec: MixSpec, *, replace: bool = False) -> MixResult:
    """Build the mixture through a read-only connection into a Parquet file in DuckDB's spill folder,
    then record it in one short write."""
    with Catalog.open(ws) as catalog:
        if catalog.one("SELECT 1 FROM mixtures WHERE name = ?", [spec.name]) and not replace:
            raise CuratorError(f"a mixture named {spec.name!r} exists; choose another name or pass --replace")
        chosen = spill_folder(catalog) / f"mixture-{uuid.uuid4().hex}.parquet"
        chosen.parent.mkdir(parents=True, exist_ok=True)
        try:
            per_source = build_mixture(catalog, spec, chosen)
        except BaseException:
            chosen.unlink(missing_ok=True)
            raise
    try:
        with Catalog.open(ws, write=True) as catalog:
            bounded(catalog)
            catalog.sql("BEGIN")
            catalog.sql("DELETE FROM mixture_docs WHERE mixture = ?", [spec.name])
            catalog.sql("DELETE FROM mixtures WHERE name = ?", [spec.name])
            catalog.sql("INSERT INTO mixture_docs (mixture, position, doc_id, tokens, score) "
                        "SELECT ?, position, doc_id, tokens, score FROM read_parquet(?)", [spec.name, str(chosen)])
            documents, total = catalog.one("SELECT count(*), coalesce(sum(tokens), 0) FROM mixture_docs "
                                           "WHERE mixture = ?", [spec.name])
            catalog.sql("INSERT INTO mixtures (name, ranking, spec, documents, tokens, per_source) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [spec.name, spec.ranking, spec.model_dump_json(), documents, total, json.dumps(per_source)])
            catalog.sql("COMMIT")
    finally:
        chosen.unlink(missing_ok=True)
    return MixResult(spec=spec, documents=documents, tokens=int(total), per_source=per_source)


def get_mixture(catalog: Catalog, name: str) -> MixResult:
    row = catalog.one("SELECT spec, documents, tokens, per_source FROM mixtures WHERE name = ?", [name])
    if row is None:
        known = [r[0] for r in catalog.sql("SELECT name FROM mixtures ORDER BY name")]
        raise CuratorError(f"no mixture named {name!r} (mixtures: {', '.join(known) or 'none'})")
    return MixResult(spec=MixSpec.model_validate_json(row[0]), documents=row[1], tokens=row[2],
                     per_source=json.loads(row[3]))


def mixture_report(ws: Workspace, name: str) -> tuple[MixResult, pl.DataFrame]:
    """A stored mixture and its per-source table (`source_table`)."""
    with Catalog.open(ws) as catalog:
        result = get_mixture(catalog, name)
        return result, _source_table(catalog, result)


def source_table(ws: Workspace, result: MixResult) -> pl.DataFrame:
    """Per source: the mixture's documents, tokens and share next to the corpus's share and the quota."""
    with Catalog.open(ws) as catalog:
        return _source_table(catalog, result)


def mixtures_table(ws: Workspace) -> pl.DataFrame:
    """The mixtures in the catalog, oldest first: name, ranking, strategy, documents, tokens, budget, created."""
    with Catalog.open(ws) as catalog:
        return catalog.frame(
            "SELECT name, ranking, json_extract_string(spec, '$.strategy') AS strategy, documents, tokens, "
            "CAST(json_extract(spec, '$.budget_tokens') AS BIGINT) AS budget, created_at AS created "
            "FROM mixtures ORDER BY created_at")


def _source_table(catalog: Catalog, result: MixResult) -> pl.DataFrame:
    import polars as pl

    tokenizer = catalog.one("SELECT tokenizer_id FROM rankings WHERE name = ?", [result.spec.ranking])[0]
    corpus = dict(catalog.sql(
        "SELECT d.source, sum(coalesce(t.tokens, 0)) FROM documents d LEFT JOIN token_counts t "
        "ON t.doc_id = d.id AND t.tokenizer = ? GROUP BY d.source", [tokenizer]))
    corpus_total = sum(corpus.values()) or 1
    rows = [{"source": s, "documents": v["documents"], "tokens": v["tokens"], "mix share": v["share"],
             "corpus share": corpus.get(s, 0) / corpus_total, "min": v["min"], "max": v["max"]}
            for s, v in sorted(result.per_source.items())]
    return pl.DataFrame(rows)


def mixture_weights(ws: Workspace, ranking: str) -> pl.DataFrame:
    """Per-source weights ∝ positive reasoning influence per token (the paper's source analysis as a recipe)."""
    import polars as pl

    with Catalog.open(ws) as catalog:
        tokenizer = catalog.one("SELECT tokenizer_id FROM rankings WHERE name = ?", [ranking])
        if tokenizer is None:
            raise CuratorError(f"no ranking named {ranking!r}")
        frame = catalog.frame(
            "SELECT d.source, count(*) AS documents, sum(coalesce(t.tokens, 0)) AS tokens, "
            "sum(greatest(r.score, 0)) AS \"positive influence\" FROM ranking_scores r JOIN documents d "
            "ON d.id = r.doc_id LEFT JOIN token_counts t ON t.doc_id = r.doc_id AND t.tokenizer = ? "
            "WHERE r.ranking = ? GROUP BY d.source ORDER BY d.source", [tokenizer[0], ranking])
    frame = frame.with_columns(
        (pl.col("tokens") / pl.col("tokens").sum()).alias("corpus share"),
        (pl.col("positive influence") / pl.col("tokens").clip(lower_bound=1)).alias("influence per token"))
    total = frame["influence per token"].sum()
    return frame.with_columns((pl.col("influence per token") / total if total > 0 else
                               pl.col("corpus share")).alias("weight"))
