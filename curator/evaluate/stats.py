"""Means with 95% intervals over seeds and over held-out queries, and the mixture-against-baseline verdicts.
Pure functions.

Over seeds: mean ± t(0.975, n−1) · sd / √n (Student's t: with three seeds the half-width is 2.48 standard
errors, not 1.96). A comparison pairs the mixture and the baseline seed by seed (the same seed is the same
data order) and puts the interval on the mean difference. A difference that is the same on every seed
(discrete metrics such as accuracy on a few queries do this) has no spread to build an interval from: it
is reported as such, with no interval and no claim.

Over queries (`bootstrap`): every seed is measured on the same few held-out queries, so a difference that
holds on every seed can still be an accident of those queries. A paired bootstrap puts a number on that:
with d_s(q) the mixture's improvement on query q under seed s, draw n of the n queries with replacement,
the same draw for both arms and every seed, and take the mean of d_s(q) over seeds and drawn queries;
B draws (seeded) give the 2.5th and 97.5th percentiles. Reasoning loss, control loss and accuracy are
means over queries, so each has one; held-out text perplexity is measured on documents and has none.

The mixture *beats* the baseline on a query metric only when both intervals lie wholly on the better side;
otherwise the verdict says which interval reaches the other side. Anything else is said plainly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t, by degrees of freedom (df > 30: 1.96 is close enough).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}

# metric → True when lower is better
METRICS = {"reasoning_loss": True, "factual_loss": True, "general_ppl": True, "accuracy": False}
QUERY_METRICS = ("reasoning_loss", "factual_loss", "accuracy")     # means over held-out queries
OUTCOME_METRICS = ("reasoning_loss", "accuracy")                    # what the outcome's sentences speak of
RESAMPLES = 2000
MIN_QUERIES = 5     # fewer held-out queries give no interval over queries (and so no claim)
_ROWS = 256         # resamples drawn at a time (bounds the index matrix's memory)


def interval(values: Sequence[float]) -> dict:
    """{mean, low, high, n, same}; low/high None with one value, or with the same value on every seed
    (`same`): no spread to go on, and a zero-width interval would claim a certainty the seeds do not give."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "same": False}
    if n == 1 or max(values) - min(values) <= 1e-12 * max(1.0, *(abs(v) for v in values)):     # rounding
        return {"mean": sum(values) / n, "low": None, "high": None, "n": n, "same": n > 1}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "same": False}


def summarise(results: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """arm → metric → interval, over the arm's seeds."""
    arms: dict[str, list[dict]] = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)
    return {arm: {m: interval([r[m] for r in rows]) for m in METRICS} for arm, rows in arms.items()}


def bootstrap(improvements: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """improvements[s][q]: the mixture's improvement on query q under seed s (the same queries, in the same
    order, on every seed) → {mean, low, high, queries, resamples}: the mean over seeds and queries, and the
    2.5th and 97.5th percentiles of that mean over `resamples` paired draws of the queries."""
    values = np.asarray(improvements, dtype=np.float64)
    per_query = values.mean(axis=0)           # one draw of queries serves every seed: mean over seeds first
    n = per_query.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _ROWS):
        rows = min(_ROWS, resamples - start)
        means[start:start + rows] = per_query[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(per_query.mean()), "low": float(low), "high": float(high), "queries": int(n),
            "resamples": resamples}


def paired_improvements(mixture: Sequence[dict], baseline: Sequence[dict], metric: str
                        ) -> tuple[list[list[float]] | None, str | None]:
    """(improvement per seed and query, None), or (None, why there is none): the seeds both arms measured,
    the queries every one of those rows holds, positive where the mixture did better."""
    lower_better = METRICS[metric]
    theirs = {r["seed"]: r for r in baseline if r[metric] is not None}
    pairs = [(r, theirs[r["seed"]]) for r in mixture if r[metric] is not None and r["seed"] in theirs]
    if metric not in QUERY_METRICS:
        return None, "not a mean over queries"
    if not pairs:
        return None, "not measured"
    tables = [(m.get("per_query") or {}).get(metric) for pair in pairs for m in pair]
    if any(t is None for t in tables):
        return None, "no per-query values recorded"
    queries = sorted(set.intersection(*(set(t) for t in tables)))
    if not queries:
        return None, "no query measured on every seed"
    if len(queries) < MIN_QUERIES:     # a percentile bootstrap of so few values is far too narrow (one: zero width)
        return None, f"only {len(queries)} held-out queries; an interval over them needs {MIN_QUERIES}"
    sign = 1.0 if lower_better else -1.0
    return [[sign * (b["per_query"][metric][q] - m["per_query"][metric][q]) for q in queries]
            for m, b in pairs], None


def compare(mixture: Sequence[dict], baseline: Sequence[dict], metric: str, resamples: int = RESAMPLES,
            seed: int = 0) -> dict:
    """Paired by seed: improvement = (baseline − mixture) for losses, (mixture − baseline) for accuracy, so
    positive always means the mixture did better. `seeds`: the seeds' verdict, better | worse | no difference
    | equal (no difference on any seed) | same on every seed (one non-zero difference, repeated: no interval,
    no claim). `queries`: the bootstrap over held-out queries, or None with `queries_note` saying why.
    `verdict`: better or worse when both intervals agree; within the queries' noise when the seeds' interval
    is on one side and the queries' reaches the other; no query interval when there is none to check
    (per-query values not recorded); else the seeds' verdict. Perplexity has no queries: its verdict is the
    seeds'."""
    lower_better = METRICS[metric]
    by_seed = {r["seed"]: r[metric] for r in baseline if r[metric] is not None}
    diffs = [(by_seed[r["seed"]] - r[metric]) if lower_better else (r[metric] - by_seed[r["seed"]])
             for r in mixture if r[metric] is not None and r["seed"] in by_seed]
    result = interval(diffs)
    if result["n"] == 0:
        seeds = "not measured"
    elif result["same"]:
        seeds = "equal" if abs(result["mean"]) <= 1e-12 else "same on every seed"
    elif result["low"] is None:
        seeds = "one seed: no interval"
    elif result["low"] > 0:
        seeds = "better"
    elif result["high"] < 0:
        seeds = "worse"
    else:
        seeds = "no difference"
    improvements, note = paired_improvements(mixture, baseline, metric)
    queries = bootstrap(improvements, resamples, seed) if improvements is not None else None
    verdict = seeds
    if seeds in ("better", "worse") and metric in QUERY_METRICS:
        if queries is None:
            verdict = "no query interval"
        elif (queries["low"] <= 0) if seeds == "better" else (queries["high"] >= 0):
            verdict = "within the queries' noise"
    return {**result, "metric": metric, "seeds": seeds, "queries": queries, "queries_note": note,
            "verdict": verdict}


def _over_queries(comparison: dict) -> str:
    q = comparison["queries"]
    return "" if q is None else f"95% interval over held-out queries {q['low']:.4g} to {q['high']:.4g}"


def sentence(mixture: str, baseline: str, comparison: dict) -> str:
    """The comparison in words, both intervals in it, with the plain negative when the mixture does not beat
    the baseline and which interval stands in the way."""
    what = {"reasoning_loss": "held-out reasoning loss", "factual_loss": "factual-control loss",
            "general_ppl": "general-text perplexity", "accuracy": "exact-match accuracy"}[comparison["metric"]]
    verdict, mean, seeds_said = comparison["verdict"], comparison["mean"], comparison["seeds"]
    # Differences of sums that are equal (an accuracy of 3/24 against 3/24) come out as ±1e-18 or so: 0.
    mean = 0.0 if abs(mean) < 1e-12 else mean
    seeds = "" if comparison["low"] is None else \
        f"95% interval over seeds {comparison['low']:.4g} to {comparison['high']:.4g}"
    queries = _over_queries(comparison)
    both = "; ".join(p for p in (seeds, queries) if p)
    if verdict == "better":
        return f"{mixture} beats {baseline} on {what} (improvement {mean:.4g}; {both})."
    if verdict == "worse":
        return f"{mixture} does NOT beat {baseline} on {what}: it is worse (improvement {mean:.4g}; {both})."
    if verdict == "within the queries' noise":
        return f"{mixture} does NOT beat {baseline} on {what}: across seeds the mixture is {seeds_said} " \
               f"(improvement {mean:.4g}, {seeds}), but the {queries} reaches 0: within the noise of the " \
               f"held-out queries' sampling."
    if verdict == "no query interval":
        why = {"no per-query values recorded": "these results hold no per-query values (measured before they "
                                               "were recorded)"}.get(comparison.get("queries_note") or "",
                                                                     comparison.get("queries_note") or "")
        return f"{mixture} does NOT beat {baseline} on {what} as far as can be told: across seeds the mixture is " \
               f"{seeds_said} (improvement {mean:.4g}, {seeds}), but {why}, so there is no interval over the " \
               f"held-out queries; no claim."
    if verdict == "same on every seed":
        side = "better" if mean > 0 else "worse"
        also = f" ({queries})" if queries else ""
        return f"{mixture} does NOT beat {baseline} on {what} as far as the seeds show: the difference was the " \
               f"same on every seed ({mean:.4g}, the mixture {side}), which gives no interval over seeds{also}; " \
               f"no claim either way."
    if verdict == "equal":
        return f"{mixture} does NOT beat {baseline} on {what}: the two are equal on every seed."
    if verdict == "no difference":
        q = comparison["queries"]
        if q is None:
            tail = ""
        elif q["low"] <= 0 <= q["high"]:
            tail = f", and within the noise of the held-out queries' sampling ({queries})"
        else:
            tail = f" ({queries})"
        return f"{mixture} does NOT beat {baseline} on {what}: the difference ({mean:.4g}, {seeds}) is within the " \
               f"seeds' noise{tail}."
    return f"{mixture} vs {baseline} on {what}: {verdict}; no claim either way."
