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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from curator.artifacts import write_text_atomic
from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.constants import MixStrategy as Strategy
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


# -- the pure core -----------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    doc_id: int
    source: str
    tokens: int
    score: float


def order_candidates(candidates: list[Candidate], strategy: str, temperature: float = 1.0,
                     seed: int = 0) -> list[Candidate]:
    import numpy as np

    if strategy == "top":
        return sorted(candidates, key=lambda c: (-c.score, c.doc_id))
    rng = np.random.default_rng(seed)
    if strategy == "threshold":
        return [candidates[i] for i in rng.permutation(len(candidates))]
    if strategy == "sample":
        scores = np.array([c.score for c in candidates], dtype=np.float64)
        std = scores.std()
        z = (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)
        keys = z / temperature + rng.gumbel(size=len(candidates))
        return [candidates[i] for i in np.argsort(-keys, kind="stable")]
    raise CuratorError(f"--strategy {strategy!r}: expected top, threshold or sample")


def fill(ordered: list[Candidate], budget: int, quotas: dict[str, Quota]) -> list[Candidate]:
    """Select documents in order: minimum shares first, then the rest of the budget."""
    chosen: list[Candidate] = []
    taken: set[int] = set()
    per_source: dict[str, int] = {}
    total = 0
    maximum = {s: math.floor(q.max * budget) for s, q in quotas.items()}

    def admit(c: Candidate) -> bool:
        nonlocal total
        if c.doc_id in taken or total + c.tokens > budget:
            return False
        if per_source.get(c.source, 0) + c.tokens > maximum.get(c.source, budget):
            return False
        chosen.append(c)
        taken.add(c.doc_id)
        per_source[c.source] = per_source.get(c.source, 0) + c.tokens
        total += c.tokens
        return True

    for source, quota in quotas.items():
        need = math.ceil(quota.min * budget)
        if need == 0:
            continue
        available = sum(c.tokens for c in ordered if c.source == source)
        for c in ordered:
            if per_source.get(source, 0) >= need:
                break
            if c.source == source:
                admit(c)
        if per_source.get(source, 0) < need:
            reason = (f"the candidates of {source!r} hold only {available:,} tokens" if available < need else
                      "its documents do not fit under the budget and its maximum share")
            raise CuratorError(f"quota {source}={quota.min:g}:{quota.max:g} cannot be met: it needs {need:,} "
                               f"tokens ({quota.min:.0%} of {budget:,}), but {reason}")
    for c in ordered:
        if total == budget:
            break
        admit(c)
    _check_budget(ordered, budget, total, taken, per_source, maximum)
    return chosen


def _check_budget(ordered, budget, total, taken, per_source, maximum) -> None:
    """Accept the fill or say which constraint stopped it.

    Met: the gap is smaller than any document left out, or every source with
    documents left is within one document of its maximum share while the
    shares and candidates together could reach the budget (whole documents
    cannot hit a share exactly).
    """
    left = [c for c in ordered if c.doc_id not in taken]
    if total == budget or (left and budget - total < min(c.tokens for c in left)):
        return
    if not left:
        raise CuratorError(f"the budget of {budget:,} tokens cannot be met: all candidates together hold only "
                           f"{total:,} tokens (lower --budget-tokens or --min-score)")
    available: dict[str, int] = {}
    for c in ordered:
        available[c.source] = available.get(c.source, 0) + c.tokens
    reachable = {s: min(maximum.get(s, budget), tokens) for s, tokens in available.items()}
    smallest = min(c.tokens for c in ordered)
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


def build_mixture(catalog_ro: Catalog, spec: MixSpec) -> tuple[list[Candidate], dict[str, dict]]:
    """Select the documents (read-only); returns them and the per-source summary."""
    ranking = catalog_ro.one("SELECT tokenizer_id FROM rankings WHERE name = ?", [spec.ranking])
    if ranking is None:
        known = [r[0] for r in catalog_ro.sql("SELECT name FROM rankings ORDER BY name")]
        raise CuratorError(f"no ranking named {spec.ranking!r} (rankings: {', '.join(known) or 'none'})")
    rows = catalog_ro.sql(
        "SELECT r.doc_id, d.source, coalesce(t.tokens, 0), r.score FROM ranking_scores r "
        "JOIN documents d ON d.id = r.doc_id "
        "LEFT JOIN token_counts t ON t.doc_id = r.doc_id AND t.tokenizer = ? "
        "WHERE r.ranking = ? AND (? IS NULL OR r.score >= ?)",
        [ranking[0], spec.ranking, spec.min_score, spec.min_score])
    candidates = [Candidate(*row) for row in rows if row[2] > 0]
    if not candidates:
        raise CuratorError(f"ranking {spec.ranking!r} has no candidate documents"
                           + (f" with score ≥ {spec.min_score}" if spec.min_score is not None else ""))
    if spec.strategy == "threshold" and spec.min_score is None:
        raise CuratorError("--strategy threshold needs --min-score: the documents above it are sampled evenly")
    sources = sorted({c.source for c in candidates})
    quotas = effective_quotas(spec, sources)
    chosen = fill(order_candidates(candidates, spec.strategy, spec.temperature, spec.seed),
                  spec.budget_tokens, quotas)
    total = sum(c.tokens for c in chosen)
    per_source = {}
    for source in sources:
        mine = [c for c in chosen if c.source == source]
        tokens = sum(c.tokens for c in mine)
        quota = quotas.get(source)
        per_source[source] = {"documents": len(mine), "tokens": tokens, "share": tokens / total if total else 0.0,
                              "min": quota.min if quota else 0.0, "max": quota.max if quota else 1.0}
    return chosen, per_source


def mix(ws: Workspace, spec: MixSpec, *, replace: bool = False) -> MixResult:
    import pyarrow as pa

    with Catalog.open(ws) as catalog:
        if catalog.one("SELECT 1 FROM mixtures WHERE name = ?", [spec.name]) and not replace:
            raise CuratorError(f"a mixture named {spec.name!r} exists; choose another name or pass --replace")
        chosen, per_source = build_mixture(catalog, spec)
    table = pa.table({
        "mixture": pa.array([spec.name] * len(chosen), pa.string()),
        "position": pa.array(range(len(chosen)), pa.int64()),
        "doc_id": pa.array([c.doc_id for c in chosen], pa.int64()),
        "tokens": pa.array([c.tokens for c in chosen], pa.int64()),
        "score": pa.array([c.score for c in chosen], pa.float64()),
    })
    total = sum(c.tokens for c in chosen)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("BEGIN")
        catalog.sql("DELETE FROM mixture_docs WHERE mixture = ?", [spec.name])
        catalog.sql("DELETE FROM mixtures WHERE name = ?", [spec.name])
        catalog.sql("INSERT INTO mixtures (name, ranking, spec, documents, tokens, per_source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [spec.name, spec.ranking, spec.model_dump_json(), len(chosen), total, json.dumps(per_source)])
        catalog.insert_arrow("mixture_docs", table)
        catalog.sql("COMMIT")
    return MixResult(spec=spec, documents=len(chosen), tokens=total, per_source=per_source)


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
