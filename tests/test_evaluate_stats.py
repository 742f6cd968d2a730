"""The paired bootstrap over held-out queries and the verdicts built on it (curator/evaluate/stats.py), on
constructed per-query values: no model, no workspace. Each shortcut is checked against the slow, obvious
computation: every possible resample of the queries enumerated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from curator.evaluate import stats


def exact_percentiles(improvements) -> tuple[float, float]:
    """The bootstrap with every one of the n^n draws of the queries, each once: the distribution the random
    resamples estimate. One draw serves every seed (paired), so each draw's value is the mean over seeds of
    the mean over the drawn queries."""
    values = np.asarray(improvements, dtype=float)
    n = values.shape[1]
    means = [values[:, list(draw)].mean() for draw in itertools.product(range(n), repeat=n)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def rows(arm_values: dict[int, dict[str, float]], metric: str = "reasoning_loss") -> list[dict]:
    """Result rows (seed → query → value) as report_data passes them to compare: the metric is the mean of
    the per-query values, as measure.by_metric records them."""
    return [{"seed": seed, metric: sum(values.values()) / len(values), "per_query": {metric: values}}
            for seed, values in arm_values.items()]


def test_the_bootstrap_matches_every_resample_enumerated():
    # Two seeds whose gains sit on different queries: paired (one draw for both seeds) and unpaired
    # (a draw per seed) resampling give different intervals (-0.25 to 1.15 for the unpaired), so this
    # tells them apart. The means are multiples of 0.1: within 0.05 is the same atom.
    improvements = [[3.0, 0.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -1.0, 0.5]]
    low, high = exact_percentiles(improvements)
    got = stats.bootstrap(improvements, resamples=20000, seed=0)
    assert (low, high) == pytest.approx((-0.4, 1.1))
    assert got["low"] == pytest.approx(low, abs=0.05) and got["high"] == pytest.approx(high, abs=0.05)
    assert got["mean"] == pytest.approx(0.4) and got["queries"] == 5 and got["resamples"] == 20000
    # A known distribution: one gain of 4 among 4 queries. The mean of a draw is the number of times the
    # gain is drawn (binomial, 4 draws at 1/4): P(0) = 0.32 and P(≤ 2) = 0.95, P(≤ 3) = 0.996.
    assert exact_percentiles([[0.0, 0.0, 0.0, 4.0]]) == (0.0, 3.0)
    one = stats.bootstrap([[0.0, 0.0, 0.0, 4.0]], resamples=2000, seed=0)
    assert (one["low"], one["high"], one["mean"]) == (0.0, 3.0, 1.0)


def test_the_bootstrap_is_seeded():
    rng = np.random.default_rng(5)
    improvements = rng.normal(0.1, 0.3, size=(3, 12)).tolist()
    first = stats.bootstrap(improvements, resamples=2000, seed=7)
    assert stats.bootstrap(improvements, resamples=2000, seed=7) == first
    other = stats.bootstrap(improvements, resamples=2000, seed=8)
    assert (other["low"], other["high"]) != (first["low"], first["high"])
    assert other["mean"] == first["mean"]


def test_a_difference_on_every_query_beats_and_one_outlier_query_does_not():
    levels = [0.5, 1.0, 1.8, 2.5, 3.3, 4.0, 4.6, 5.2]          # queries far apart in difficulty
    queries = [f"q{i}" for i in range(8)]
    noise = [[0.01 * ((3 * s + i) % 5 - 2) for i in range(8)] for s in range(3)]
    baseline = rows({s: {q: levels[i] + noise[s][i] for i, q in enumerate(queries)} for s in range(3)})

    # The mixture is 0.1 better on every query (plus a little noise): pairing by query removes the spread of
    # the queries' levels, so the interval is narrow and above 0, the seeds agree, and it beats.
    steady = rows({s: {q: levels[i] + noise[s][i] - 0.1 - 0.002 * s - 0.001 * (i % 3) for i, q in
                       enumerate(queries)} for s in range(3)})
    c = stats.compare(steady, baseline, "reasoning_loss")
    assert c["seeds"] == "better" and c["verdict"] == "better"
    assert 0 < c["queries"]["low"] < c["queries"]["high"] < 0.12 and c["queries"]["high"] - c["queries"]["low"] < 0.01
    assert c["queries"]["mean"] == pytest.approx(c["mean"])
    said = stats.sentence("m", "b", c)
    assert said.startswith("m beats b") and "over seeds" in said and "over held-out queries" in said
    # The interval is the bootstrap of the per-query differences, baseline minus mixture, seed by seed.
    by_hand = [[baseline[s]["per_query"]["reasoning_loss"][q] - steady[s]["per_query"]["reasoning_loss"][q]
                for q in sorted(queries)] for s in range(3)]
    assert c["queries"] == stats.bootstrap(by_hand)

    # The same mean gain carried by one query of the eight: every seed shows it (the seeds' interval is above
    # 0), but a third of the draws miss that query: the queries' interval reaches 0, and it does not beat.
    others = [-0.02, 0.02, -0.01, 0.01, 0.0, -0.005, 0.005]
    outlier = rows({s: {q: levels[i] + noise[s][i] - (0.8 + 0.01 * s if i == 7 else others[i])
                        for i, q in enumerate(queries)} for s in range(3)})
    c = stats.compare(outlier, baseline, "reasoning_loss")
    assert c["seeds"] == "better" and c["low"] > 0
    assert c["queries"]["low"] <= 0 < c["queries"]["high"]
    assert c["verdict"] == "within the queries' noise"
    said = stats.sentence("m", "b", c)
    assert "does NOT beat" in said and "within the noise of the held-out queries' sampling" in said

    # Accuracy: higher is better, the values are 1.0 / 0.0 per query.
    right = rows({s: {q: 1.0 for q in queries} for s in range(3)}, "accuracy")
    half = rows({s: {q: float(i % 2) for i, q in enumerate(queries)} for s in range(3)}, "accuracy")
    c = stats.compare(right, half, "accuracy")
    assert c["queries"]["mean"] == pytest.approx(0.5) and c["queries"]["low"] > 0
    assert stats.compare(half, right, "accuracy")["queries"]["high"] < 0


def test_results_without_per_query_values_give_no_bootstrap_and_say_so():
    old_better = [{"seed": s, "reasoning_loss": 1.5 + 0.02 * s} for s in range(3)]
    old_worse = [{"seed": s, "reasoning_loss": 2.0 + 0.01 * s} for s in range(3)]
    c = stats.compare(old_better, old_worse, "reasoning_loss")
    assert c["seeds"] == "better" and c["queries"] is None and c["queries_note"] == "no per-query values recorded"
    assert c["verdict"] == "no query interval"
    said = stats.sentence("m", "b", c)
    assert "does NOT beat" in said and "no per-query values" in said and "no interval over the held-out" in said
    # Perplexity is measured on documents, not queries: no bootstrap, and its verdict is the seeds'.
    ppl = stats.compare([{"seed": s, "general_ppl": 10.0 + 0.1 * s} for s in range(3)],
                        [{"seed": s, "general_ppl": 12.0 + 0.2 * s} for s in range(3)], "general_ppl")
    assert ppl["queries"] is None and ppl["queries_note"] == "not a mean over queries" and ppl["verdict"] == "better"


def test_too_few_held_out_queries_give_no_interval_over_queries_and_no_claim():
    """One query would give a zero-width interval (and a "beats" whenever the seeds agree); a handful give
    one far too narrow: below MIN_QUERIES the comparison has no interval over queries and makes no claim."""
    for n in (1, stats.MIN_QUERIES - 1):
        queries = [f"q{i}" for i in range(n)]
        better = rows({s: {q: 1.0 + 0.01 * s for q in queries} for s in range(3)})
        worse = rows({s: {q: 1.5 + 0.02 * s for q in queries} for s in range(3)})
        c = stats.compare(better, worse, "reasoning_loss")
        assert c["seeds"] == "better" and c["queries"] is None and c["verdict"] == "no query interval"
        said = stats.sentence("m", "b", c)
        assert "does NOT beat" in said and f"only {n} held-out queries" in said
    queries = [f"q{i}" for i in range(stats.MIN_QUERIES)]
    c = stats.compare(rows({s: {q: 1.0 + 0.01 * s for q in queries} for s in range(3)}),
                      rows({s: {q: 1.5 + 0.02 * s for q in queries} for s in range(3)}), "reasoning_loss")
    assert c["verdict"] == "better" and c["queries"]["queries"] == stats.MIN_QUERIES
