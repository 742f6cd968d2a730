"""`curator evaluate` on a tiny real model: a real workspace ingested, fitted, scored, ranked and mixed,
then every arm really trained. No mocks: a killed run is stopped by an exception raised at a checkpoint
boundary, and the resumed run is compared with an uninterrupted one."""

from __future__ import annotations

import json
import math
import random

import pytest
from helpers import run_ingest, write_jsonl
from tinylm import tiny_tokenizer

from curator.catalog.database import Catalog, create_workspace
from curator.catalog.queries import store_queries
from curator.catalog.querygen import FAMILIES, generate
from curator.curate.mix import MixSpec, mix
from curator.curate.rank import RankConfig, rank
from curator.errors import CuratorError
from curator.evaluate import measure
from curator.evaluate.arms import fill_tokens, plan_arms
from curator.evaluate.config import EvaluateConfig
from curator.evaluate.heldout import answer_from_prompt, answer_in_completion, heldout_queries
from curator.evaluate.run import evaluate, work_folder
from curator.evaluate.train import Progress
from curator.influence.fit import FitConfig, fit
from curator.influence.score import ScoreConfig, score

# Small enough to train every arm in well under a second: 4 steps of 4 × 32 tokens, two checkpoints.
SMALL = dict(tokens=512, seeds=2, seq_len=32, batch_rows=4, checkpoints=2, eval_per_task=3, max_new_tokens=16,
             heldout_docs=6, lr=3e-3)


def corpus() -> list[dict]:
    """Short documents of two sources: worked arithmetic ('math') and plain prose ('web')."""
    rng = random.Random(7)
    rows = []
    for i in range(40):
        a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
        rows.append({"source": "math", "text": f"Calculate ({a} + {b}) * {c}: first {a} + {b} = {a + b}, "
                                              f"then {a + b} * {c} = {(a + b) * c}."})
    words = "the river runs past a town where people walk by the old bridge in the evening".split()
    for _ in range(40):
        rows.append({"source": "web", "text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + "."})
    return rows


def save_model(folder):
    """tinylm's tiny Llama, with room for the paper's long slope queries (byte-level tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on a shared machine: torch's thread team costs far more than it gives here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, one_thread):
    """A workspace with a ranking ('reasoning', from 2 queries per reasoning task) and two mixtures that
    hold the same documents under different names."""
    root = tmp_path_factory.mktemp("evaluate")
    ws, _ = create_workspace(root / "ws")
    rows = corpus()
    for source in ("math", "web"):
        write_jsonl(root / f"{source}.jsonl", [{"text": r["text"]} for r in rows if r["source"] == source])
        run_ingest(ws, [root / f"{source}.jsonl"], source=source)
    model = str(save_model(root / "tiny"))
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, [q for task in ("arithmetic", "slope", "linear") for q in generate(task, 2, seed=0)])
    fit(ws, FitConfig(model=model, max_seq_len=64, layers="last:1"))
    score(ws, ScoreConfig(queries="arithmetic,slope,linear"))
    rank(ws, RankConfig(name="reasoning"))
    for name in ("top", "twin"):
        mix(ws, MixSpec(name=name, ranking="reasoning", budget_tokens=700))
    return root, ws, model


@pytest.fixture(scope="module")
def finished(mixed):
    """One complete evaluation of both mixtures and all three baselines, two seeds."""
    root, ws, _ = mixed
    config = EvaluateConfig(mixtures=["top", "twin"], keep_final=True, **SMALL)
    return config, evaluate(ws, config)


def test_arms_given_the_same_documents_and_seed_give_identical_checkpoints_and_numbers(mixed, finished):
    from safetensors.torch import load_file

    _, ws, _ = mixed
    config, data = finished
    by = {(r["arm"], r["seed"]): r for r in data["results"]}
    for seed in range(config.seeds):
        top, twin = dict(by["top", seed]), dict(by["twin", seed])
        assert top.pop("arm") == "top" and twin.pop("arm") == "twin"
        top.pop("seconds"), twin.pop("seconds")
        assert top == twin
        folder = work_folder(ws, data["id"])
        a, b = load_file(folder / f"top-s{seed}" / "final.safetensors"), load_file(folder / f"twin-s{seed}" /
                                                                                    "final.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # Training changed the weights, and differently for different documents: the check can fail.
    other = load_file(work_folder(ws, data["id"]) / "random-s0" / "final.safetensors")
    assert any(not a[k].equal(other[k]) for k in a)
    assert by["top", 0]["reasoning_loss"] != by["base", 0]["reasoning_loss"]


def test_every_arm_trains_on_equal_tokens_within_one_document(mixed, finished):
    _, ws, _ = mixed
    config, data = finished
    with Catalog.open(ws) as catalog:
        plan = plan_arms(catalog, config)
        tokens = dict(catalog.sql("SELECT doc_id, tokens FROM token_counts"))
    assert {a.kind for a in plan.arms} == {"mixture", "random", "source-matched", "bottom"}
    assert len(plan.arms) == 5 * config.seeds
    for arm in plan.arms:
        assert sum(tokens[d] for d in arm.doc_ids) == arm.tokens
        assert config.tokens - plan.largest_document < arm.tokens <= config.tokens, arm.label
        assert len(set(arm.doc_ids)) == len(arm.doc_ids)
        assert not set(arm.doc_ids) & set(plan.heldout_doc_ids)
    trained = {(r["arm"], r["seed"]): r["trained_tokens"] for r in data["results"] if r["arm"] != "base"}
    assert set(trained.values()) == {config.steps * config.batch_tokens} and len(trained) == 10
    # Source-matched arms hold the mixture arm's token share per source, to within one document per source.
    with Catalog.open(ws) as catalog:
        source = dict(catalog.sql("SELECT id, source FROM documents"))

    def shares(arm):
        out = {}
        for d in arm.doc_ids:
            out[source[d]] = out.get(source[d], 0) + tokens[d] / arm.tokens
        return out
    mixture_shares = shares(plan.arms[0])
    assert 0.1 < mixture_shares.get("math", 0) < 0.9       # both sources present: the check means something
    for arm in (a for a in plan.arms if a.kind == "source-matched"):
        for name, share in shares(arm).items():
            assert abs(share - mixture_shares.get(name, 0)) <= 2 * plan.largest_document / arm.tokens, name
    # The random baselines differ by seed; the bottom arm is the ranking's worst end.
    random_arms = [a for a in plan.arms if a.kind == "random"]
    assert random_arms[0].doc_ids != random_arms[1].doc_ids
    with Catalog.open(ws) as catalog:
        ranks = dict(catalog.sql("SELECT doc_id, rank FROM ranking_scores WHERE ranking = 'reasoning'"))
    bottom = next(a for a in plan.arms if a.kind == "bottom")
    top = next(a for a in plan.arms if a.kind == "mixture")
    assert min(ranks[d] for d in bottom.doc_ids) > max(ranks[d] for d in top.doc_ids)


def test_fill_stops_within_one_document_and_source_matching_keeps_shares():
    import numpy as np

    from curator.evaluate.arms import seeded_order, seeded_positions, source_matched

    rng = random.Random(3)
    docs = [(i, rng.randint(1, 40)) for i in range(200)]
    tokens = dict(docs)
    for target in (1, 17, 300, 1000):
        ids, total = fill_tokens(docs, target)
        assert total == sum(tokens[i] for i in ids) and target - 40 < total <= target
        # Giving up after a run of documents that did not fit still leaves it within one document.
        ids, total = fill_tokens(docs, target, patience=2)
        assert total == sum(tokens[i] for i in ids) and target - 40 < total <= target
    # The fill draws candidates only as far as it goes (what keeps a catalog-wide draw from counting it all).
    drawn = []
    fill_tokens(((d, t) for d, t in docs if not drawn.append(d)), 100, patience=3)
    assert 3 < len(drawn) < 40
    # The whole-catalog order (numpy, for millions of ids) is `seeded_order`, the readable definition.
    ids = np.array(rng.sample(range(10**6), 500), dtype=np.int64)
    assert ids[seeded_positions(ids, 4, "random")].tolist() == seeded_order(ids.tolist(), 4, "random")
    order = seeded_order(tokens, 0, "source-matched")
    ids, total = source_matched(order, ["a" if i % 3 else "b" for i in order],
                                lambda chosen: ((int(d), tokens[int(d)]) for d in chosen),
                                {"a": 0.25, "b": 0.75}, 1200)
    share_b = sum(t for i, t in docs if i in ids and i % 3 == 0) / total
    assert 1200 - 40 < total <= 1200 and abs(share_b - 0.75) < 40 / 1200


def test_the_random_baselines_draw_from_the_whole_catalog_counting_what_was_never_scored(mixed, tmp_path,
                                                                                         monkeypatch):
    """Documents ingested after the scoring have no token count: the random and source-matched arms can
    still draw them, counted with the ranking's tokenizer as the fill reaches them (and only those), the
    counts are cached when the evaluation starts, and the arms are the same before and after."""
    import shutil

    from transformers import AutoTokenizer

    from curator.catalog.workspace import Workspace
    from curator.evaluate import arms
    from curator.evaluate.run import plan

    _, ws, model = mixed
    copy = Workspace(shutil.copytree(ws.root, tmp_path / "ws", ignore=shutil.ignore_patterns("reports")))
    rng = random.Random(11)
    words = "a quiet field of wheat under grey clouds while the wind turns the mill slowly".split()
    write_jsonl(tmp_path / "fresh.jsonl", [{"text": f"note {i}: " + " ".join(rng.choice(words) for _ in range(
        rng.randint(6, 16)))} for i in range(120)])
    run_ingest(copy, [tmp_path / "fresh.jsonl"], source="fresh")
    # Small chunks and little patience, so that counting only what the fills reach is visible at this size.
    monkeypatch.setattr(arms, "COUNT_CHUNK", 8)
    monkeypatch.setattr(arms, "FILL_PATIENCE", 4)
    config = EvaluateConfig(mixtures=["top"], baselines=["random", "source-matched", "bottom"],
                            **{**SMALL, "seeds": 3})
    with Catalog.open(copy) as catalog:
        unscored = {d for (d,) in catalog.sql("SELECT id FROM documents WHERE id NOT IN "
                                              "(SELECT doc_id FROM token_counts)")}
        texts = dict(catalog.sql("SELECT id, text FROM documents"))
        ranked = {d for (d,) in catalog.sql("SELECT doc_id FROM ranking_scores WHERE ranking = 'reasoning'")}
        first = plan_arms(catalog, config)
        again = plan_arms(catalog, config)
    assert len(unscored) == 120 and not unscored & ranked
    tokenizer = AutoTokenizer.from_pretrained(model)

    def counted(doc_id):
        return len(tokenizer(texts[doc_id])["input_ids"])
    assert [(a.label, a.doc_ids, a.tokens) for a in first.arms] == [(a.label, a.doc_ids, a.tokens) for a in again.arms]
    drawn = {d for a in first.arms if a.kind in ("random", "source-matched") for d in a.doc_ids}
    assert drawn & unscored                                    # the baselines reach beyond the ranking
    assert not {d for a in first.arms if a.kind in ("mixture", "bottom") for d in a.doc_ids} & unscored
    assert first.new_counts == {d: counted(d) for d in first.new_counts}
    assert set(first.new_counts) <= unscored and drawn & unscored <= set(first.new_counts)
    assert len(first.new_counts) < len(unscored)              # counted as the fills walked, not all
    for arm in first.arms:
        assert arm.tokens == sum(counted(d) for d in arm.doc_ids), arm.label
        assert config.tokens - first.largest_document < arm.tokens <= config.tokens, arm.label
        assert not set(arm.doc_ids) & set(first.heldout_doc_ids)
    assert set(first.heldout_doc_ids) <= ranked
    # The evaluation caches the new counts; planning again finds them and picks the same arms, same id.
    config = EvaluateConfig(mixtures=["top"], baselines=["random"], **{**SMALL, "seeds": 1})
    before = plan(copy, config)
    evaluate(copy, config)
    after = plan(copy, config)
    assert before.arms.new_counts and not after.arms.new_counts
    assert after.id == before.id and [a.doc_ids for a in after.arms.arms] == [a.doc_ids for a in before.arms.arms]
    with Catalog.open(copy) as catalog:
        cached = dict(catalog.sql("SELECT doc_id, tokens FROM token_counts WHERE doc_id IN (SELECT unnest(?))",
                                  [sorted(before.arms.new_counts)]))
    assert cached == before.arms.new_counts


def test_heldout_queries_are_disjoint_from_the_rankings_queries(mixed, finished):
    _, ws, _ = mixed
    config, data = finished
    held = json.loads((work_folder(ws, data["id"]) / "heldout.json").read_text())
    with Catalog.open(ws) as catalog:
        used = json.loads(catalog.one("SELECT query_ids FROM rankings WHERE name = 'reasoning'")[0])
        prompts = {p for (p,) in catalog.sql("SELECT prompt FROM queries WHERE id IN (SELECT unnest(?))", [used])}
    assert len(used) == 6 and sorted(held["ranking_queries"]) == sorted(used)
    assert {q["task"] for q in held["queries"]} == {"arithmetic", "slope", "linear", "factual-control"}
    assert not {q["id"] for q in held["queries"]} & set(used)
    assert not {q["prompt"] for q in held["queries"]} & prompts
    # Asking for a ranked query is refused before anything is written.
    with Catalog.open(ws) as catalog:
        before = catalog.sql("SELECT count(*) FROM evaluations")
    with pytest.raises(CuratorError, match="arithmetic-s0-0000|ranking reasoning was built from"):
        evaluate(ws, EvaluateConfig(mixtures=["top"], eval_queries="arithmetic-s0", **SMALL))
    # The generator's seed 0 is the ranking's own: the default queries at that seed are refused too.
    with Catalog.open(ws) as catalog:
        with pytest.raises(CuratorError, match="--eval-seed"):
            plan = plan_arms(catalog, EvaluateConfig(mixtures=["top"], eval_seed=0, **SMALL))
            heldout_queries(catalog, EvaluateConfig(mixtures=["top"], eval_seed=0, **SMALL), plan.rankings)
        assert catalog.sql("SELECT count(*) FROM evaluations") == before


class StopAt(Progress):
    """Raises at the n-th checkpoint boundary (after the state is saved), as a kill would land there."""

    def __init__(self, after: int | None = None):
        self.after, self.seen, self.arms = after, 0, []

    def arm(self, label, steps, done):
        self.arms.append((label, done))

    def checkpoint(self, label, step):
        self.seen += 1
        if self.after is not None and self.seen == self.after:
            raise KeyboardInterrupt(f"killed at {label} step {step}")


def test_a_killed_evaluation_resumes_to_the_same_result(mixed, finished):
    """Killed in the second arm, after its first checkpoint; the rerun keeps the finished arm, resumes the
    second at its checkpoint and ends with the numbers of an uninterrupted run (the `finished` evaluation
    trained the same arms with the same settings)."""
    _, ws, _ = mixed
    _, reference = finished
    config = EvaluateConfig(mixtures=["top", "twin"], baselines=["random"], **SMALL)
    stop = StopAt(after=3)        # top-s0: checkpoints at steps 2 and 4; twin-s0: the kill at step 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(ws, config, progress=stop)
    assert [a for a, _ in stop.arms] == ["top-s0", "twin-s0"]
    folder = next(p for p in work_folder(ws, "x").parent.iterdir() if (p / "twin-s0" / "state.pt").is_file())
    assert (folder / "top-s0" / "result.json").is_file() and not (folder / "twin-s0" / "result.json").exists()
    again = StopAt()
    data = evaluate(ws, config, progress=again)
    assert again.arms[0] == ("twin-s0", 2)            # top-s0 was not trained again
    assert not list(folder.rglob("state.pt"))
    want = {(r["arm"], r["seed"]): r for r in reference["results"] if r["arm"] in ("base", "top", "twin", "random")}
    got = {(r["arm"], r["seed"]): r for r in data["results"]}
    assert got.keys() == want.keys()
    for key in want:
        assert {k: v for k, v in got[key].items() if k != "seconds"} == \
               {k: v for k, v in want[key].items() if k != "seconds"}, key
    with Catalog.open(ws) as catalog:
        rows = catalog.sql("SELECT arm, seed, reasoning_loss FROM evaluation_results WHERE evaluation_id = ? "
                           "ORDER BY arm, seed", [data["id"]])
        state = catalog.one("SELECT state FROM evaluations WHERE id = ?", [data["id"]])[0]
    assert state == "done" and len(rows) == 8
    assert all(loss == got[arm, seed]["reasoning_loss"] for arm, seed, loss in rows)


def test_an_arm_whose_catalog_row_failed_is_recorded_by_the_next_run(mixed, finished, monkeypatch):
    """Another process holds the catalog for writing (DuckDB refuses a second writer process) when an arm
    finishes: its result is kept, its row cannot be written, the run stops. The next run trains nothing,
    writes the missing row, and every number equals an uninterrupted run's."""
    import subprocess
    import sys

    monkeypatch.delenv("CURATOR_LOCK_WAIT", raising=False)
    _, ws, _ = mixed
    _, reference = finished
    config = EvaluateConfig(mixtures=["twin"], baselines=[], **{**SMALL, "seeds": 1})

    class HoldAtLastCheckpoint(StopAt):
        holder = None

        def checkpoint(self, label, step):
            super().checkpoint(label, step)
            if step == config.steps:
                self.holder = subprocess.Popen(
                    [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                     "print('held', flush=True); sys.stdin.read()", str(ws.catalog_path)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert self.holder.stdout.readline().strip() == "held"

    hold = HoldAtLastCheckpoint()
    try:
        with pytest.raises(CuratorError, match="in use"):
            evaluate(ws, config, progress=hold)
    finally:
        if hold.holder is not None:
            hold.holder.stdin.close()
            hold.holder.wait(timeout=30)
    assert hold.arms == [("twin-s0", 0)]
    folder = next(p for p in work_folder(ws, "x").parent.iterdir() if (p / "twin-s0" / "result.json").is_file()
                  and not (p / "top-s0").exists())
    with Catalog.open(ws) as catalog:
        assert catalog.sql("SELECT arm FROM evaluation_results WHERE evaluation_id = ?", [folder.name]) == [("base",)]
    again = StopAt()
    data = evaluate(ws, config, progress=again)
    assert again.arms == [] and not list(folder.rglob("state.pt"))
    want = {(r["arm"], r["seed"]): r for r in reference["results"] if r["arm"] in ("base", "twin") and r["seed"] == 0}
    with Catalog.open(ws) as catalog:
        rows = catalog.sql("SELECT arm, seed, reasoning_loss, factual_loss, general_ppl, accuracy, trained_tokens "
                           "FROM evaluation_results WHERE evaluation_id = ? ORDER BY arm", [data["id"]])
    assert [(a, s) for a, s, *_ in rows] == [("base", 0), ("twin", 0)]
    for arm, seed, *numbers in rows:
        r = want[arm, seed]
        assert numbers == [r["reasoning_loss"], r["factual_loss"], r["general_ppl"], r["accuracy"],
                           r["trained_tokens"]], arm


def test_dropout_draws_do_not_depend_on_arm_order_or_where_a_resume_started(mixed, tmp_path):
    """A from-scratch model with dropout: the same arm, trained first, or second and killed and resumed,
    reaches the same numbers; two arms of the same documents and seed train identically."""
    _, ws, _ = mixed
    spec = tmp_path / "dropout.json"
    spec.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 1024, "attention_dropout": 0.5}))
    small = {**SMALL, "seeds": 1, "max_new_tokens": 4, "from_scratch": str(spec)}

    def numbers(data, arm):
        row = next(r for r in data["results"] if r["arm"] == arm)
        return {k: v for k, v in row.items() if k not in ("arm", "seconds")}

    first = evaluate(ws, EvaluateConfig(mixtures=["top"], baselines=[], **small))
    # top trained second (after twin, which holds the same documents), killed at its first checkpoint.
    config = EvaluateConfig(mixtures=["twin", "top"], baselines=[], **small)
    stop = StopAt(after=3)          # twin: checkpoints at steps 2 and 4; top: killed at step 2
    with pytest.raises(KeyboardInterrupt):
        evaluate(ws, config, progress=stop)
    again = StopAt()
    resumed = evaluate(ws, config, progress=again)
    assert again.arms == [("top-s0", 2)]
    assert numbers(resumed, "top") == numbers(first, "top") == numbers(resumed, "twin")
    # Dropout is on: the same documents without it train differently (the checks above can fail).
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "attention_dropout": 0.0}))
    plain = evaluate(ws, EvaluateConfig(mixtures=["top"], baselines=[], **small))
    assert numbers(plain, "top")["reasoning_loss"] != numbers(first, "top")["reasoning_loss"]


def test_the_accuracy_check_solves_each_problem_again_from_the_prompt():
    checked = 0
    for task in ("arithmetic", "slope", "linear"):
        for family in FAMILIES:
            for query in generate(task, 20, seed=5, family=family):
                solved = answer_from_prompt(task, query.prompt)
                if family in ("paper", "terse", "code"):
                    assert solved == int(query.answer), query.prompt
                    checked += 1
                if family == "paper":
                    assert answer_in_completion(query.completion) == solved
    assert checked == 3 * 3 * 20
    assert answer_from_prompt("arithmetic", "Calculate the answer: (7 - 2) * 3") == 15
    assert answer_from_prompt("slope", "through the points (1, 10) and (3, 4)?") == -3
    assert answer_from_prompt("slope", "through the points (0, 0) and (2, 1)?") is None     # 1/2: no integer
    assert answer_from_prompt("linear", "Solve for x: 4x + 3 = 19") == 4
    # A stored answer is not trusted: the check uses the one solved from the prompt.
    wrong = generate("linear", 1, seed=9)[0].model_copy(update={"answer": "999"})
    assert measure.checkable([wrong]) == [(wrong, answer_from_prompt("linear", wrong.prompt))]
    # The stated answer wins over numbers after it, across blank lines (chat models' layout); else the last number.
    assert answer_in_completion("To do it:\n\n1. Add: 9 + 15 = 24\n\nSo, the answer is 48.\n\nNext: 5 + 5 = 10") == 48
    assert answer_in_completion("Divide: x = 12 / 3 = 4.\nSo x = 4.") == 4
    assert answer_in_completion(" (50-20)/(10-5) = 30/5 = 6") == 6
    assert answer_in_completion("the output is:\n```\n-3.0\n```") == -3
    assert answer_in_completion("The slope is 2.5.") == 2.5 and answer_in_completion("no idea") is None


def test_the_report_says_plainly_when_the_mixture_does_not_beat_a_baseline(mixed, finished):
    from curator.evaluate import stats

    _, ws, _ = mixed
    _, data = finished
    html = open(data["report"]).read()
    assert "<svg" in html and "Does the mixture help?" in html
    assert len(data["sentences"]) == 2 * 2 * 3      # 2 mixtures × 3 baselines × (loss, accuracy)
    for sentence in data["sentences"]:
        assert sentence in html.replace("&#x27;", "'")
    comparisons = [c for c in data["comparisons"] if c["metric"] == "reasoning_loss"]
    for c in comparisons:
        said = stats.sentence(c["mixture"], c["against"], c)
        assert ("does NOT beat" in said) == (c["verdict"] != "better")
    def per_query(level, seed):      # six queries whose mean is `level`
        return {"reasoning_loss": {f"q{i}": level + 0.01 * (i - 2.5) * (1 + seed % 2) for i in range(6)}}
    mixture = [{"seed": s, "reasoning_loss": 2.0 + 0.01 * s, "per_query": per_query(2.0 + 0.01 * s, s)}
               for s in range(3)]
    better = [{"seed": s, "reasoning_loss": 1.5 + 0.02 * s, "per_query": per_query(1.5 + 0.02 * s, s)}
              for s in range(3)]
    worse = stats.compare(mixture, better, "reasoning_loss")
    assert worse["verdict"] == "worse" and "does NOT beat" in stats.sentence("m", "b", worse)
    assert stats.compare(better, mixture, "reasoning_loss")["verdict"] == "better"
    noisy = [{"seed": s, "reasoning_loss": 2.0 + (0.3 if s == 1 else -0.2)} for s in range(3)]
    assert stats.compare(mixture, noisy, "reasoning_loss")["verdict"] == "no difference"
    same = stats.compare(mixture, mixture, "reasoning_loss")
    assert same["verdict"] == "equal" and "equal on every seed" in stats.sentence("m", "b", same)
    # One right answer more out of 24 on every seed: no spread, so no interval and no claim.
    ahead = stats.compare([{"seed": s, "accuracy": 1 / 24 + s / 8} for s in range(3)],
                          [{"seed": s, "accuracy": s / 8} for s in range(3)], "accuracy")
    said = stats.sentence("m", "b", ahead)
    assert ahead["verdict"] == "same on every seed" and ahead["low"] is None and ahead["high"] is None
    assert "does NOT beat" in said and "same on every seed" in said and "0.04167" in said and "interval 0" not in said
    assert stats.interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 3, "same": True}
    assert data["summary"]["base"]["reasoning_loss"]["n"] == 1        # measured once, not once per seed
    assert "Comparisons" in html and "95% over held-out queries" in html
    summary = stats.interval([1.0, 2.0, 3.0])
    assert summary["mean"] == 2.0 and summary["high"] - 2.0 == pytest.approx(4.303 / 3 ** 0.5)


def test_the_json_report_holds_each_comparisons_bootstrap_over_the_heldout_queries(mixed, finished):
    """Every arm records its per-query values; each comparison on a query metric carries the paired bootstrap
    of them, the one stats.bootstrap gives for those values; perplexity carries none; old results (no
    per-query values) read back and give none."""
    from curator.evaluate import stats
    from curator.evaluate.config import ArmResult

    _, ws, _ = mixed
    config, data = finished
    report = json.loads(open(data["report_json"]).read())
    assert report["setup"]["bootstrap_resamples"] == config.bootstrap == 2000
    held = json.loads((work_folder(ws, data["id"]) / "heldout.json").read_text())
    reasoning = sorted(q["id"] for q in held["queries"] if q["task"] in ("arithmetic", "slope", "linear"))
    for row in report["results"]:
        values = row["per_query"]
        assert sorted(values["reasoning_loss"]) == reasoning
        assert sum(values["reasoning_loss"].values()) / len(reasoning) == pytest.approx(row["reasoning_loss"])
        assert sum(values["factual_loss"].values()) / len(values["factual_loss"]) == pytest.approx(row["factual_loss"])
        assert sum(values["accuracy"].values()) / len(values["accuracy"]) == pytest.approx(row["accuracy"])
    rows = {(r["arm"], r["seed"]): r for r in report["results"]}
    c = next(c for c in report["comparisons"] if (c["mixture"], c["against"], c["metric"]) ==
             ("top", "random", "reasoning_loss"))
    by_hand = [[rows["random", s]["per_query"]["reasoning_loss"][q] - rows["top", s]["per_query"]["reasoning_loss"][q]
                for q in reasoning] for s in range(config.seeds)]
    assert c["queries"] == stats.bootstrap(by_hand, 2000, 0) and c["queries"]["queries"] == len(reasoning)
    assert c["queries"]["low"] <= c["queries"]["mean"] <= c["queries"]["high"]
    assert c["queries"]["mean"] == pytest.approx(c["mean"])
    for c in report["comparisons"]:
        if c["metric"] == "general_ppl":
            assert c["queries"] is None and c["queries_note"] == "not a mean over queries"
        elif c["metric"] != "factual_loss" or c["mean"] is not None:
            held_queries = len(rows["top", 0]["per_query"][c["metric"]])
            if held_queries >= stats.MIN_QUERIES:
                assert c["queries"] is not None, (c["mixture"], c["against"], c["metric"])
            else:                               # the tiny run's few factual controls: no interval, no claim
                assert c["queries"] is None and c["queries_note"].startswith(f"only {held_queries} held-out")
        # Perplexity is measured on documents: its verdict is the seeds'. The others need both intervals.
        beats = c["seeds"] == "better" and (c["metric"] == "general_ppl"
                                            or (c["queries"] is not None and c["queries"]["low"] > 0))
        assert (c["verdict"] == "better") == beats
    with Catalog.open(ws) as catalog:
        details = json.loads(catalog.one("SELECT details FROM evaluation_results WHERE evaluation_id = ? AND "
                                         "arm = 'top' AND seed = 0", [data["id"]])[0])
    assert details["per_query"] == rows["top", 0]["per_query"]
    old = {k: v for k, v in rows["top", 0].items() if k != "per_query"}
    assert ArmResult.model_validate(old).per_query is None


def test_cli_prints_the_table_and_bad_input_leaves_the_catalog_as_it_was(mixed, finished):
    """The typer command in this process (a subprocess would spend its time importing torch)."""
    from typer.testing import CliRunner

    from curator.cli.app import app

    root, ws, _ = mixed
    config, data = finished
    # The same request finds every arm finished: the command only reports.
    args = ["evaluate", "--mixtures", "top,twin", "--tokens", config.tokens, "--seeds", config.seeds,
            "--seq-len", config.seq_len, "--batch-rows", config.batch_rows, "--checkpoints", config.checkpoints,
            "--eval-per-task", config.eval_per_task, "--max-new-tokens", config.max_new_tokens,
            "--heldout-docs", config.heldout_docs, "--lr", config.lr, "-w", ws.root]
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"Evaluation {data['id']}" in result.output and "source-matched" in result.output
    assert "beat" in result.output and "Report:" in result.output
    assert "Against the baselines" in result.output and "over held-out queries" in result.output
    with Catalog.open(ws) as catalog:
        before = catalog.sql("SELECT id, state FROM evaluations ORDER BY id")
    for bad, message in [(dict(mixtures=["nope"]), "no mixture named 'nope'"),
                         (dict(mixtures=["top"], tokens=10**6), "fewer than --tokens"),
                         (dict(mixtures=["top"], tokens=64), "less than one batch"),
                         (dict(mixtures=["top", "top"]), "twice")]:
        with pytest.raises(CuratorError, match=message):
            evaluate(ws, EvaluateConfig(**{**SMALL, **bad}))
    with Catalog.open(ws) as catalog:
        assert catalog.sql("SELECT id, state FROM evaluations ORDER BY id") == before
    wrong = CliRunner().invoke(app, ["evaluate", "--mixtures", "top", "--tokens", "512", "--baselines", "worst",
                                     "-w", str(ws.root)])
    assert wrong.exit_code == 2 and "unknown baseline 'worst'" in wrong.output


def test_from_scratch_trains_a_new_model_from_one_seeded_init_per_seed(mixed, tmp_path):
    _, ws, _ = mixed
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "max_position_embeddings": 1024}))
    config = EvaluateConfig(mixtures=["top"], baselines=["random"], from_scratch=str(spec),
                            **{**SMALL, "seeds": 1, "max_new_tokens": 4})
    data = evaluate(ws, config)
    assert data["setup"]["from_scratch"] and not data["setup"]["starting_model_is_the_rankings"]
    by = {r["arm"]: r for r in data["results"]}
    vocab = len(tiny_tokenizer())
    # A fresh init predicts close to uniformly: its loss is near ln(vocabulary), and training lowers it.
    assert abs(by["base"]["reasoning_loss"] - math.log(vocab)) < 1.0
    assert by["top"]["curve"][0]["reasoning_loss"] == by["random"]["curve"][0]["reasoning_loss"]
    assert by["top"]["reasoning_loss"] < by["base"]["reasoning_loss"]
    spec.write_text(json.dumps({"hidden_size": 16}))
    with pytest.raises(CuratorError, match="model_type"):
        evaluate(ws, config)
