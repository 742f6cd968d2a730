"""Ranking, mixtures and export on constructed score tables with known answers."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import plant_run, run_ingest, write_jsonl

from curator.catalog.database import Catalog
from curator.catalog.records import store_token_counts
from curator.errors import CuratorError
from curator.curate.export import ExportSpec, export, sha256
from curator.curate.mix import (MixSpec, mix, mixture_report, mixture_weights, mixtures_table, parse_quota,
                                 read_weights, save_weights, source_table)
from curator.catalog.queries import Query, store_queries
from curator.curate import rank as rank_module
from curator.curate.rank import RankConfig, aggregate_sql, normalized_values, rank, ranked_documents

TOKENIZER = "tok-test"
SOURCES = {"code": 30, "math": 20, "web": 50}      # documents per source


@pytest.fixture
def corpus(ws, tmp_path):
    """100 documents in three sources; doc i has 10 + i tokens; scores planted per query."""
    records = [{"text": f"{source} document {i} " + "x" * i, "id": f"{source}-{i}"}
               for source, n in SOURCES.items() for i in range(n)]
    for source in SOURCES:
        write_jsonl(tmp_path / f"{source}.jsonl", [r for r in records if r["id"].startswith(source + "-")])
        run_ingest(ws, [tmp_path / f"{source}.jsonl"], source=source)
    with Catalog.open(ws, write=True) as catalog:
        docs = catalog.sql("SELECT id, source FROM documents ORDER BY id")
        store_token_counts(catalog, TOKENIZER, {doc_id: 10 + doc_id for doc_id, _ in docs})
        store_queries(catalog, [Query(id=f"{t}-{i}", task=t, prompt="p", completion="c")
                                for t in ("arithmetic", "slope", "factual") for i in range(2)])
    rng = np.random.default_rng(0)
    rows = []
    for qid in ("arithmetic-0", "arithmetic-1", "slope-0", "slope-1", "factual-0", "factual-1"):
        scale = 100.0 if qid == "slope-1" else 1.0       # one query on a much larger scale
        for doc_id, source in docs:
            bonus = 2.0 if source == "code" and not qid.startswith("factual") else 0.0
            rows.append({"query_id": qid, "doc_id": doc_id, "score": scale * (bonus + rng.normal())})
    losses = {q: 10.0 + i for i, q in enumerate(sorted({r["query_id"] for r in rows}))}
    plant_run(ws, tmp_path, pl.DataFrame(rows), losses, tokenizer=TOKENIZER)
    return ws, dict(docs), pl.DataFrame(rows), losses


def test_aggregations_equal_direct_numpy():
    import duckdb

    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(3, 6)) * np.array([[1], [10], [100]])     # queries × documents
    matrix[2, 4] = matrix[2, 1]                                          # a tie: rank-vote shares its ranks
    values = pa.table({"query_id": np.repeat(["a", "b", "c"], 6), "doc_id": np.tile(np.arange(6), 3),
                       "value": matrix.reshape(-1)})
    z = (matrix - matrix.mean(axis=1, keepdims=True)) / matrix.std(axis=1, keepdims=True)
    ranks = np.array([rankdata(row) for row in matrix])
    expected = {"mean-z": z.mean(0), "mean": matrix.mean(0), "max": matrix.max(0),
                "rank-vote": ((ranks - 1) / 5).mean(0)}
    con = duckdb.connect()
    con.register("planted", values)
    for name, want in expected.items():
        ranked = pl.from_arrow(con.sql(aggregate_sql(name, "planted")).to_arrow_table())
        got = ranked.sort("doc_id")
        np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-12, err_msg=name)
        order = sorted(range(6), key=lambda d: (-want[d], d))
        assert ranked.sort("rank")["doc_id"].to_list() == order
        assert ranked.sort("rank")["rank"].to_list() == list(range(1, 7))


@pytest.mark.parametrize("aggregate", rank_module.STREAMED)
@pytest.mark.parametrize("normalize", ["raw", "per-nat", "per-token"])
def test_streamed_rankings_equal_the_sql_grouping(corpus, aggregate, normalize, monkeypatch):
    """The per-document arrays (streamed_ranking) against aggregate_sql's grouping of the same values."""
    from curator.catalog.records import get_run
    from curator.curate.scores import scores_view

    ws, _, _, _ = corpus
    streamed = []
    original = rank_module.streamed_ranking
    monkeypatch.setattr(rank_module, "streamed_ranking", lambda *a, **k: streamed.append(original(*a, **k))
                        or streamed[-1])
    name = f"{aggregate}-{normalize}"
    result = rank(ws, RankConfig(name=name, aggregate=aggregate, normalize=normalize))
    assert streamed == [True]
    with Catalog.open(ws) as catalog:
        stored = catalog.frame("SELECT doc_id, score, rank FROM ranking_scores WHERE ranking = ? ORDER BY rank", [name])
        scores_view(catalog, get_run(catalog, result.run_id))
        values = normalized_values(catalog, result.query_ids, normalize, TOKENIZER)
        want = catalog.frame(f"SELECT * FROM ({aggregate_sql(aggregate, values)}) ORDER BY rank")
    assert stored["doc_id"].to_list() == want["doc_id"].to_list()
    assert stored["rank"].to_list() == want["rank"].to_list()
    np.testing.assert_allclose(stored["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-9, atol=1e-12)


def rankdata(row):
    """Average ranks (1 = smallest), ties sharing the mean of their positions: a plain loop."""
    return np.array([1 + sum(v < x for v in row) + (sum(v == x for v in row) - 1) / 2 for x in row])


def test_rank_selects_tasks_normalises_and_stores(corpus):
    ws, docs, scores, losses = corpus
    result = rank(ws, RankConfig(name="r", tasks=["arithmetic", "slope"], aggregate="mean", normalize="per-token"))
    assert result.query_ids == ["arithmetic-0", "arithmetic-1", "slope-0", "slope-1"]
    with Catalog.open(ws) as catalog:
        stored = catalog.frame("SELECT doc_id, score, rank FROM ranking_scores WHERE ranking = 'r' ORDER BY doc_id")
    reasoning = scores.filter(pl.col("query_id").is_in(result.query_ids))
    want = (reasoning.with_columns((pl.col("score") / pl.col("query_id").replace_strict(losses)
                                    / (10 + pl.col("doc_id"))).alias("v"))
            .group_by("doc_id").agg(pl.col("v").mean()).sort("doc_id"))
    np.testing.assert_allclose(stored["score"].to_numpy(), want["v"].to_numpy(), rtol=1e-5)
    with pytest.raises(CuratorError, match="exists"):
        rank(ws, RankConfig(name="r"))
    with pytest.raises(CuratorError, match="no query of the tasks linear"):
        rank(ws, RankConfig(name="r2", tasks=["linear"]))


def test_mean_z_lets_code_win_despite_one_loud_query(corpus):
    ws, docs, _, _ = corpus
    rank(ws, RankConfig(name="z", aggregate="mean-z", normalize="raw"))
    with Catalog.open(ws) as catalog:
        top = catalog.sql("SELECT d.source FROM ranking_scores r JOIN documents d ON d.id = r.doc_id "
                          "WHERE ranking = 'z' ORDER BY rank LIMIT 20")
    assert sum(s == "code" for (s,) in top) >= 17


def shares(ws, name):
    with Catalog.open(ws) as catalog:
        rows = catalog.sql("SELECT d.source, sum(m.tokens) FROM mixture_docs m JOIN documents d ON d.id = m.doc_id "
                           "WHERE m.mixture = ? GROUP BY d.source", [name])
        total = catalog.one("SELECT tokens FROM mixtures WHERE name = ?", [name])[0]
        ids = [r[0] for r in catalog.sql("SELECT doc_id FROM mixture_docs WHERE mixture = ?", [name])]
    assert len(ids) == len(set(ids))
    return {s: t / total for s, t in rows}, total


@pytest.mark.parametrize("strategy", ["top", "sample", "threshold"])
def test_quotas_and_budget_are_met(corpus, strategy):
    ws, *_ = corpus
    rank(ws, RankConfig(name="r"))
    budget = 2000
    spec = MixSpec(name=f"m-{strategy}", ranking="r", budget_tokens=budget, strategy=strategy, seed=3,
                   min_score=-10 if strategy == "threshold" else None,
                   quotas=[parse_quota("web=0.2:0.4"), parse_quota("code=:40%")])
    result = mix(ws, spec)
    got, total = shares(ws, spec.name)
    assert total == result.tokens <= budget
    with Catalog.open(ws) as catalog:      # within one document: no document left out would still fit
        smallest_left = catalog.one(
            "SELECT min(10 + r.doc_id) FROM ranking_scores r WHERE r.ranking = 'r' AND r.doc_id NOT IN "
            "(SELECT doc_id FROM mixture_docs WHERE mixture = ?)", [spec.name])[0]
    assert 0 <= budget - total < smallest_left
    # Shares are of the budget (a mixture a document short of it may hold a source at 40.02% of its total).
    assert 0.2 * budget <= got["web"] * total <= 0.4 * budget + 1e-6 and got["code"] * total <= 0.4 * budget + 1e-6
    assert result.per_source["web"]["tokens"] == round(got["web"] * total)


def test_top_takes_the_best_documents_and_seeds_reproduce(corpus):
    ws, *_ = corpus
    rank(ws, RankConfig(name="r"))
    mix(ws, MixSpec(name="top", ranking="r", budget_tokens=500))
    with Catalog.open(ws) as catalog:
        chosen = catalog.sql("SELECT doc_id FROM mixture_docs WHERE mixture = 'top' ORDER BY position")
        best = catalog.sql("SELECT doc_id FROM ranking_scores WHERE ranking = 'r' ORDER BY rank LIMIT ?",
                           [len(chosen)])
    assert chosen[:-1] == best[:len(chosen) - 1]
    a = mix(ws, MixSpec(name="s1", ranking="r", budget_tokens=800, strategy="sample", seed=7))
    b = mix(ws, MixSpec(name="s2", ranking="r", budget_tokens=800, strategy="sample", seed=7))
    c = mix(ws, MixSpec(name="s3", ranking="r", budget_tokens=800, strategy="sample", seed=8))
    with Catalog.open(ws) as catalog:
        picks = {n: catalog.sql("SELECT doc_id FROM mixture_docs WHERE mixture = ? ORDER BY position", [n])
                 for n in ("s1", "s2", "s3")}
    assert picks["s1"] == picks["s2"] != picks["s3"] and a.tokens == b.tokens
    assert c.tokens <= 800


@pytest.mark.parametrize("quotas, message", [
    (["math=0.9:1"], r"quota math=0.9:1 cannot be met: it needs 1,800 tokens .* hold only"),
    (["web=0.6:", "code=0.6:"], "add up to more than 100%"),
    (["code=:0.1", "math=:0.1", "web=:0.1"], r"cannot be met: .* allow at most 600 tokens \(code: 200 \(max 10%\)"),
    (["poetry=0.1:"], "no ranked documents: poetry"),
])
def test_impossible_quotas_are_clear_errors(corpus, quotas, message):
    ws, *_ = corpus
    rank(ws, RankConfig(name="r"))
    with pytest.raises(CuratorError, match=message):
        mix(ws, MixSpec(name="bad", ranking="r", budget_tokens=2000, quotas=[parse_quota(q) for q in quotas]))
    with Catalog.open(ws) as catalog:
        assert catalog.sql("SELECT count(*) FROM mixtures") == [(0,)]


def test_bad_quota_text_and_oversized_budget(corpus):
    ws, *_ = corpus
    rank(ws, RankConfig(name="r"))
    for text in ("web", "web=0.5:0.2", "web=2:"):
        with pytest.raises(CuratorError, match="--quota"):
            parse_quota(text)
    with pytest.raises(CuratorError, match="all candidates together hold only"):
        mix(ws, MixSpec(name="huge", ranking="r", budget_tokens=10**9))


def test_mix_weights_propose_shares_that_mix_can_use(corpus, tmp_path):
    ws, *_ = corpus
    rank(ws, RankConfig(name="r"))
    weights = mixture_weights(ws, "r")
    by_source = dict(zip(weights["source"], weights["weight"], strict=True))
    assert by_source["code"] == max(by_source.values()) and sum(by_source.values()) == pytest.approx(1)
    path = tmp_path / "w.json"
    assert save_weights(path, "r", weights) == by_source
    assert json.loads(path.read_text()) == {"ranking": "r", "weights": by_source}
    assert read_weights(path) == pytest.approx(by_source)
    result = mix(ws, MixSpec(name="weighted", ranking="r", budget_tokens=600, weights=read_weights(path)))
    for source, share in by_source.items():
        assert result.per_source[source]["tokens"] <= share * 600 + 1e-6
    assert result.tokens > 600 - 2 * 40       # whole documents: short of each share by less than one
    with pytest.raises(CuratorError, match=r"allow at most 805 tokens \(code: 765 \(all it has\)"):
        mix(ws, MixSpec(name="too-big", ranking="r", budget_tokens=1500, weights=read_weights(path)))


# -- export round trips ----------------------------------------------------------------

def read_megatron(prefix):
    """A reader written from Megatron's published .idx/.bin layout (not from curator's writer)."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    code, = struct.unpack_from("<B", raw, 17)
    n_seq, n_docs = struct.unpack_from("<QQ", raw, 18)
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
             8: np.uint16}[code]
    offset = 34
    sizes = np.frombuffer(raw, np.int32, n_seq, offset)
    pointers = np.frombuffer(raw, np.int64, n_seq, offset + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_docs, offset + 12 * n_seq)
    data = open(f"{prefix}.bin", "rb").read()
    sequences = [np.frombuffer(data, dtype, size, pointer).tolist() for size, pointer in zip(sizes, pointers)]
    return version, doc_idx.tolist(), sequences


def check_manifest(out):
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        for name, digest in shard["sha256"].items():
            assert sha256(out / name) == digest
    return manifest


@pytest.fixture
def mixture(corpus):
    ws, docs, _, _ = corpus
    rank(ws, RankConfig(name="r"))
    mix(ws, MixSpec(name="m", ranking="r", budget_tokens=1500, quotas=[parse_quota("web=0.3:")]))
    with Catalog.open(ws) as catalog:
        expected = catalog.sql("SELECT m.doc_id, d.text, d.source FROM mixture_docs m JOIN documents d "
                               "ON d.id = m.doc_id WHERE mixture = 'm' ORDER BY position")
    return ws, expected


def test_parquet_export_round_trips(mixture, tmp_path):
    ws, expected = mixture
    result = export(ws, ExportSpec(mixture="m", format="parquet", out=tmp_path / "pq", shard_tokens=400))
    out = tmp_path / "pq"
    manifest = check_manifest(out)
    assert len(manifest["shards"]) > 1 and manifest["mixture"]["name"] == "m"
    rows = [r for shard in manifest["shards"] for r in pq.read_table(out / shard["files"][0]).to_pylist()]
    assert [(r["id"], r["text"], r["source"]) for r in rows] == expected
    assert set(rows[0]) == {"id", "text", "source", "score", "metadata"}
    assert manifest["documents"] == len(expected) == len({r["id"] for r in rows})
    assert result.manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert not (tmp_path / "pq.part").exists()
    with pytest.raises(CuratorError, match="exists"):
        export(ws, ExportSpec(mixture="m", format="parquet", out=out))


def test_jsonl_zst_export_round_trips(mixture, tmp_path):
    ws, expected = mixture
    export(ws, ExportSpec(mixture="m", format="jsonl.zst", out=tmp_path / "js", shard_bytes=500))
    manifest = check_manifest(tmp_path / "js")
    rows = []
    for shard in manifest["shards"]:
        data = zstandard.ZstdDecompressor().stream_reader(open(tmp_path / "js" / shard["files"][0], "rb")).read()
        rows.extend(json.loads(line) for line in data.decode().splitlines())
    assert [(r["id"], r["text"], r["source"]) for r in rows] == expected


def test_megatron_export_round_trips(mixture, tmp_path):
    from tinylm import save_tiny, tiny_tokenizer

    ws, expected = mixture
    model_dir = save_tiny(tmp_path / "tiny")
    export(ws, ExportSpec(mixture="m", format="megatron", out=tmp_path / "mg", tokenizer=str(model_dir),
                          shard_tokens=300))
    manifest = check_manifest(tmp_path / "mg")
    tokenizer = tiny_tokenizer()
    decoded = []
    for shard in manifest["shards"]:
        prefix = tmp_path / "mg" / shard["files"][0].removesuffix(".bin")
        version, doc_idx, sequences = read_megatron(prefix)
        assert version == 1 and doc_idx == list(range(len(sequences) + 1))
        assert sum(len(s) for s in sequences) == shard["tokens"]
        for ids in sequences:
            assert ids[-1] == tokenizer.eos_token_id
            decoded.append(tokenizer.decode(ids[:-1]))
    assert decoded == [text for _, text, _ in expected]


def test_the_tables_the_cli_prints_and_export_progress(mixture, tmp_path):
    ws, expected = mixture
    calls = []
    export(ws, ExportSpec(mixture="m", out=tmp_path / "pq"), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, len(expected)) for done in range(1, len(expected) + 1)]
    result, table = mixture_report(ws, "m")
    assert (result.documents, result.tokens) == (len(expected), table["tokens"].sum())
    assert table["source"].to_list() == sorted(SOURCES) and table["documents"].sum() == len(expected)
    assert source_table(ws, result).equals(table)
    listed = mixtures_table(ws)
    assert listed.select("name", "ranking", "strategy", "documents", "budget").rows() == [
        ("m", "r", "top", len(expected), 1500)]
    top, bottom = ranked_documents(ws, "r", 3), ranked_documents(ws, "r", 3, bottom=True)
    assert top["rank"].to_list() == [1, 2, 3] and bottom["rank"].to_list() == [100, 99, 98]
    assert top.columns == ["rank", "doc_id", "source", "kind", "score", "snippet"]
    with pytest.raises(CuratorError, match="no mixture named 'nope' .mixtures: m."):
        mixture_report(ws, "nope")
    with pytest.raises(CuratorError, match="no ranking named 'nope' .rankings: r."):
        ranked_documents(ws, "nope", 3)


def test_an_interrupted_export_leaves_nothing_that_looks_complete(mixture, tmp_path):
    ws, _ = mixture

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(ws, ExportSpec(mixture="m", format="parquet", out=tmp_path / "cut"), progress=stop)
    assert not (tmp_path / "cut").exists()
    assert not (tmp_path / "cut.part" / "manifest.json").exists()


# -- the fill, a batch of rows at a time, against the rule one row at a time ------------------------

def fill_one_by_one(rows, sources, budget, maximum, needs):
    """The rule of curator/curate/mix.py's docstring, one candidate at a time: each minimum share from its
    source's rows in order, then the rest of the budget; returns the doc ids taken in order, and the
    smallest document left out of the last pass (None when the budget was met)."""
    taken, order, total, per_source = set(), [], 0, dict.fromkeys(sources, 0)

    def admit(doc, source, tokens):
        nonlocal total
        if doc in taken or total + tokens > budget or per_source[source] + tokens > maximum.get(source, budget):
            return False
        taken.add(doc)
        order.append(doc)
        per_source[source] += tokens
        total += tokens
        return True

    for source, need in needs.items():
        for doc, src, tokens in rows:
            if src == source:
                if per_source[source] >= need:
                    break
                admit(doc, src, tokens)
    share_picks, smallest = set(taken), None
    for doc, src, tokens in rows:
        if total == budget:
            return order, None
        if not admit(doc, src, tokens) and doc not in share_picks:
            smallest = tokens if smallest is None else min(smallest, tokens)
    return order, (None if total == budget else smallest)


class Collect:
    def __init__(self):
        self.tables = []

    def write_table(self, table):
        self.tables.append(table)


@pytest.mark.parametrize("seed", range(12))
def test_the_batched_fill_takes_what_one_row_at_a_time_takes(seed):
    from curator.curate.mix import Fill, Quota, fill

    rng = np.random.default_rng(seed)
    sources = ["code", "math", "web", "wiki"][:rng.integers(1, 5)]
    n = int(rng.integers(50, 3000))
    doc = rng.permutation(n).astype(np.int64) + 1
    code = rng.integers(0, len(sources), n)
    tokens = rng.integers(1, [5, 60, 400][seed % 3], n).astype(np.int64)
    available = {s: int(tokens[code == i].sum()) for i, s in enumerate(sources)}
    budget = int(tokens.sum() * rng.uniform(0.05, 1.1)) + 1
    maximum = {s: int(budget * rng.uniform(0.1, 1.0)) for s in sources if rng.random() < 0.6}
    quotas = {s: Quota(source=s, min=min(available[s], maximum.get(s, budget)) / budget * rng.uniform(0, 0.8))
              for s in sources if rng.random() < 0.5}
    needs = {s: math.ceil(q.min * budget) for s, q in quotas.items()}      # as `fill` reads a minimum share
    want, smallest = fill_one_by_one(list(zip(doc.tolist(), [sources[c] for c in code], tokens.tolist(),
                                              strict=True)), sources, budget, maximum, needs)

    def ordered(source):           # small batches, so that rows are decided across batch boundaries
        keep = np.flatnonzero(code == sources.index(source)) if source else np.arange(n)
        for start in range(0, len(keep), 97):
            at = keep[start:start + 97]
            yield doc[at], code[at], tokens[at], tokens[at].astype(np.float64)

    state = Fill(budget=budget, sources=sources, maximum=maximum, out=Collect())
    try:
        fill(ordered, state, quotas, available, int(tokens.min()))
    except CuratorError:
        pass                         # a budget the rule cannot meet: the rows taken still compare
    state.flush()
    got = np.concatenate([t["doc_id"].to_numpy() for t in state.out.tables]).tolist() if state.out.tables else []
    assert got == want
    assert state.total == sum(int(tokens[doc == d][0]) for d in want)
    if state.total != budget:
        assert state.left_smallest == smallest


def test_membership_of_taken_ids_by_table_and_by_search_equals_isin(monkeypatch):
    from curator.curate import mix as mix_module

    rng = np.random.default_rng(2)
    for taken, ids in ((np.unique(rng.integers(1, 5000, 800)), rng.integers(0, 5200, 3000)),
                       (np.array([7]), np.array([6, 7, 8])), (np.zeros(0, dtype=np.int64), np.array([1, 2])),
                       (np.array([3, 9]), np.zeros(0, dtype=np.int64))):
        want = np.isin(ids, taken)
        assert mix_module._member(ids, taken).tolist() == want.tolist()                 # by table
        monkeypatch.setattr(mix_module, "TABLE_SPAN", 1)
        assert mix_module._member(ids, taken).tolist() == want.tolist()                 # by search
        monkeypatch.undo()
