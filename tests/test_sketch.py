"""Sketch stores and FAISS search on a tiny model."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, loaded_tiny

from curator.catalog.database import Catalog
from curator.influence.fit import FitConfig, fit
from curator.catalog.queries import Query, store_queries
from curator.influence.score import ScoreConfig, score
from curator.sketch.index import build_index, open_index, top_and_bottom
from curator.sketch.scoring import blocked_scores, sketch_score
from curator.sketch.build import sketch, sketch_queries
from curator.sketch.bases import allocate_ranks
from curator.sketch.store import SketchConfig, iter_shards
from curator.errors import CuratorError
from curator.catalog.database import create_workspace
from curator.catalog.records import score_files

DOCS = TRAINING_TEXT + [t[::-1] for t in TRAINING_TEXT] + ["x = 1", "y = x * 2", "print(y)", "(3 + 4) * 2 = 14"]
SUITE = [Query(id=f"s{i}", task="arithmetic", prompt=f"Calculate the answer: ({i} + 3) * 2",
               completion=f"{i + 3} * 2 = {2 * (i + 3)}.") for i in range(4)]
HELD_OUT = [Query(id="h0", task="arithmetic", prompt="Calculate the answer: (9 + 1) * 3", completion="10 * 3 = 30.")]


class StopAfterShards:
    def __init__(self, shards=None):
        self.shards, self.done = shards, 0

    def stage(self, description, total_docs):
        pass

    def advance(self, docs, tokens):
        if docs:
            self.done += 1
            if self.shards is not None and self.done >= self.shards:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sketch")
    ws, _ = create_workspace(root / "ws")
    write_jsonl(root / "docs.jsonl", [{"text": t} for t in DOCS])
    run_ingest(ws, [root / "docs.jsonl"])
    lm = loaded_tiny(seed=5, bias=True)
    fit(ws, FitConfig(model="tiny", max_seq_len=24, batch_tokens=96), loaded=lm)
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, SUITE + HELD_OUT)
    exact = score(ws, ScoreConfig(queries="s0,s1,s2,s3,h0", batch_tokens=96), loaded=lm)
    return ws, lm, exact


@pytest.mark.parametrize("method", ["query-subspace", "whitened-subspace", "mixed"])
def test_full_rank_sketch_scores_equal_exact_scores_for_suite_queries(setup, method):
    ws, lm, exact = setup
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", method=method, rank=64, precision="float32", shard_docs=5,
                                    batch_tokens=96), loaded=lm)
    assert store.complete and store.documents == len(DOCS) and len(store.shards) == 4
    result = sketch_score(ws, ScoreConfig(method="sketch", queries="s0,s1,s2,s3", store=store.id), loaded=lm)
    a = pl.read_parquet(score_files(exact.out_path)).filter(pl.col("query_id").str.starts_with("s")).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])
    assert a.select("query_id", "doc_id").equals(b.select("query_id", "doc_id"))
    scale = float(a["score"].abs().max())
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(b["score_per_nat"].to_numpy(), a["score_per_nat"].to_numpy(), rtol=1e-3,
                               atol=1e-4 * float(a["score_per_nat"].abs().max()))


def test_a_truncated_subspace_is_not_exact_but_keeps_the_ranking_for_suite_queries(setup):
    ws, lm, exact = setup
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", rank=2, precision="float32"), loaded=lm)
    assert all(k == [2, 2] for k in store.ranks.values()) and store.dim == 4 * len(store.ranks)
    vectors, _ = sketch_queries(ws, store, lm, SUITE)
    _, approx = blocked_scores(ws, store, vectors)
    a = pl.read_parquet(score_files(exact.out_path)).filter(pl.col("query_id") == "s0").sort("doc_id")["score"].to_numpy()
    assert not np.allclose(approx[:, 0], a, rtol=1e-3)
    assert np.corrcoef(approx[:, 0], a)[0, 1] > 0.5


def test_bases_are_deterministic_and_shared_by_documents_and_queries(setup, tmp_path):
    ws, lm, _ = setup
    for method in ("query-subspace", "random", "eigen"):
        config = SketchConfig(suite="s0,s1", method=method, rank=3, seed=1)
        first = sketch(ws, config, loaded=lm)
        vectors = np.concatenate([v for _, v in iter_shards(ws, first)])
        shutil.rmtree(ws.root / "sketches" / first.id)
        again = sketch(ws, config, loaded=lm)
        assert again.id == first.id and again.ranks == first.ranks
        np.testing.assert_array_equal(np.concatenate([v for _, v in iter_shards(ws, again)]), vectors)
    a = sketch(ws, SketchConfig(suite="s0,s1", method="random", rank=3, seed=1), loaded=lm)
    b = sketch(ws, SketchConfig(suite="s0,s1", method="random", rank=3, seed=2), loaded=lm)
    assert a.id != b.id
    assert not np.array_equal(next(iter_shards(ws, a))[1], next(iter_shards(ws, b))[1])


def test_budget_bytes_spreads_rank_by_query_energy(setup):
    ws, lm, _ = setup
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", budget_bytes=400, budget_split="energy",
                                    precision="float16"), loaded=lm)
    assert store.bytes_per_doc <= 400 and len({tuple(k) for k in store.ranks.values()}) > 1


def test_budget_bytes_gives_every_layer_the_same_rank_by_default(setup):
    ws, lm, _ = setup
    # 392 bytes: no energy-split store of these settings exists in the shared workspace (see below).
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", budget_bytes=392, precision="float16"), loaded=lm)
    assert store.bytes_per_doc <= 392 and len({tuple(k) for k in store.ranks.values()}) == 1
    assert store.settings["budget_split"] == "uniform"
    k = store.ranks[store.modules[0]][0]
    # The largest k that fits: one more on every layer would pass the budget.
    assert 2 * len(store.modules) * (k + 1) ** 2 > 392


def test_the_same_command_extends_a_store_built_with_the_old_energy_split(setup):
    """A store built by `--budget-bytes` before the uniform split was the default (energy, and no split in
    its settings) is what the same command, without --budget-split, finds and extends; asking for uniform
    builds another. Its rebuild command names the energy split."""
    from curator.sketch.store import rebuild_command

    ws, lm, _ = setup
    old = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", budget_bytes=424, budget_split="energy"), loaded=lm)
    again = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", budget_bytes=424), loaded=lm)
    assert again.id == old.id and again.settings["budget_split"] == "energy"
    uniform = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", budget_bytes=424, budget_split="uniform"), loaded=lm)
    assert uniform.id != old.id
    before_the_setting = old.model_copy(update={"settings": {k: v for k, v in old.settings.items()
                                                             if k != "budget_split"}})
    assert "--budget-split energy" in rebuild_command(before_the_setting)


def test_uniform_split_caps_small_layers_and_fills_the_budget_with_the_rest():
    shapes = {"small": (3, 2), "wide": (40, 50), "tall": (60, 30)}
    ranks = allocate_ranks({}, shapes, None, 2 * 1000, 2, "uniform")
    assert ranks == {"small": [3, 2], "wide": [22, 22], "tall": [22, 22]}     # 6 + 2·22² = 974 ≤ 1,000 < 6 + 2·23²
    with pytest.raises(CuratorError, match="too small"):
        allocate_ranks({}, shapes, None, 4, 2, "uniform")
    with pytest.raises(CuratorError, match="no budget split"):
        allocate_ranks({}, shapes, None, 2000, 2, "by-hand")


def test_budget_split_is_part_of_a_budgeted_stores_identity_only():
    ranked = SketchConfig(suite="s0", rank=3)
    assert ranked.identity() == ranked.model_copy(update={"budget_split": "energy"}).identity()
    budgeted = SketchConfig(suite="s0", budget_bytes=400)
    energy = budgeted.model_copy(update={"budget_split": "energy"})
    assert budgeted.identity() != energy.identity()
    assert budgeted.identity() == budgeted.model_copy(update={"budget_split": "uniform"}).identity()   # unset
    # An energy split is what budgeted stores were before the setting existed: their ids stay.
    assert "budget_split" not in energy.identity()


def test_a_killed_sketch_run_resumes_to_the_same_store(setup):
    ws, lm, _ = setup
    config = SketchConfig(suite="s0,s1,s2", rank=4, shard_docs=4)
    with pytest.raises(KeyboardInterrupt):
        sketch(ws, config, loaded=lm, progress=StopAfterShards(shards=2))
    counter = StopAfterShards()
    resumed = sketch(ws, config, loaded=lm, progress=counter)
    assert resumed.complete and counter.done == 4
    vectors = [v.copy() for _, v in iter_shards(ws, resumed)]
    shutil.rmtree(ws.root / "sketches" / resumed.id)
    fresh = sketch(ws, config, loaded=lm)
    for got, want in zip([v for _, v in iter_shards(ws, fresh)], vectors, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not list((ws.root / "sketches" / fresh.id).glob("*.part"))
    # Each run records its own work: the resumed one two shards and no bases, the fresh one everything.
    assert 0 < resumed.tokens < fresh.tokens and "bases" not in resumed.seconds
    assert fresh.seconds["bases"] > 0 and fresh.seconds["documents"] > 0


def test_flat_search_returns_the_blocked_products_top_and_bottom(setup):
    ws, lm, _ = setup
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", rank=3, precision="float32", shard_docs=6), loaded=lm)
    built = build_index(ws, store.id, "Flat")
    assert built["rows"] == len(DOCS)
    index, doc_ids, store_id = open_index(ws, built["name"])
    assert store_id == store.id
    vectors, _ = sketch_queries(ws, store, lm, SUITE + HELD_OUT)
    ids, products = blocked_scores(ws, store, vectors)
    for column, found in enumerate(top_and_bottom(index, doc_ids, vectors, top=5, bottom=3)):
        order = np.argsort(-products[:, column], kind="stable")
        assert [d for d, _ in found["top"]] == ids[order[:5]].tolist()
        assert [d for d, _ in found["bottom"]] == ids[order[::-1][:3]].tolist()
        np.testing.assert_allclose([s for _, s in found["top"]], products[order[:5], column], rtol=1e-5)


def test_ranking_agreement_on_known_vectors():
    from curator.sketch.fidelity import ranking_agreement

    exact = np.arange(1000, dtype=float)      # 1% of 1,000 = the top 10
    same = ranking_agreement(exact, exact * 3 + 1)
    assert same["pearson"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    assert same["top10_overlap"] == same["top100_overlap"] == same["top10_recall_at_1pct"] == 1.0
    reversed_ = ranking_agreement(exact, -exact)
    assert reversed_["spearman"] == pytest.approx(-1) and reversed_["top10_recall_at_5pct"] == 0.0
    shifted = exact.copy()
    shifted[990:] = -1          # the exact top 10 fall to the bottom
    assert ranking_agreement(exact, shifted)["top10_overlap"] == 0.0


def test_fidelity_reuses_a_stored_exact_run_and_agrees_with_scoring_afresh(setup):
    from curator.sketch.fidelity import fidelity

    ws, lm, exact = setup
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", rank=3, precision="float32"), loaded=lm)
    reused = fidelity(ws, store, lm, HELD_OUT, sample=len(DOCS))
    assert reused["reference"] == f"run {exact.run_id}"
    # A run at another window length is not the same reference: the check scores afresh.
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("UPDATE runs SET settings = json_merge_patch(settings, '{\"max_seq_len\": 16}') WHERE id = ?",
                    [exact.run_id])
    try:
        fresh = fidelity(ws, store, lm, HELD_OUT, sample=len(DOCS))
    finally:
        with Catalog.open(ws, write=True) as catalog:
            catalog.sql("UPDATE runs SET settings = json_merge_patch(settings, '{\"max_seq_len\": null}') "
                        "WHERE id = ?", [exact.run_id])
    assert fresh["reference"] == "scored for this check"
    for key, value in reused["mean"].items():
        assert fresh["mean"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("method", ["query-subspace", "whitened-subspace", "mixed", "eigen", "random"])
def test_bases_are_nested_so_a_smaller_rank_is_a_block_of_a_larger_store(setup, method):
    """benchmarks/sketch_fidelity.py reads every rank of its curve from one store; this is why it may."""
    ws, lm, _ = setup
    large = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", method=method, rank=6, precision="float32"), loaded=lm)
    small = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", method=method, rank=3, precision="float32"), loaded=lm)
    columns, offset = [], 0
    for name in large.modules:
        k_out, k_in = large.ranks[name]
        columns.append((offset + np.arange(3)[:, None] * k_in + np.arange(3)[None, :]).ravel())
        offset += k_out * k_in
    columns = np.concatenate(columns)
    big = np.concatenate([v for _, v in iter_shards(ws, large)])
    little = np.concatenate([v for _, v in iter_shards(ws, small)])
    q_big, _ = sketch_queries(ws, large, lm, HELD_OUT)
    q_little, _ = sketch_queries(ws, small, lm, HELD_OUT)
    np.testing.assert_allclose(big[:, columns] @ q_big[:, columns].T, little @ q_little.T, rtol=1e-3,
                               atol=1e-5 * float(np.abs(little @ q_little.T).max()))


def test_a_sketch_run_resumed_with_another_shard_size_equals_a_fresh_one(setup):
    """shard_docs does not change the sketches, so a run killed with one shard size and resumed with
    another must give the fresh store's vectors, and never take a shard of one plan for the other's."""
    ws, lm, _ = setup
    config = SketchConfig(suite="s0,s1", rank=3, shard_docs=4, seed=11)
    with pytest.raises(KeyboardInterrupt):
        sketch(ws, config, loaded=lm, progress=StopAfterShards(shards=2))
    resumed = sketch(ws, config.model_copy(update={"shard_docs": 3}), loaded=lm)
    directory = ws.root / "sketches" / resumed.id
    listed = {name for shard in resumed.shards for name in (shard["file"], shard["ids"], shard["scales"])}
    assert {p.name for p in directory.glob("shard-*")} == listed       # the other plan's shards are gone
    resumed_ids, resumed_vectors = [np.concatenate(x) for x in zip(*iter_shards(ws, resumed))]
    got = dict(zip(resumed_ids.tolist(), resumed_vectors, strict=True))
    shutil.rmtree(directory)
    fresh = sketch(ws, config, loaded=lm)
    ids, vectors = [np.concatenate(x) for x in zip(*iter_shards(ws, fresh))]
    assert sorted(got) == sorted(ids.tolist())
    for doc_id, vector in zip(ids.tolist(), vectors, strict=True):
        np.testing.assert_allclose(got[doc_id], vector, rtol=1e-5, atol=1e-6 * np.abs(vectors).max())


def test_a_bfloat16_model_sketches_close_to_float32(setup, tmp_path):
    ws, lm, _ = setup
    from curator.model.loading import wrap_model
    from tinylm import tiny_llama, tiny_tokenizer

    half = wrap_model(tiny_llama(seed=5, bias=True), tiny_tokenizer(), name="tiny-llama-5", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.info.id == lm.info.id
    config = SketchConfig(suite="s0,s1,s2,s3", rank=3, precision="float32")
    wide = np.concatenate([v for _, v in iter_shards(ws, sketch(ws, config, loaded=lm))])
    narrow_store = sketch(ws, config.model_copy(update={"dtype": "bfloat16"}), loaded=half)
    narrow = np.concatenate([v for _, v in iter_shards(ws, narrow_store)])
    assert np.isfinite(narrow).all() and not np.array_equal(narrow, wide)
    assert np.corrcoef(narrow.reshape(-1), wide.reshape(-1))[0, 1] > 0.98
    queries, _ = sketch_queries(ws, narrow_store, half, HELD_OUT)
    assert np.isfinite(queries).all()


def test_fidelity_reports_queries_of_the_suites_family_apart_from_other_formats(setup):
    """Another seed of the suite's own generator says little about what users send: the two are
    reported separately."""
    from curator.catalog.querygen import generate
    from curator.sketch.fidelity import measure_store

    ws, lm, _ = setup
    others = generate("arithmetic", 2, seed=3, family="terse") + generate("arithmetic", 1, seed=3, family="chat")
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, others)
    store = sketch(ws, SketchConfig(suite="s0,s1,s2,s3", rank=3), loaded=lm)
    result = measure_store(ws, store, ",".join(["h0", *(q.id for q in others)]), loaded=lm)
    groups = result["groups"]
    assert groups["same family"]["queries"] == 1 and groups["same family"]["families"] == ["paper"]
    assert groups["cross-format"]["queries"] == 3 and groups["cross-format"]["families"] == ["chat", "terse"]
    spearman = {q: v["spearman"] for q, v in result["per_query"].items()}
    assert groups["same family"]["mean"]["spearman"] == pytest.approx(spearman["h0"])
    assert groups["cross-format"]["mean"]["spearman"] == pytest.approx(np.mean([spearman[q.id] for q in others]))
    from curator.sketch.store import load_store
    assert load_store(ws, store.id).fidelity["groups"]["cross-format"]["queries"] == 3


def test_a_suite_in_several_families_is_measured_on_the_family_it_lacks(setup):
    """docs/sketches.md's recipe: a suite in the paper's format and other families, one family held
    out. Held-out queries of a family the suite holds are "same family"; only the missing one is
    cross-format, so the number `curator search` quotes is for a format the bases never saw."""
    from curator.catalog.querygen import generate
    from curator.sketch.fidelity import measure_store

    ws, lm, _ = setup
    suite = [q for family in ("prose", "code") for q in generate("arithmetic", 2, seed=4, family=family)]
    prose_again = generate("arithmetic", 1, seed=5, family="prose")
    unseen = generate("arithmetic", 2, seed=5, family="chat")
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, suite + prose_again + unseen)
    selector = ",".join(["s0", "s1", "arithmetic-prose-s4", "arithmetic-code-s4"])
    store = sketch(ws, SketchConfig(suite=selector, budget_bytes=400), loaded=lm)
    assert len(store.suite) == 6
    result = measure_store(ws, store, ",".join(["h0", *(q.id for q in prose_again + unseen)]), loaded=lm)
    groups = result["groups"]
    assert groups["same family"]["families"] == ["code", "paper", "prose"] and groups["same family"]["queries"] == 2
    assert groups["cross-format"]["families"] == ["chat"] and groups["cross-format"]["queries"] == 2


# -- mixed bases: the suite's directions interleaved with the documents' own ------------------------

def test_interleave_takes_a_share_of_every_prefix_and_completes_the_space():
    from curator.sketch.bases import interleave

    generator = torch.Generator().manual_seed(3)
    d = 12
    first = torch.linalg.qr(torch.randn(d, 5, generator=generator, dtype=torch.float64))[0]
    second = torch.linalg.qr(torch.randn(d, 4, generator=generator, dtype=torch.float64))[0]
    second[:, 1] = first[:, 0]              # already taken by the time it comes up: skipped
    full = interleave(first, second, d, 0.5)
    np.testing.assert_allclose((full.T @ full).numpy(), np.eye(d), atol=1e-10)      # complete: exact sketches
    for k in range(1, d + 1):
        np.testing.assert_array_equal(interleave(first, second, k, 0.5).numpy(), full[:, :k].numpy())
    # Column 0 is the suite's first, column 1 the documents' first (made orthogonal to it), column 3 is
    # the documents' third because their second was the suite's first.
    np.testing.assert_allclose(full[:, 0].numpy(), first[:, 0].numpy(), atol=1e-12)
    def rank(*columns):
        return np.linalg.matrix_rank(np.column_stack([c.numpy() for c in columns]), tol=1e-8)

    assert rank(full[:, 1], first[:, 0], second[:, 0]) == 2
    assert rank(full[:, 3], *full[:, :3].T, second[:, 2]) == 4 and abs(float(full[:, 3] @ second[:, 2])) > 0.1
    np.testing.assert_allclose(interleave(first, second, 5, 0.0).numpy(), first.numpy(), atol=1e-12)
    np.testing.assert_allclose(interleave(first, second, 4, 1.0)[:, 0].numpy(), second[:, 0].numpy(), atol=1e-12)
    with pytest.raises(Exception, match="between 0 and 1"):
        interleave(first, second, 3, 1.5)


def test_document_grams_equal_brute_force_sums_over_window_gradients(setup):
    """The token-Gram shortcut against whitened per-window gradients formed in full."""
    from curator.catalog.database import Catalog as Cat
    from curator.catalog.documents import document_ids
    from curator.influence.ekfac import sequence_gradients, whitening_scales
    from curator.influence.factors import get_factors, load_layer_factors
    from curator.influence.queries import check_compatible
    from curator.model.document_pass import PassSettings, document_pass
    from curator.sketch.bases import document_grams

    ws, lm, _ = setup
    config = SketchConfig(suite="s0", method="mixed", rank=2, document_sample=7, seed=4, batch_tokens=96)
    with Cat.open(ws) as catalog:
        record = get_factors(catalog, None)
    modules = check_compatible(lm, record, None)
    factors = load_layer_factors(ws, record)
    grams = document_grams(lm, modules, ws, factors, config, record.settings["max_seq_len"])
    with Cat.open(ws) as catalog:
        from curator.catalog.documents import seeded_sample
        sample = seeded_sample(catalog, document_ids(catalog), 7, 4)
    windows: dict[str, list] = {name: [] for name in modules}
    settings = PassSettings(max_len=record.settings["max_seq_len"], batch_tokens=96, chunk_docs=7)

    def keep(name, a, delta, _batch, _output):
        windows[name].append(sequence_gradients(a, delta, torch.float64))

    with Cat.open(ws) as catalog:
        document_pass(lm.model, modules, lm.tokenizer, catalog, sample, settings, keep)
    for name, parts in windows.items():
        f = factors[name]
        d_s, d_a = whitening_scales(f)
        g = torch.cat(parts)
        assert g.shape[0] >= 7
        w = (f.q_s.double().T @ g @ f.q_a.double()) / d_s[:, None] / d_a[None, :]
        w = w - w.mean(dim=0)
        left, right = grams[name]
        np.testing.assert_allclose(left.numpy(), torch.einsum("boi,bpi->op", w, w).numpy(), rtol=1e-6,
                                   atol=1e-9 * float(left.abs().max()))
        np.testing.assert_allclose(right.numpy(), torch.einsum("boi,boj->ij", w, w).numpy(), rtol=1e-6,
                                   atol=1e-9 * float(right.abs().max()))


def test_mixed_identity_leaves_other_methods_ids_alone():
    base = SketchConfig(suite="s0", rank=3)
    assert "document_share" not in base.identity()
    assert base.identity() == base.model_copy(update={"document_share": 0.9}).identity()
    mixed = base.model_copy(update={"method": "mixed"})
    assert mixed.identity() != mixed.model_copy(update={"document_share": 0.9}).identity()
