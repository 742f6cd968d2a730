"""curator's exact scores against kronfluence's pairwise EK-FAC scores.

kronfluence (installed with --no-deps as a test dependency) is an independent
implementation of the same estimator. Same tiny model, documents, queries and
MLP modules; the empirical Fisher (deterministic labels) so both fit the same
factors; damping 0.1 × mean eigenvalue; measurement = the completion's summed
loss, training loss = the document's summed loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, tiny_llama, tiny_tokenizer

from curator.catalog.database import Catalog
from curator.influence.fit import FitConfig, fit
from curator.model.loading import tracked_modules, wrap_model
from curator.catalog.queries import Query, store_queries
from curator.influence.score import ScoreConfig, score
from curator.catalog.database import create_workspace
from curator.catalog.records import score_files

kronfluence = pytest.importorskip("kronfluence")

MAX_LEN = 64
DOCS = TRAINING_TEXT + [
    "while n > 1:\n    n = n // 2\n", "The answer is 42.", "Rome is the capital of Italy.",
    "7 * 6 = 42 and 6 * 7 = 42", "slope = rise / run", "import math\nprint(math.sqrt(16))",
]
QUERIES = [
    Query(id="q1", task="arithmetic", prompt="Calculate the answer: (5 + 3) * 2", completion="8 * 2 = 16."),
    Query(id="q2", task="linear", prompt="Solve for x: 3x + 4 = 10.", completion="3x = 6, so x = 2."),
    Query(id="q3", task="factual", prompt="The capital of France is", completion="Paris."),
    Query(id="q4", task="slope", prompt="The slope through (1, 2) and (3, 6) is", completion="2."),
]


class SummedLossTask(kronfluence.Task):
    def __init__(self, modules):
        self.modules = modules

    def _loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        if sample:
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1)
            labels = torch.where(labels == -100, labels, drawn.reshape(labels.shape))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def compute_train_loss(self, batch, model, sample=False):
        return self._loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def padded(rows, width, pad):
    """A list-of-dicts dataset of equal-length tensors, as kronfluence's default collate wants."""
    items = []
    for ids, first_target in rows:
        n = len(ids)
        input_ids = torch.full((width,), pad, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids)
        mask = torch.zeros(width, dtype=torch.long)
        mask[:n] = 1
        labels = torch.full((width,), -100, dtype=torch.long)
        labels[first_target:n] = input_ids[first_target:n]
        items.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return items


def test_exact_scores_match_kronfluence(tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    tokenizer = tiny_tokenizer()
    ws, _ = create_workspace(tmp_path / "ws")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in DOCS])
    run_ingest(ws, [tmp_path / "docs.jsonl"])
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, QUERIES)
    lm = wrap_model(tiny_llama(seed=3, bias=True), tokenizer, name="tiny")
    fit(ws, FitConfig(model="tiny", fisher="empirical", max_seq_len=MAX_LEN, batch_tokens=256), loaded=lm)
    result = score(ws, ScoreConfig(batch_tokens=256), loaded=lm)
    import polars as pl

    ours = (pl.read_parquet(score_files(result.out_path)).pivot(on="doc_id", index="query_id", values="score")
            .sort("query_id").drop("query_id").to_numpy())

    # kronfluence on a fresh copy of the same model.
    model = tiny_llama(seed=3, bias=True)
    modules = list(tracked_modules(model, "mlp"))
    task = SummedLossTask(modules)
    model = prepare_model(model, task)
    doc_rows = []
    for text in DOCS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) <= MAX_LEN, "one window per document keeps the comparison per sequence"
        doc_rows.append((ids, 1))
    query_rows = []
    for q in QUERIES:
        prompt = tokenizer(q.prompt + "\n")["input_ids"]
        query_rows.append((prompt + tokenizer(q.completion, add_special_tokens=False)["input_ids"], len(prompt)))
    pad = tokenizer.pad_token_id
    train = padded(doc_rows, MAX_LEN, pad)
    query = padded(query_rows, max(len(r[0]) for r in query_rows), pad)
    analyzer = Analyzer("oracle", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path / "kf"))
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=4,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    analyzer.compute_pairwise_scores("scores", "ekfac", query, train, per_device_query_batch_size=2,
                                     per_device_train_batch_size=4,
                                     score_args=ScoreArguments(damping_factor=None))
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()

    assert ours.shape == theirs.shape == (len(QUERIES), len(DOCS))
    pearson = np.corrcoef(ours.reshape(-1), theirs.reshape(-1))[0, 1]
    print(f"pearson with kronfluence: {pearson:.8f}; max abs diff {np.abs(ours - theirs).max():.3g} of {np.abs(theirs).max():.3g}")
    assert pearson >= 0.999, pearson
    for row in range(len(QUERIES)):   # and per query, where the ranking is used
        assert np.corrcoef(ours[row], theirs[row])[0, 1] >= 0.999
    # Same sign convention: kronfluence's positive score means helpful, as ours.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
