"""The bounded-memory stages against a straightforward in-memory computation of the same numbers.

The audit reads scores in slices (document blocks, query groups); SLICE_BYTES is made tiny here so
every analysis crosses many slice boundaries, and each number is compared with the whole
query × document matrix computed the obvious way (the audit as it was before it streamed).
Both score layouts are read: one Parquet file, and a folder of parts per (query batch, document chunk).
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import curator, write_jsonl
from test_audit import planted  # noqa: F401  (a fixture)
from tinylm import TRAINING_TEXT, save_tiny

from curator.audit import analyses
from curator.audit import audit as audit_module
from curator.audit import slices as slices_module
from curator.audit import compare as compare_module
from curator.audit.audit import audit
from curator.audit.compare import compare
from curator.catalog.database import Catalog
from curator.catalog.records import score_files
from curator.catalog.workspace import Workspace
from curator.constants import REASONING_TASKS
from curator.curate.rank import RankConfig, rank


# -- the reference: the whole matrix in memory ----------------------------------------------------

def reference_audit(ws: Workspace, run_id: str) -> dict:
    with Catalog.open(ws) as catalog:
        path = catalog.one("SELECT out_path FROM runs WHERE id = ?", [run_id])[0]
        scores = pl.read_parquet(score_files(path))
        docs = dict((d, (s, t)) for d, s, t in catalog.sql("SELECT id, source, text FROM documents"))
        queries = catalog.sql("SELECT id, task, answer FROM queries")
    wide = scores.pivot(on="doc_id", index="query_id", values="score").sort("query_id")
    query_ids = wide["query_id"].to_list()
    doc_ids = np.array([int(c) for c in wide.columns[1:]])
    order = np.argsort(doc_ids)
    doc_ids, matrix = doc_ids[order], wide.drop("query_id").to_numpy().astype(np.float64)[:, order]
    tasks = {q: t for q, t, _ in queries if q in query_ids}
    answers = {q: a for q, _, a in queries if q in query_ids}
    labels = np.array([docs[int(d)][0] for d in doc_ids])
    ks = analyses.k_values(len(doc_ids))
    ratios = {}
    for task in sorted(set(tasks.values())):
        rows = matrix[[i for i, q in enumerate(query_ids) if tasks[q] == task]]
        sorted_rows = np.argsort(-rows, axis=1, kind="stable")
        result = {"corpus_share": {s: float(np.mean(labels == s)) for s in sorted(set(labels))}, "top": {},
                  "bottom": {}}
        for k in ks:
            for side, picks in (("top", sorted_rows[:, :k]), ("bottom", sorted_rows[:, ::-1][:, :k])):
                result[side][str(k)] = {s: float(np.mean([(labels[p] == s).mean() for p in picks]))
                                        / result["corpus_share"][s] for s in result["corpus_share"]}
        ratios[task] = result
    corr = np.corrcoef(matrix) if len(query_ids) > 1 else np.ones((1, 1))
    per_query = {}
    for q, row in zip(query_ids, matrix, strict=True):
        positive = np.sort(np.clip(row, 0, None))[::-1]
        cumulative = [float(positive[:max(1, math.ceil(len(row) * p / 100))].sum() / positive.sum())
                      if positive.sum() > 0 else 0.0 for p in analyses.PERCENTS]
        per_query[q] = {"cumulative": cumulative, "power_law": analyses.power_law(row)}
    occurrence = {}
    for q, row in zip(query_ids, matrix, strict=True):
        if not answers[q] or not answers[q].strip():
            continue
        pattern = analyses.answer_pattern(answers[q])
        has = np.array([bool(pattern.search(docs[int(d)][1])) for d in doc_ids])[np.argsort(-row, kind="stable")]
        occurrence[q] = {"answer": answers[q], "top": int(min(500, len(has))), "contains": int(has[:500].sum()),
                         "first_rank": int(np.argmax(has)) + 1 if has.any() else None}
    return {"influence_by_source": ratios, "correlations": corr, "concentration": per_query,
            "answer_occurrence": occurrence, "documents": len(doc_ids)}


def assert_audit_equals_reference(data: dict, want: dict) -> None:
    assert data["run"]["documents"] == want["documents"]
    # `curator score` writes float32 scores, whose products the audit takes in float32 (analyses.Gram):
    # within ~1e-7 of numpy's float64 corrcoef, as the scores' own precision allows.
    np.testing.assert_allclose(np.array(data["correlations"]["matrix"], dtype=float), want["correlations"],
                               rtol=0, atol=1e-6)
    assert flat(data["influence_by_source"]) == pytest.approx(flat(want["influence_by_source"]), rel=1e-12)
    for q, result in want["concentration"].items():
        got = data["concentration"]["per_query"][q]
        assert got["cumulative"] == pytest.approx(result["cumulative"], rel=1e-9)
        assert (got["power_law"] is None) == (result["power_law"] is None)
        if result["power_law"]:
            assert got["power_law"] == pytest.approx(result["power_law"], rel=1e-9)
    assert {q: {k: v for k, v in r.items() if k != "task"}
            for q, r in data["answer_occurrence"]["per_query"].items()} == want["answer_occurrence"]


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested dicts of numbers as one dict keyed by path (pytest.approx compares flat mappings)."""
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}/{key}") if isinstance(value, dict) else {f"{prefix}/{key}": value})
    return out


@pytest.fixture
def tiny_slices(monkeypatch):
    """Slices of a few hundred bytes: many document blocks and one query per group."""
    monkeypatch.setattr(slices_module, "SLICE_BYTES", 8 * 40)


def test_streamed_audit_equals_the_in_memory_audit_on_planted_scores(planted, tiny_slices):  # noqa: F811
    ws, _ = planted
    assert_audit_equals_reference(audit(ws), reference_audit(ws, "score-test"))


# -- a real run of a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run of `curator score` with a tiny model, and the same scores rewritten as a folder of parts
    (two query batches × three document chunks) recorded as a second run."""
    root = tmp_path_factory.mktemp("real")
    ws = root / "ws"
    curator("init", ws)
    texts = [t * k for t in TRAINING_TEXT for k in (1, 2, 3)] + ["the answer is 7.", "7 and 14 and 21", "x 7.5"]
    write_jsonl(root / "a.jsonl", [{"text": t} for t in texts[::2]])
    write_jsonl(root / "b.jsonl", [{"text": t} for t in texts[1::2]])
    curator("ingest", root / "a.jsonl", "--source", "alpha", "-w", ws)
    curator("ingest", root / "b.jsonl", "--source", "beta", "-w", ws)
    model = save_tiny(root / "tiny", seed=2)
    curator("fit", "--model", model, "--layers", "last:1", "--max-seq-len", "32", "-w", ws)
    curator("queries", "generate", "--task", "arithmetic", "--n", "3", "-w", ws)
    curator("queries", "generate", "--task", "slope", "--n", "2", "--seed", "4", "-w", ws)
    curator("score", "--queries", "arithmetic,slope", "--out", root / "run.parquet", "-w", ws)
    workspace = Workspace(ws)
    with Catalog.open(workspace) as catalog:
        run = catalog.one("SELECT id, out_path FROM runs")
    scores = pl.read_parquet(score_files(run[1]))
    parts = root / "parts"
    parts.mkdir()
    queries, docs = sorted(scores["query_id"].unique()), sorted(scores["doc_id"].unique())
    for b, batch in enumerate((queries[:2], queries[2:])):
        for c, chunk in enumerate(np.array_split(docs, 3)):
            scores.filter(pl.col("query_id").is_in(batch) & pl.col("doc_id").is_in(chunk.tolist())).write_parquet(
                parts / f"part-{b}-{c}.parquet")
    with Catalog.open(workspace, write=True) as catalog:
        catalog.sql("INSERT INTO runs SELECT 'score-parts', kind, method, model_id, factors_id, query_ids, settings, "
                    "?, stats, finished_at + INTERVAL 1 SECOND FROM runs WHERE id = ?", [str(parts), run[0]])
    return workspace, run[0], scores


def test_a_real_run_audits_the_same_streamed_as_in_memory_in_both_layouts(real_run, tiny_slices):
    ws, run_id, _ = real_run
    want = reference_audit(ws, run_id)
    assert want["documents"] > 20
    one_file, folder = audit(ws, run_id), audit(ws, "score-parts")
    assert_audit_equals_reference(one_file, want)
    assert_audit_equals_reference(folder, want)
    assert folder["correlations"] == one_file["correlations"]


def test_ranking_and_compare_of_a_folder_of_parts_equal_polars_on_the_whole_table(real_run):
    ws, run_id, scores = real_run
    rank(ws, RankConfig(name="parts", run="score-parts", aggregate="mean-z"), replace=True)
    with Catalog.open(ws) as catalog:
        stored = catalog.frame("SELECT doc_id, score, rank FROM ranking_scores WHERE ranking = 'parts' "
                               "ORDER BY rank")
        tasks = dict(catalog.sql("SELECT id, task FROM queries"))
    reasoning = scores.filter(pl.col("query_id").replace_strict(tasks).is_in(list(REASONING_TASKS)))
    value = pl.col("score_per_nat").cast(pl.Float64)
    z = (value - value.mean().over("query_id")) / value.std(ddof=0).over("query_id")
    want = (reasoning.with_columns(z.alias("z")).group_by("doc_id").agg(pl.col("z").mean())
            .sort(["z", "doc_id"], descending=[True, False]))
    assert stored["doc_id"].to_list() == want["doc_id"].to_list()
    np.testing.assert_allclose(stored["score"].to_numpy(), want["z"].to_numpy(), rtol=1e-9, atol=1e-12)
    result = compare(ws, run_id, "score-parts")
    assert len(result["per_query"]) == scores["query_id"].n_unique()
    for values in result["per_query"].values():      # the same scores read two ways
        assert values["pearson"] == pytest.approx(1.0) and values["spearman"] == pytest.approx(1.0)


def test_compare_spearman_equals_numpy_with_ties(planted, tmp_path):  # noqa: F811
    from helpers import plant_run

    ws, scores = planted
    rounded = scores.with_columns((pl.col("score") * 3).round(0).alias("score"))     # many ties
    plant_run(ws, tmp_path, rounded, {q: 1.0 for q in scores["query_id"].unique()}, run_id="score-ties")
    result = compare(ws, "score-test", "score-ties")
    for query_id, values in result["per_query"].items():
        a = scores.filter(pl.col("query_id") == query_id).sort("doc_id")["score"]
        b = rounded.filter(pl.col("query_id") == query_id).sort("doc_id")["score"]
        spearman = np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1]
        assert values["spearman"] == pytest.approx(spearman, rel=1e-9)
        assert values["pearson"] == pytest.approx(np.corrcoef(a.to_numpy(), b.to_numpy())[0, 1], rel=1e-9)


def test_compare_of_two_full_tables_reads_their_parts_and_equals_the_duckdb_join(planted, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """Two runs over the same documents, written as `curator score` writes them, are compared from their
    parts (two query groups here), with the DuckDB join's numbers: ties and -0.0 beside 0.0 included."""
    ws, scores = planted
    rounded = scores.with_columns(((pl.col("score") * 3).round(0) * pl.when(pl.col("doc_id") % 2 == 0)
                                   .then(1.0).otherwise(-1.0)).alias("score"))            # ties, -0.0 and 0.0
    summarised_run(ws, tmp_path, scores, "score-a")
    summarised_run(ws, tmp_path, rounded, "score-b")
    taken = []
    from_parts = compare_module._compare_from_parts
    monkeypatch.setattr(compare_module, "_compare_from_parts", lambda *a: taken.append(from_parts(*a)) or taken[-1])
    monkeypatch.setattr(compare_module, "SLICE_BYTES", 2 * 8 * 1000 * 3)                  # three queries a group
    got = compare(ws, "score-a", "score-b")
    want = compare(ws, "score-a-plain", "score-b-plain")
    assert taken[0] is not None and taken[1] is None                      # parts, then the DuckDB join
    assert got["per_query"].keys() == want["per_query"].keys() and len(want["per_query"]) == 5
    for query_id, values in want["per_query"].items():
        assert got["per_query"][query_id] == pytest.approx(values, rel=1e-9), query_id
        a = scores.filter(pl.col("query_id") == query_id).sort("doc_id")["score"].cast(pl.Float32)
        b = rounded.filter(pl.col("query_id") == query_id).sort("doc_id")["score"].cast(pl.Float32)
        spearman = np.corrcoef(a.rank().to_numpy(), (b + 0.0).rank().to_numpy())[0, 1]
        assert got["per_query"][query_id]["spearman"] == pytest.approx(spearman, rel=1e-9)


def test_compare_from_parts_with_an_empty_part_and_with_nan(planted, tmp_path):  # noqa: F811
    """A run with an empty part has no doc-id statistics in it, so its id range is counted from its own
    view (`compare` names the runs' views run_a and run_b), and its documents are none (the audit read
    them from the file: a StopIteration); a NaN score is an error naming the query."""
    from helpers import plant_run

    from curator.errors import CuratorError
    from curator.influence.score_dataset import ScoreDataset, write_part

    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-a")
    wide = scores.pivot(on="query_id", index="doc_id", values="score").sort("doc_id")
    query_ids = sorted(scores["query_id"].unique())
    doc_ids = wide["doc_id"].to_numpy()
    values = wide.select(query_ids).to_numpy().T.astype(np.float32)

    def record(run_id: str, matrix: np.ndarray) -> None:
        dataset = ScoreDataset(tmp_path / run_id)
        manifest = dataset.open(run_id, [query_ids])
        dataset.pending.mkdir(exist_ok=True)
        write_part(dataset.pending / "all.parquet", query_ids, doc_ids, matrix, matrix / 2)
        write_part(dataset.pending / "none.parquet", query_ids, doc_ids[:0], matrix[:, :0], matrix[:, :0])
        dataset.publish(manifest, ["all.parquet", "none.parquet"], doc_ids, {q: 1.0 for q in query_ids})
        plant_run(ws, tmp_path, scores, {q: 1.0 for q in query_ids}, run_id=f"{run_id}-plain")
        with Catalog.open(ws, write=True) as catalog:
            catalog.sql("UPDATE runs SET id = ?, out_path = ? WHERE id = ?",
                        [run_id, str(dataset.root), f"{run_id}-plain"])

    record("score-empty", values)
    result = compare(ws, "score-a", "score-empty")
    assert all(v["pearson"] == pytest.approx(1.0) and v["spearman"] == pytest.approx(1.0)
               for v in result["per_query"].values()) and len(result["per_query"]) == 5
    assert_audit_equals_reference(audit(ws, "score-empty"), reference_audit(ws, "score-a-plain"))
    poisoned = values.copy()
    poisoned[query_ids.index("fact-1"), 10] = np.nan
    record("score-nan", poisoned)
    with pytest.raises(CuratorError, match="score-nan hold NaN for query fact-1"):
        compare(ws, "score-a", "score-nan")


def test_a_partial_score_table_is_one_clear_error(planted, tmp_path):  # noqa: F811
    from helpers import plant_run

    from curator.errors import CuratorError

    ws, scores = planted
    plant_run(ws, tmp_path, scores.filter(~((pl.col("query_id") == "fact-1") & (pl.col("doc_id") == 7))),
              {q: 1.0 for q in scores["query_id"].unique()}, run_id="score-holes")
    with pytest.raises(CuratorError, match="not a full query × document table: document 7 has 4 scores"):
        audit(ws, "score-holes")
    json.dumps(audit(ws, "score-test"))


@pytest.mark.parametrize("tiers", [(2, 4), (4, 10_000)])
def test_one_slice_and_answers_searched_past_the_top(real_run, planted, monkeypatch, tiers):  # noqa: F811
    """Default slices hold every query (the correlations come from the one slice); a top of one document
    makes answers be looked for further down: in a wider top of two, then of four, then in every text
    by DuckDB; or, when the last tier is longer than the corpus, in the whole row's order."""
    ws, run_id, _ = real_run
    assert_audit_equals_reference(audit(ws, "score-parts"), reference_audit(ws, run_id))
    ws, _ = planted
    want = reference_audit(ws, "score-test")
    monkeypatch.setattr(audit_module, "ANSWER_TOP", 1)
    monkeypatch.setattr(audit_module, "ANSWER_WIDER", tiers)
    searched = audit(ws)["answer_occurrence"]["per_query"]
    first = {q: r["first_rank"] for q, r in want["answer_occurrence"].items()}
    assert {q: r["first_rank"] for q, r in searched.items()} == first
    assert any(rank is not None and rank > 4 for rank in first.values()), first     # past the tiers
    assert any(rank in (2, 3, 4) for rank in first.values()), first                  # found in a tier


# -- parts with a summary (what `curator score` writes) --------------------------------------------

def summarised_run(ws: Workspace, tmp_path, scores: pl.DataFrame, run_id: str, rebatched: bool = False) -> Path:
    """The planted scores as `curator score` publishes them: parts with summaries, two query batches,
    published in two steps as an incremental run appends (the second adds documents 601-1000, one of its
    parts with ids that are not consecutive), and recorded as a run. `rebatched`: the first step holds
    every query in one batch, as a run scored again with less query memory would leave it."""
    from helpers import plant_run

    from curator.influence.score_dataset import ScoreDataset, write_part

    query_ids = sorted(scores["query_id"].unique())
    batches = [query_ids[:2], query_ids[2:]]
    wide = scores.pivot(on="query_id", index="doc_id", values="score").sort("doc_id")
    doc_ids = wide["doc_id"].to_numpy()
    dataset = ScoreDataset(tmp_path / run_id)
    manifest = dataset.open(run_id, batches)
    for step, chunks in enumerate(([doc_ids[:250], doc_ids[250:600]], [doc_ids[600:][::2], doc_ids[600:][1::2]])):
        dataset.pending.mkdir(exist_ok=True)
        names = []
        for b, batch in enumerate([query_ids] if rebatched and step == 0 else batches):
            for chunk in chunks:
                block = wide.filter(pl.col("doc_id").is_in(chunk.tolist())).sort("doc_id")
                values = block.select(batch).to_numpy().T.astype(np.float32)
                names.append(f"b{b}-{chunk[0]}-{len(chunk)}.parquet")
                write_part(dataset.pending / names[-1], batch, block["doc_id"].to_numpy(), values, values / 2)
        manifest = dataset.publish(manifest, names, np.concatenate(chunks), {q: 2.0 for q in query_ids})
    # the run's rows in one file too, to rank and audit the same rows through DuckDB
    rows = pl.read_parquet(score_files(dataset.root)).drop("score_per_nat")
    plant_run(ws, tmp_path, rows, {q: 2.0 for q in query_ids}, run_id=f"{run_id}-plain")
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("INSERT INTO runs SELECT ?, kind, method, model_id, factors_id, query_ids, settings, ?, stats, "
                    "finished_at + INTERVAL 1 SECOND FROM runs WHERE id = ?",
                    [run_id, str(dataset.root), f"{run_id}-plain"])
    return dataset.root


def test_an_audit_of_parts_holding_nan_names_the_query(planted, tmp_path):  # noqa: F811
    """`curator score` stops on NaN; parts another writer left with one are refused by name, not ranked."""
    from curator.errors import CuratorError

    ws, scores = planted
    poisoned = scores.with_columns(pl.when((pl.col("query_id") == "fact-1") & (pl.col("doc_id") == 321))
                                   .then(float("nan")).otherwise(pl.col("score")).alias("score"))
    summarised_run(ws, tmp_path, poisoned, "score-nan")
    with pytest.raises(CuratorError, match="score-nan hold NaN for query fact-1"):
        audit(ws, "score-nan")


def test_scores_that_fail_while_the_documents_are_counted_name_the_score_files(planted, tmp_path, monkeypatch):  # noqa: F811
    """Without a range of ids the documents are counted from the scores through DuckDB: a score file gone
    by then is the error that names it, not DuckDB's."""
    from helpers import plant_run

    from curator.errors import CuratorError

    ws, scores = planted
    sparse = scores.filter(pl.col("doc_id") != 500)
    path = plant_run(ws, tmp_path, sparse, {q: 1.0 for q in sparse["query_id"].unique()}, run_id="score-gap")
    start_reading = audit_module._start_reading

    def then_gone(*args):
        reading = start_reading(*args)
        path.unlink()
        return reading

    monkeypatch.setattr(audit_module, "_start_reading", then_gone)
    with pytest.raises(CuratorError, match="score-gap"):
        audit(ws, "score-gap")


def test_part_summaries_equal_the_rows_they_summarise(planted, tmp_path):  # noqa: F811
    from curator.influence.score_dataset import part_summaries

    ws, scores = planted
    root = summarised_run(ws, tmp_path, scores, "score-sum")
    summaries = part_summaries(sorted(root.glob("*.parquet")))
    assert summaries is not None and len(summaries) == 8
    assert sorted(s.first_doc is None for s in summaries) == [False] * 4 + [True] * 4   # both kinds of ids
    for summary in summaries:
        rows = pl.read_parquet(summary.path)
        assert rows["query_id"].to_list() == [q for q in summary.queries for _ in range(summary.documents)]
        for i, query_id in enumerate(summary.queries):
            mine = rows.filter(pl.col("query_id") == query_id)
            assert mine["doc_id"].to_list() == summary.doc_ids().tolist()
            for column in ("score", "score_per_nat"):
                values = mine[column].cast(pl.Float64).to_numpy()
                assert summary.sums[column][i].tolist() == pytest.approx(
                    [len(values), values.sum(), (values * values).sum()], rel=1e-12)
            assert summary.block("score", i, i + 1)[0].tolist() == mine["score"].to_list()
    assert part_summaries([tmp_path / "score-sum-plain.parquet"]) is None      # written by another tool


def test_a_parts_pieces_are_its_row_groups_and_join_into_its_blocks(tmp_path, monkeypatch):
    """Row groups of two queries each (and a file whose row groups cut queries in half, as another writer
    may): every (start, stop) reads back the values written, piece by piece and as one block."""
    import pyarrow.parquet as pq

    from curator.influence import score_dataset
    from curator.influence.score_dataset import part_summaries, write_part

    values = np.arange(5 * 7, dtype=np.float32).reshape(5, 7) / 3
    queries = [f"q{i}" for i in range(5)]
    monkeypatch.setattr(score_dataset, "ROW_GROUP_ROWS", 14)
    write_part(tmp_path / "whole.parquet", queries, np.arange(10, 17), values, values / 2)
    table = pq.read_table(tmp_path / "whole.parquet")
    pq.write_table(table, tmp_path / "halves.parquet", row_group_size=10)      # 10 rows: 1 3/7 queries
    whole, halves = part_summaries([tmp_path / "whole.parquet", tmp_path / "halves.parquet"])
    assert pq.ParquetFile(whole.path).metadata.num_row_groups == 3
    for part in (whole, halves):
        for start in range(5):
            for stop in range(start + 1, 6):
                pieces = list(part.pieces("score", start, stop))
                assert [at for at, _ in pieces] == sorted(at for at, _ in pieces)
                assert np.concatenate([p for _, p in pieces]).tolist() == values[start:stop].tolist()
                assert all(p.tolist() == values[at:at + len(p)].tolist() for at, p in pieces)
                assert part.block("score_per_nat", start, stop).tolist() == (values[start:stop] / 2).tolist()
    assert [len(p) for _, p in whole.pieces("score", 1, 5)] == [1, 2, 1]      # groups of q0-1, q2-3, q4


@pytest.mark.parametrize("normalize, tasks", [("raw", ["arithmetic", "factual"]), ("per-nat", ["arithmetic"])])
def test_ranks_from_part_summaries_equal_the_duckdb_ranks(planted, tmp_path, monkeypatch, normalize,  # noqa: F811
                                                          tasks):
    from curator.curate import rank as rank_module

    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-sum")
    used = []
    original = rank_module.summarised_ranking
    monkeypatch.setattr(rank_module, "summarised_ranking", lambda *a: used.append(original(*a)) or used[-1])
    for aggregate in ("mean-z", "mean", "max"):
        config = dict(aggregate=aggregate, normalize=normalize, tasks=tasks)
        rank(ws, RankConfig(name="sum", run="score-sum", **config), replace=True)
        rank(ws, RankConfig(name="plain", run="score-sum-plain", **config), replace=True)
        with Catalog.open(ws) as catalog:
            got, want = (catalog.frame("SELECT doc_id, score, rank FROM ranking_scores WHERE ranking = ? "
                                       "ORDER BY rank", [name]) for name in ("sum", "plain"))
        # Each document's score, and the score at each rank: the same ranking up to the order of scores
        # that are equal but for rounding (summed in another order; DuckDB's own threads vary it too).
        by_doc = got.sort("doc_id")["score"].to_numpy(), want.sort("doc_id")["score"].to_numpy()
        np.testing.assert_allclose(*by_doc, rtol=1e-9, atol=1e-12, err_msg=aggregate)
        np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-9, atol=1e-12)
        assert got["rank"].to_list() == list(range(1, len(want) + 1))
        assert (got["doc_id"] == want["doc_id"]).mean() > 0.9, aggregate
    assert used == [True] * 3                  # the summarised run took the new path (the single file has none)


def test_an_audit_from_part_summaries_equals_the_in_memory_audit(planted, tmp_path, monkeypatch):  # noqa: F811
    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-sum")
    want = reference_audit(ws, "score-sum-plain")
    assert_audit_equals_reference(audit(ws, "score-sum"), want)              # one slice
    monkeypatch.setattr(slices_module, "SLICE_BYTES", 4 * 40)                  # one query a group, many blocks
    assert_audit_equals_reference(audit(ws, "score-sum"), want)


def test_parts_written_with_nullable_columns_read_as_the_required_ones(planted, tmp_path):  # noqa: F811
    """Parts are written with required columns (no definition levels); a run written before, whose columns
    are nullable, mixed with new parts as an incremental run leaves it, audits and ranks the same."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws, scores = planted
    root = summarised_run(ws, tmp_path, scores, "score-sum")
    assert all(not field.nullable for field in pq.read_schema(next(root.glob("*.parquet"))))
    for number, path in enumerate(sorted(root.glob("*.parquet"))):
        if number % 2:
            table = pq.read_table(path)
            pq.write_table(table.cast(pa.schema([field.with_nullable(True) for field in table.schema],
                                                metadata=table.schema.metadata)), path)
            assert pq.read_schema(path).field("score").nullable
    assert_audit_equals_reference(audit(ws, "score-sum"), reference_audit(ws, "score-sum-plain"))
    rank(ws, RankConfig(name="sum", run="score-sum"))
    rank(ws, RankConfig(name="plain", run="score-sum-plain"))
    with Catalog.open(ws) as catalog:
        got, want = (catalog.frame("SELECT doc_id, score FROM ranking_scores WHERE ranking = ? ORDER BY doc_id",
                                   [name]) for name in ("sum", "plain"))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_a_run_larger_than_a_slice_is_read_into_the_same_memory_group_after_group(planted, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """Query groups and then document blocks are lent one piece of memory in turn: each used to be fresh,
    with the one before still held (4 × SLICE_BYTES at the peak). Parts and the DuckDB path alike."""
    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-sum")
    want = reference_audit(ws, "score-sum-plain")
    taken = []
    empty_slice = slices_module.empty_slice
    monkeypatch.setattr(slices_module, "empty_slice", lambda *args: taken.append(args) or empty_slice(*args))
    monkeypatch.setattr(slices_module, "SLICE_BYTES", 4 * 2 * 1000)           # two queries a group
    for run_id in ("score-sum", "score-sum-plain"):
        taken.clear()
        assert_audit_equals_reference(audit(ws, run_id), want)
        assert len(taken) == 1 and taken[0][0][0] <= 4 * 2 * 1000 * 2, (run_id, taken)  # groups, then blocks


def test_document_blocks_read_ahead_and_leave_no_read_running_when_left_early(planted, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """Each block is read while the one before is used, into the other half of the memory: the blocks
    join into the whole table; a caller that stops after one block leaves no read writing into it."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from curator.catalog.records import get_run
    from curator.curate.scores import scores_view, summarised_parts

    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-sum")
    wide = scores.pivot(on="doc_id", index="query_id", values="score").sort("query_id")
    query_ids = wide["query_id"].to_list()
    doc_ids = np.array(sorted(int(c) for c in wide.columns[1:]))
    want = wide.select([str(d) for d in doc_ids]).to_numpy().astype(np.float32)
    monkeypatch.setattr(slices_module, "SLICE_BYTES", 4 * 5 * 300)            # blocks of 150 documents
    read_into = slices_module._read_into
    monkeypatch.setattr(slices_module, "_read_into", lambda *args: time.sleep(0.05) or read_into(*args))
    with Catalog.open(ws) as catalog, ThreadPoolExecutor(2) as readers:
        run = get_run(catalog, "score-sum")
        scores_view(catalog, run)
        parts = summarised_parts(run)
        blocks = [block.copy() for block in slices_module.document_blocks(
            catalog, run, query_ids, doc_ids, parts, slices_module.SliceMemory(), readers)]
        assert [b.shape[1] for b in blocks] == [150] * 6 + [100]
        np.testing.assert_array_equal(np.concatenate(blocks, axis=1), want)
        submitted = []
        submit = readers.submit
        monkeypatch.setattr(readers, "submit", lambda *a: submitted.append(submit(*a)) or submitted[-1])
        generator = slices_module.document_blocks(catalog, run, query_ids, doc_ids, parts,
                                                  slices_module.SliceMemory(), readers)
        next(generator)                       # the second block's reads are under way now
        assert not all(read.done() for read in submitted)
        generator.close()
        assert all(read.done() for read in submitted)


def test_compacting_a_run_joins_its_small_parts_and_changes_no_score(planted, tmp_path, monkeypatch):  # noqa: F811
    """Each query batch's parts are joined in document order into parts of at most 700 documents (the
    250 + 350 of the first step, the 200 + 200 of the second); the folder holds exactly the listed parts,
    the rows are the same, and the audit and the ranking equal the uncompacted run's. A compaction killed
    after its manifest was written is finished by the next `open`."""
    from curator.influence.score_dataset import ScoreDataset, part_summaries

    ws, scores = planted
    root = summarised_run(ws, tmp_path, scores, "score-sum")
    rows_before = pl.read_parquet(root / "*.parquet").sort("query_id", "doc_id")
    dataset = ScoreDataset(root)
    manifest = dataset.read_manifest()
    assert dataset.compact(manifest) == manifest and len(list(root.glob("*.parquet"))) == 8   # few: left alone
    original = ScoreDataset._finish_publishing
    monkeypatch.setattr(ScoreDataset, "_finish_publishing", lambda self, m: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        dataset.compact(manifest, documents_per_part=700, min_parts=2)
    monkeypatch.setattr(ScoreDataset, "_finish_publishing", original)
    manifest = dataset.open(manifest.run_id, manifest.query_batches)        # finishes the killed compaction
    assert sorted(p.name for p in root.glob("*.parquet")) == manifest.parts and len(manifest.parts) == 4
    summaries = part_summaries([root / name for name in manifest.parts])
    assert sorted(s.documents for s in summaries) == [400, 400, 600, 600]
    assert all(name.split("-")[1] == "joined" for name in manifest.parts)
    assert pl.read_parquet(root / "*.parquet").sort("query_id", "doc_id").equals(rows_before)
    assert dataset.compact(manifest, documents_per_part=700, min_parts=2) == manifest    # nothing to join
    assert_audit_equals_reference(audit(ws, "score-sum"), reference_audit(ws, "score-sum-plain"))
    rank(ws, RankConfig(name="sum", run="score-sum"), replace=True)
    rank(ws, RankConfig(name="plain", run="score-sum-plain"), replace=True)
    with Catalog.open(ws) as catalog:
        got, want = (catalog.frame("SELECT doc_id, score FROM ranking_scores WHERE ranking = ? ORDER BY doc_id",
                                   [name]) for name in ("sum", "plain"))
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_a_wide_batch_joins_fewer_documents_per_part(planted, tmp_path, monkeypatch):  # noqa: F811
    """A joined part holds at most COMPACT_VALUES scores per column: with room for 1,000, the batch of two
    queries joins at most 500 documents (250 and 350 stay apart, the two parts of 200 are joined), the
    batch of three at most 333 (nothing is joined)."""
    from curator.influence import score_dataset
    from curator.influence.score_dataset import ScoreDataset, part_summaries

    ws, scores = planted
    root = summarised_run(ws, tmp_path, scores, "score-sum")
    monkeypatch.setattr(score_dataset, "COMPACT_VALUES", 1000)
    dataset = ScoreDataset(root)
    manifest = dataset.compact(dataset.read_manifest(), documents_per_part=700, min_parts=2)
    sizes = sorted(s.documents for s in part_summaries([root / name for name in manifest.parts]))
    assert sizes == [200, 200, 250, 250, 350, 350, 400]
    assert_audit_equals_reference(audit(ws, "score-sum"), reference_audit(ws, "score-sum-plain"))


def test_a_query_held_by_parts_of_two_batchings_comes_complete_once(planted, tmp_path, monkeypatch):  # noqa: F811
    """A query held by parts of two batchings (all queries over the first 600 documents, two and two over
    the rest) is handed to the analyses once, after both of its reads have ended, whichever ends last;
    and the audit equals the in-memory one."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from curator.catalog.records import get_run
    from curator.curate.scores import summarised_parts

    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-mixed", rebatched=True)
    wide = scores.pivot(on="doc_id", index="query_id", values="score").sort("query_id")
    doc_ids = np.array(sorted(int(c) for c in wide.columns[1:]))
    want = wide.select([str(d) for d in doc_ids]).to_numpy().astype(np.float32)
    rows = {q: i for i, q in enumerate(wide["query_id"].to_list())}
    with Catalog.open(ws) as catalog:
        run = get_run(catalog, "score-mixed")
    parts = summarised_parts(run)
    read_into = slices_module._read_into
    for slow in (2, len(rows)):                        # the two-query reads end last, then the all-query ones

        def late(matrix, placed, rows_, slow=slow):
            if len(placed[0][0].queries) == slow:
                time.sleep(0.3)
            return read_into(matrix, placed, rows_)

        monkeypatch.setattr(slices_module, "_read_into", late)
        handed = []
        with ThreadPoolExecutor(2) as readers:
            matrix, complete = slices_module._fill_from_parts_by_batch(run, parts, rows, doc_ids, np.float32,
                                                                       readers)
            for positions in complete:
                for row in positions:
                    handed.append(row)
                    np.testing.assert_array_equal(matrix[row], want[row])     # whole when handed over
        assert sorted(handed) == list(range(len(rows)))                        # each row once
    assert_audit_equals_reference(audit(ws, "score-mixed"), reference_audit(ws, "score-mixed-plain"))


def test_a_large_slice_is_a_mapping_of_small_pages_and_behaves_as_an_array(monkeypatch):
    monkeypatch.setattr(slices_module, "LAZY_BYTES", 1)
    mapped = slices_module.empty_slice((3, 1000), np.float32)
    assert isinstance(mapped.base.base.obj, mmap.mmap)          # array ← frombuffer's array ← memoryview ← mmap
    assert mapped.shape == (3, 1000) and mapped.dtype == np.float32 and mapped.flags.writeable
    mapped[:] = np.arange(3000, dtype=np.float32).reshape(3, 1000)
    assert mapped[2, 999] == 2999 and np.sort(mapped[1])[0] == 1000
    assert isinstance(slices_module.empty_slice((0, 5), np.float32), np.ndarray)   # empty: plain numpy


def test_cumulative_shares_from_scores_sorted_per_source_equal_the_plain_sums():
    rng = np.random.default_rng(5)
    for row in (rng.integers(-3, 4, 400).astype(np.float32), rng.normal(size=1001).astype(np.float32),
                np.zeros(50, dtype=np.float32), -np.ones(30, dtype=np.float32), np.ones(7, dtype=np.float32)):
        want = analyses.cumulative_positive(row.astype(np.float64), analyses.PERCENTS)
        ranked = analyses.RankedScores(row, analyses.SourceSplit(np.arange(len(row)) % 3, 3))
        assert analyses.cumulative_positive_ranked(ranked, analyses.PERCENTS) == pytest.approx(want, rel=1e-12)


def test_an_audit_of_parts_missing_a_document_is_one_clear_error(planted, tmp_path):  # noqa: F811
    """The slices are checked from the parts' documents before they are filled (no NaN fill)."""
    from curator.errors import CuratorError

    from curator.influence.score_dataset import ScoreDataset

    ws, scores = planted
    root = summarised_run(ws, tmp_path, scores, "score-sum")
    lost = next(root.glob("b0-601-*.parquet"))            # documents 601, 603, … of the first 2 queries
    lost.unlink()
    with pytest.raises(CuratorError, match=f"{lost.name}"):            # listed by the manifest, not there
        audit(ws, "score-sum")
    dataset = ScoreDataset(root)
    manifest = dataset.read_manifest()
    dataset.write_manifest(manifest.model_copy(update={"parts": [p for p in manifest.parts if p != lost.name]}))
    with pytest.raises(CuratorError, match="not a full query × document table"):
        audit(ws, "score-sum")
    from curator.audit.slices import _check_covered
    from curator.catalog.records import get_run
    from curator.influence.score_dataset import part_summaries

    parts = part_summaries(sorted(root.glob("*.parquet")))
    rows = {q: i for i, q in enumerate(sorted(scores["query_id"].unique()))}
    placed = [(p, p.doc_ids() - 1, None) for p in parts]
    with Catalog.open(ws) as catalog, pytest.raises(CuratorError, match="document 601 has 3 scores for 5 queries"):
        _check_covered(get_run(catalog, "score-sum"), placed, rows, 1000, np.arange(1, 1001))
    # Parts of consecutive documents are checked as ranges: they must tile the slice.
    part = parts[0]
    mine = {q: i for i, q in enumerate(part.queries)}
    with Catalog.open(ws) as catalog:
        run = get_run(catalog, "score-sum")
        _check_covered(run, [(part, slice(0, 500), None), (part, slice(500, 1000), None)], mine, 1000,
                       np.arange(1, 1001))
        with pytest.raises(CuratorError, match=f"document 501 has {2 * len(mine)} scores"):      # overlap
            _check_covered(run, [(part, slice(0, 600), None), (part, slice(500, 1000), None)], mine, 1000,
                           np.arange(1, 1001))
        with pytest.raises(CuratorError, match="document 401 has 0 scores"):                      # gap
            _check_covered(run, [(part, slice(0, 400), None), (part, slice(500, 1000), None)], mine, 1000,
                           np.arange(1, 1001))


def test_an_audit_of_documents_the_catalog_no_longer_holds_names_one(planted, tmp_path):  # noqa: F811
    from curator.errors import CuratorError

    ws, scores = planted
    summarised_run(ws, tmp_path, scores, "score-sum")
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("DELETE FROM document_rows WHERE id = 601")
    with pytest.raises(CuratorError, match="scored document 601, which the catalog no longer holds"):
        audit(ws, "score-sum")
