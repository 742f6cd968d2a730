"""The sign convention, checked by finite differences on a tiny model.

I(q, d) > 0 must mean that training on d makes q's completion more likely.
Taking one small step on a document and re-measuring log p(completion) checks
that directly, with nothing from the influence code in the measurement.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, loaded_tiny

from curator.catalog.database import Catalog
from curator.influence.factors import get_factors, load_layer_factors
from curator.influence.fit import FitConfig, fit
from curator.influence.ekfac import precondition
from curator.catalog.queries import Query, store_queries
from curator.influence.score import ScoreConfig, score
from curator.catalog.database import create_workspace
from curator.catalog.records import score_files

QUERY = Query(id="q", task="arithmetic", prompt="Calculate the answer: (5 + 3) * 2", completion="8 * 2 = 16.")
DOCS = TRAINING_TEXT + ["7 * 6 = 42", "Rome is in Italy.", "x = x + 1", "print(2 * 8)", "(6 - 2) / 2 = 2"]


def completion_log_prob(lm) -> float:
    tok = lm.tokenizer
    prompt = tok(QUERY.prompt + "\n")["input_ids"]
    ids = torch.tensor([prompt + tok(QUERY.completion, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, :-1]
    return -float(F.cross_entropy(logits[len(prompt) - 1:], ids[0, len(prompt):], reduction="sum"))


def document_gradients(lm, modules, text):
    """∇L(d) of each tracked layer (weight | bias), from autograd."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    for name in modules:
        lm.model.get_submodule(name).requires_grad_(True)
    lm.model.zero_grad(set_to_none=True)
    logits = lm.model(input_ids=ids).logits[0, :-1]
    F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    grads = {}
    for name in modules:
        module = lm.model.get_submodule(name)
        grads[name] = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1)
        module.requires_grad_(False)
    return grads


def step(lm, modules, direction, lr):
    with torch.no_grad():
        for name in modules:
            module = lm.model.get_submodule(name)
            module.weight -= lr * direction[name][:, :-1]
            module.bias -= lr * direction[name][:, -1]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("sign")
    ws, _ = create_workspace(root / "ws")
    write_jsonl(root / "docs.jsonl", [{"text": t} for t in DOCS])
    run_ingest(ws, [root / "docs.jsonl"])
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, [QUERY])
    lm = loaded_tiny(seed=1, bias=True)
    fit(ws, FitConfig(model="tiny", max_seq_len=128), loaded=lm)   # default: true (sampled) Fisher
    result = score(ws, ScoreConfig(), loaded=lm)
    table = pl.read_parquet(score_files(result.out_path)).sort("score")
    texts = {i: t for i, t in enumerate(DOCS, start=1)}
    with Catalog.open(ws) as catalog:
        record = get_factors(catalog)
    return ws, record, table, texts


@pytest.mark.parametrize("end", ["top", "bottom"])
def test_preconditioned_step_changes_log_prob_by_lr_times_influence(scored, end):
    ws, record, table, texts = scored
    row = table.row(-1 if end == "top" else 0, named=True)
    assert (row["score"] > 0) == (end == "top")
    lm = loaded_tiny(seed=1, bias=True)
    factors = load_layer_factors(ws, record)
    direction = {name: precondition(g.double(), factors[name]).float()
                 for name, g in document_gradients(lm, record.modules, texts[row["doc_id"]]).items()}
    lr = 1e-4 / abs(row["score"]) ** 0.5
    before = completion_log_prob(lm)
    step(lm, record.modules, direction, lr)
    change = completion_log_prob(lm) - before
    assert (change > 0) == (end == "top")
    assert change / lr == pytest.approx(row["score"], rel=0.05)


def test_plain_sgd_steps_follow_the_influence_ranking(scored):
    """Unpreconditioned steps are not what I(q, d) predicts, only what it approximates: one
    document's sign may differ (which one depends on the Fisher's sampled labels), but the
    ranking must carry over, and the top document must help."""
    import numpy as np

    ws, record, table, texts = scored
    changes = []
    for doc_id in table["doc_id"]:
        lm = loaded_tiny(seed=1, bias=True)
        before = completion_log_prob(lm)
        step(lm, record.modules, document_gradients(lm, record.modules, texts[doc_id]), 1e-4)
        changes.append(completion_log_prob(lm) - before)
    rank_correlation = np.corrcoef(pl.Series(changes).rank().to_numpy(), table["score"].rank().to_numpy())[0, 1]
    assert changes[-1] > 0 and changes[-1] == max(changes), changes
    assert rank_correlation > 0.5, (rank_correlation, changes)
