"""Means with 95% intervals over seeds, and the mixture-against-baseline verdicts. Pure functions.

An interval is mean ± t(0.975, n−1) · sd / √n (Student's t: with three seeds the half-width is 2.48
standard errors, not 1.96). A comparison pairs the mixture and the baseline seed by seed (the same seed
is the same data order) and puts the interval on the mean difference; the mixture *beats* the baseline
on a metric only when the whole interval lies on the better side. A difference that is the same on every
seed (discrete metrics such as accuracy on a few queries do this) has no spread to build an interval
from: it is reported as such, with no interval and no claim. Anything else is said plainly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t, by degrees of freedom (df > 30: 1.96 is close enough).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}

# metric → True when lower is better
METRICS = {"reasoning_loss": True, "factual_loss": True, "general_ppl": True, "accuracy": False}


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


def compare(mixture: Sequence[dict], baseline: Sequence[dict], metric: str) -> dict:
    """Paired by seed: improvement = (baseline − mixture) for losses, (mixture − baseline) for accuracy, so
    positive always means the mixture did better. verdict: better | worse | no difference | equal (no
    difference on any seed) | same on every seed (one non-zero difference, repeated: no interval, no claim)."""
    lower_better = METRICS[metric]
    by_seed = {r["seed"]: r[metric] for r in baseline if r[metric] is not None}
    diffs = [(by_seed[r["seed"]] - r[metric]) if lower_better else (r[metric] - by_seed[r["seed"]])
             for r in mixture if r[metric] is not None and r["seed"] in by_seed]
    result = interval(diffs)
    if result["n"] == 0:
        verdict = "not measured"
    elif result["same"]:
        verdict = "equal" if abs(result["mean"]) <= 1e-12 else "same on every seed"
    elif result["low"] is None:
        verdict = "one seed: no interval"
    elif result["low"] > 0:
        verdict = "better"
    elif result["high"] < 0:
        verdict = "worse"
    else:
        verdict = "no difference"
    return {**result, "metric": metric, "verdict": verdict}


def sentence(mixture: str, baseline: str, comparison: dict) -> str:
    """The comparison in words, with the plain negative when the mixture does not beat the baseline."""
    what = {"reasoning_loss": "held-out reasoning loss", "factual_loss": "factual-control loss",
            "general_ppl": "general-text perplexity", "accuracy": "exact-match accuracy"}[comparison["metric"]]
    if comparison["verdict"] == "better":
        return f"{mixture} beats {baseline} on {what} (improvement {comparison['mean']:.4g}, 95% interval " \
               f"{comparison['low']:.4g} to {comparison['high']:.4g})."
    if comparison["verdict"] == "worse":
        return f"{mixture} does NOT beat {baseline} on {what}: it is worse (improvement {comparison['mean']:.4g}, " \
               f"95% interval {comparison['low']:.4g} to {comparison['high']:.4g})."
    if comparison["verdict"] == "same on every seed":
        side = "better" if comparison["mean"] > 0 else "worse"
        return f"{mixture} does NOT beat {baseline} on {what} as far as the seeds show: the difference was the " \
               f"same on every seed ({comparison['mean']:.4g}, the mixture {side}), which gives no interval; " \
               f"no claim either way."
    if comparison["verdict"] == "equal":
        return f"{mixture} does NOT beat {baseline} on {what}: the two are equal on every seed."
    if comparison["verdict"] == "no difference":
        return f"{mixture} does NOT beat {baseline} on {what}: the difference ({comparison['mean']:.4g}, 95% " \
               f"interval {comparison['low']:.4g} to {comparison['high']:.4g}) is within the seeds' noise."
    return f"{mixture} vs {baseline} on {what}: {comparison['verdict']}; no claim either way."
