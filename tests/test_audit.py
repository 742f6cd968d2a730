"""The audit's analyses on constructed score tables whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from helpers import curator, plant_run, run_ingest, write_jsonl

from curator.audit import analyses
from curator.audit.audit import audit
from curator.audit.compare import average_ranks, compare, pearson
from curator.catalog.database import Catalog
from curator.catalog.records import score_files
from curator.catalog.queries import Query, store_queries
from curator.audit.report import render

N_DOCS = 1000
GOLD = range(1, 101)             # ids of the 'gold' source: 10% of the corpus


@pytest.fixture
def planted(ws, tmp_path):
    """1,000 documents: 100 'gold' (ids 1-100) and 900 'web'. Arithmetic queries rank gold documents
    first; factual queries follow a planted power law; some documents hold the answer '42'."""
    docs = [{"text": f"gold doc {i:03d} with 42 inside" if i <= 20 else f"gold doc {i:03d}"} for i in GOLD]
    docs += [{"text": f"web page {i} mentions 142 and 4.2 but not the answer"} for i in range(101, N_DOCS + 1)]
    write_jsonl(tmp_path / "gold.jsonl", docs[:100])
    write_jsonl(tmp_path / "web.jsonl", docs[100:])
    run_ingest(ws, [tmp_path / "gold.jsonl"], source="gold")
    run_ingest(ws, [tmp_path / "web.jsonl"], source="web")
    queries = [Query(id=f"arith-{i}", task="arithmetic", prompt="p", completion="c", answer="42") for i in range(3)]
    queries += [Query(id=f"fact-{i}", task="factual", prompt="p", completion="c", answer="42") for i in range(2)]
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, queries)
    rng = np.random.default_rng(0)
    rows = []
    for q in queries:
        if q.task == "arithmetic":       # gold first (in random order), then web
            order = np.concatenate([rng.permutation(100) + 1, rng.permutation(900) + 101])
            values = np.linspace(10, -10, N_DOCS)
        else:                            # score = 5 · rank^-0.8 over the top, negative after
            order = rng.permutation(N_DOCS) + 1
            values = np.concatenate([5.0 * np.arange(1, 501) ** -0.8, -rng.random(500)])
        rows += [{"query_id": q.id, "doc_id": int(d), "score": float(v)} for d, v in zip(order, values, strict=True)]
    scores = pl.DataFrame(rows)
    plant_run(ws, tmp_path, scores, {q.id: 1.0 for q in queries})
    return ws, scores


def test_a_planted_power_law_recovers_its_slope():
    row = np.concatenate([3.0 * np.arange(1, 801) ** -1.3, -np.ones(10)])
    fit = analyses.power_law(np.random.default_rng(1).permutation(row))
    assert fit["alpha"] == pytest.approx(1.3, abs=1e-9) and fit["se"] < 1e-9 and fit["n"] == 500
    noisy = 3.0 * np.arange(1, 501) ** -0.7 * np.exp(np.random.default_rng(2).normal(0, 0.1, 500))
    fit = analyses.power_law(noisy)      # sorting the noisy scores bends the tail a little
    assert abs(fit["alpha"] - 0.7) < 0.03 and 0 < fit["se"] < 0.05


def test_a_planted_source_in_the_top_k_gives_the_expected_ratio(planted):
    ws, _ = planted
    ratios = audit(ws)["influence_by_source"]["arithmetic"]
    assert ratios["corpus_share"] == {"gold": pytest.approx(0.1), "web": pytest.approx(0.9)}
    assert ratios["top"]["50"]["gold"] == pytest.approx(10.0)      # all of the top 50 are gold
    assert ratios["top"]["500"]["gold"] == pytest.approx(2.0)      # 100 of 500
    assert ratios["bottom"]["500"]["gold"] == 0.0
    assert list(ratios["top"]) == ["50", "500"]          # k = the corpus size would say nothing
    assert analyses.k_values(30) == [6] and analyses.k_values(50_001) == [50, 500, 5000, 50000]


def test_planted_answer_strings_are_counted_exactly(planted):
    ws, scores = planted
    occurrence = audit(ws)["answer_occurrence"]
    # Arithmetic queries' top 500 hold all gold documents, 20 of which contain '42';
    # '142' and '4.2' in web pages must not count.
    assert {q: r["contains"] for q, r in occurrence["per_query"].items() if q.startswith("arith")} == {
        "arith-0": 20, "arith-1": 20, "arith-2": 20}
    pattern = analyses.answer_pattern("42")
    assert pattern.search("x = 42.") and not pattern.search("142") and not pattern.search("4.2 and 42.5")
    # The first '42' document is the arithmetic query's best-ranked among gold documents 1-20.
    for q in ("arith-0", "arith-1", "arith-2"):
        order = scores.filter(pl.col("query_id") == q).sort("score", descending=True)["doc_id"].to_list()
        expected = next(rank for rank, d in enumerate(order, start=1) if d <= 20)
        assert occurrence["per_query"][q]["first_rank"] == expected <= 100
    median = float(np.median([occurrence["per_query"][f"arith-{i}"]["first_rank"] for i in range(3)]))
    assert occurrence["summary"]["reasoning"] == {"queries": 3, "mean_documents_with_answer": 20.0,
                                                  "queries_with_any": 3, "median_first_rank": median}


def test_the_rank_of_the_first_document_with_the_answer_counts_all_documents():
    matrix = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 9.0]])
    texts = ["no", "no", "no", "Paris is here", "no"]
    answers = {"a": "Paris", "b": "Paris", "c": "Rome"}
    per_query = {}
    for q, row in zip("abc", matrix, strict=True):
        contains = np.array([bool(analyses.answer_pattern(answers[q]).search(t)) for t in texts])
        per_query[q] = {"answer": answers[q], **analyses.query_answer(row, contains, top=2)}
    result = analyses.answer_occurrence(per_query, dict.fromkeys("abc", "factual"), top=2)
    assert [result["per_query"][q]["first_rank"] for q in "abc"] == [4, 2, None]
    assert [result["per_query"][q]["contains"] for q in "abc"] == [0, 1, 0]
    assert result["summary"]["factual"]["median_first_rank"] == 3.0


def test_answers_are_found_by_duckdb_exactly_as_by_the_python_pattern():
    import duckdb

    texts = ["x = 42.", "142", "4.2 and 42.5", "42", "a42", "_42", "é42", "42é", "(42)", "the 42\n", "\n42", ".42",
             "42.x", "42.\n", "42_", "42,5", "٣42", "42٣", "42.٣", "Paris", "PARIS!", "parisian", "in paris.",
             "New York!", "new yorkers", "C++ rocks", "C+++", "$5 off", "1/2 cup", "11/2"]
    con = duckdb.connect()
    for answer in ("42", "Paris", "4.2", "New York", "C++", "$5", "1/2"):
        python = [bool(analyses.answer_pattern(answer).search(t)) for t in texts]
        re2 = [con.execute("SELECT regexp_matches(?, ?)", [t, analyses.answer_re2(answer)]).fetchone()[0]
               for t in texts]
        assert re2 == python, answer
        assert any(python) and not all(python)


def test_the_quick_answer_test_finds_what_the_pattern_finds():
    texts = ["x = 42.", "142", "4.2 and 42.5", "42", "a42", "é42", "(42)", "42,5", "٣42", "Paris", "PARIS!",
             "parisian", "in paris.", "ſ", "S", "K", "k", "$5 off", "1/2 cup", "11/2", "", "4 2"]
    for answer in ("42", " 42 ", "4.2", "$5", "1/2", "Paris", "s", "k", "C++"):
        pattern = analyses.answer_pattern(answer)
        found = analyses.answer_finder(answer)
        assert [found(t) for t in texts] == [pattern.search(t) is not None for t in texts], answer
    # cased answers keep the case-insensitive pattern: 'ſ' (long s) and 'K' (Kelvin) fold to s and k
    assert analyses.answer_finder("s")("ſ") and analyses.answer_finder("k")("K")


@pytest.mark.parametrize("drift", [0.0, 300.0])
def test_float32_scores_correlate_within_their_own_precision(drift):
    """Products of float32 scores are taken in float32, each block about its own means: far from zero (an
    offset 100× the spread) products not centred would be off by ~2e-4, and blocks centred on the first
    block's means by ~1e-6 when the means drift from block to block (here by 300 spreads)."""
    rng = np.random.default_rng(4)
    n = 100_000
    common = rng.standard_t(3, n)
    values = (np.outer(rng.uniform(0, 1, 12), common) + rng.standard_t(3, (12, n)) * rng.uniform(0.2, 2, (12, 1))
              + 100.0 + np.linspace(0, drift, n) * rng.uniform(0.5, 1, (12, 1))).astype(np.float32)
    gram = analyses.Gram(12)
    for start in range(0, n, 16_384):
        gram.add(values[:, start:start + 16_384])
    exact = values.astype(np.float64)
    np.testing.assert_allclose(gram.correlation(), np.corrcoef(exact), atol=2e-7)
    np.testing.assert_allclose(gram.means(), exact.mean(axis=1), rtol=1e-9)
    assert gram.products.dtype == np.float64
    # The blocks dealt alternately to two sums and merged (as the audit's document blocks are): the same.
    halves = [analyses.Gram(12), analyses.Gram(12)]
    for number, start in enumerate(range(0, n, 16_384)):
        halves[number % 2].add(values[:, start:start + 16_384])
    halves[0].merge(halves[1])
    halves[0].merge(analyses.Gram(12))                                       # an empty one changes nothing
    np.testing.assert_allclose(halves[0].correlation(), np.corrcoef(exact), atol=2e-7)
    np.testing.assert_allclose(halves[0].means(), exact.mean(axis=1), rtol=1e-9)
    assert halves[0].n == n


def test_json_numbers_equal_direct_recomputation_from_the_parquet(planted, tmp_path):
    ws, _ = planted
    data = json.loads(json.dumps(audit(ws)))
    with Catalog.open(ws) as catalog:
        path = catalog.one("SELECT out_path FROM runs")[0]
        texts = dict(catalog.sql("SELECT id, text FROM documents"))
        sources = dict(catalog.sql("SELECT id, source FROM documents"))
    scores = pl.read_parquet(score_files(path))
    wide = scores.pivot(on="doc_id", index="query_id", values="score").sort("query_id")
    matrix = wide.drop("query_id").to_numpy()
    np.testing.assert_allclose(np.array(data["correlations"]["matrix"]), np.corrcoef(matrix), atol=1e-12)
    # Source ratio of the factual task, top 50, recomputed with polars.
    top = (scores.filter(pl.col("query_id").str.starts_with("fact")).sort("score", descending=True)
           .group_by("query_id").head(50))
    gold_share = top.with_columns(pl.col("doc_id").replace_strict(sources).alias("source")).group_by(
        "query_id").agg((pl.col("source") == "gold").mean())["source"].mean()
    assert data["influence_by_source"]["factual"]["top"]["50"]["gold"] == pytest.approx(gold_share / 0.1)
    for query_id, result in data["answer_occurrence"]["per_query"].items():
        best = scores.filter(pl.col("query_id") == query_id).sort("score", descending=True).head(500)["doc_id"]
        assert result["contains"] == sum(" 42 " in texts[d] + " " for d in best)
    for query_id, result in data["concentration"]["per_query"].items():
        row = np.sort(scores.filter(pl.col("query_id") == query_id)["score"].to_numpy())[::-1]
        positive = np.clip(row, 0, None)
        assert result["cumulative"][3] == pytest.approx(positive[:20].sum() / positive.sum())   # top 2%
    fact = data["concentration"]["per_task"]["factual"]
    assert fact["alpha_mean"] == pytest.approx(0.8, abs=1e-9)


def test_report_renders_every_section_and_a_fresh_catalog_says_what_is_missing(planted, tmp_path):
    ws, _ = planted
    page = render(audit(ws))
    for heading in ("1. Corpus composition", "2. Influence by source", "3. Query-by-query correlation",
                    "4. Concentration", "5. Answer occurrence"):
        assert heading in page
    assert page.count("<svg") >= 4 and "http" not in page.split("<svg")[0]
    from curator.catalog.database import create_workspace

    fresh, _ = create_workspace(tmp_path / "fresh")
    data = audit(fresh)
    assert data["run"] is None and "answer occurrence" in data["missing"]
    assert "Needs a scored run" in render(data)


def test_compare_equals_numpy_per_query(planted, tmp_path):
    ws, scores = planted
    shuffled = scores.with_columns((pl.col("score") + pl.Series(np.random.default_rng(3).normal(
        0, 1, scores.height))).alias("score"))
    plant_run(ws, tmp_path, shuffled, {q: 1.0 for q in scores["query_id"].unique()}, run_id="score-other")
    result = compare(ws, "score-test", "score-other")
    for query_id, values in result["per_query"].items():
        a = scores.filter(pl.col("query_id") == query_id).sort("doc_id")["score"].to_numpy()
        b = shuffled.filter(pl.col("query_id") == query_id).sort("doc_id")["score"].to_numpy()
        assert values["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    out = curator("compare", "score-test", "score-other", "-w", ws.root)
    assert "mean" in out.stdout and (ws.root / "reports" / "compare-score-test-score-other.svg").is_file()
    report = tmp_path / "r.html"
    curator("audit", "--out", report, "--json", tmp_path / "r.json", "-w", ws.root)
    assert report.read_text().startswith("<!doctype html>")


def test_scores_sorted_per_source_give_what_the_stable_argsorts_give_with_ties():
    """`RankedScores` against the functions it replaces, on rows full of ties, -0.0 beside 0.0, float32 and
    float64, sources of every size (one empty)."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        n, n_sources = int(rng.integers(1, 500)), int(rng.integers(1, 5))
        codes = rng.integers(0, n_sources, n)
        if trial % 2:                                   # sources in runs of consecutive documents
            codes = np.sort(codes)
        split = analyses.SourceSplit(codes, n_sources + (trial % 4 == 0))       # a source with no documents
        zeros = np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(np.float32)
        for row in (rng.integers(-3, 4, n).astype(np.float64), rng.normal(size=n),
                    rng.normal(size=n).astype(np.float32), zeros, -np.ones(n, dtype=np.float32)):
            ranked = analyses.RankedScores(row, split)
            assert ranked.kth(list(range(1, n + 1))).tolist() == np.sort(row)[::-1].tolist()
            ks = [k for k in (1, 7, 50, 399) if k <= n] + [n]
            want = analyses.source_counts(row, codes, split.n_sources, ks)
            got = analyses.source_counts_ranked(ranked, ks)
            for side in ("top", "bottom"):
                for k in ks:
                    assert got[side][k].tolist() == want[side][k].tolist(), (side, k)
            order = np.argsort(-row, kind="stable")
            assert analyses.top_order(ranked, 37).tolist() == order[:37].tolist()
            assert analyses.cumulative_positive_ranked(ranked, analyses.PERCENTS) == pytest.approx(
                analyses.cumulative_positive(row.astype(np.float64), analyses.PERCENTS), rel=1e-12)
            assert analyses.power_law(ranked.top_values(500).astype(np.float64), presorted=True) == \
                analyses.power_law(row.astype(np.float64))
            contains = rng.random(n) < 0.05
            assert analyses.best_rank(row, np.flatnonzero(contains)) == analyses.query_answer(row, contains)["first_rank"]


def test_a_query_whose_scores_hold_nan_is_refused():
    split = analyses.SourceSplit(np.array([0, 1, 0, 1]), 2)
    with pytest.raises(analyses.ScoresNotANumber):
        analyses.RankedScores(np.array([0.1, np.nan, 0.3, 0.2], dtype=np.float32), split)


def test_a_sources_scores_are_the_same_gathered_or_copied_run_by_run(monkeypatch):
    rng = np.random.default_rng(8)
    row = rng.normal(size=3000).astype(np.float32)
    layouts = {"runs": np.repeat([2, 0, 1, 0, 2], 600), "alternating": np.arange(3000) % 3,
               "shuffled": rng.integers(0, 3, 3000)}
    monkeypatch.setattr(analyses, "SOURCE_RUNS", 4)
    for name, codes in layouts.items():
        split = analyses.SourceSplit(codes, 4)                       # source 3 has no documents
        assert (split.runs[0] is None) == (name != "runs") and split.runs[3] == []
        for source in range(4):
            got = split.scores(row, source)
            assert got.tolist() == row[codes == source].tolist()
            got[:] = 7                                               # a copy, never a view of the row
        assert not (row == 7).any()
    four, five = np.repeat([0, 1] * 4, 5), np.repeat([0, 1] * 5, 5)               # source 0 in four, five runs
    assert len(analyses.SourceSplit(four, 2).runs[0]) == 4 and analyses.SourceSplit(five, 2).runs[0] is None


def test_average_ranks_equal_polars_average_ranks_with_ties_and_signed_zeros():
    rng = np.random.default_rng(6)
    for values in (rng.integers(-3, 4, 2000).astype(np.float32), rng.normal(size=2000).astype(np.float32),
                   rng.integers(-3, 4, 2000).astype(np.float64), np.where(rng.random(50) < 0.5, -0.0, 0.0),
                   np.array([-np.inf, 2.5, np.inf, -1e-45, 1e-45, 2.5], dtype=np.float32), np.zeros(1, np.float32),
                   np.zeros(0, np.float32)):
        want = pl.Series(values.astype(np.float64) + 0.0).rank("average").to_numpy()
        got = average_ranks(values)
        assert got.dtype == np.float64 and got.tolist() == want.tolist(), values[:8]
    assert pearson(np.arange(5.0), np.arange(5.0) * 2 + 1) == pytest.approx(1.0)
    assert np.isnan(pearson(np.ones(4), np.arange(4.0)))
    assert np.isnan(pearson(np.full(1001, 0.1), np.arange(1001.0)))    # its mean is not 0.1 exactly
