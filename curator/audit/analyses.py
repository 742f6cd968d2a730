"""The paper's analyses (Ruis et al. 2024) as pure functions of score tables.

Inputs are polars frames: scores (query_id, doc_id, score), documents
(doc_id, source, text) and queries (id, task, answer). Outputs are plain
dicts and lists, ready for JSON, so the report and its numbers cannot drift.
"""

from __future__ import annotations

import math
import re

import numpy as np

from curator.constants import REASONING_TASKS



def k_values(n_docs: int) -> list[int]:
    """50, 500, 5k, … below the corpus size (k = the corpus size says nothing: every ratio is 1);
    a corpus of 50 documents or fewer gets its top fifth."""
    ks, k = [], 50
    while k < n_docs:
        ks.append(k)
        k *= 10
    return ks or ([max(1, n_docs // 5)] if n_docs else [])


def score_matrix(scores) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(query ids, doc ids, Q × D matrix) from a long (query_id, doc_id, score) frame."""
    wide = scores.pivot(on="doc_id", index="query_id", values="score").sort("query_id")
    query_ids = wide["query_id"].to_list()
    doc_ids = np.array([int(c) for c in wide.columns[1:]])
    matrix = wide.drop("query_id").to_numpy().astype(np.float64)
    order = np.argsort(doc_ids)
    return query_ids, doc_ids[order], matrix[:, order]


def source_ratios(matrix: np.ndarray, doc_sources: list[str], ks: list[int]) -> dict:
    """For each k: each source's share of a query's top-k and bottom-k documents, averaged over the
    queries, divided by the source's share of the corpus (documents). 1 = as often as chance."""
    sources = sorted(set(doc_sources))
    labels = np.array(doc_sources)
    corpus = {s: float(np.mean(labels == s)) for s in sources}
    result = {"corpus_share": corpus, "top": {}, "bottom": {}}
    order = np.argsort(-matrix, axis=1, kind="stable")
    for k in ks:
        for side, picks in (("top", order[:, :k]), ("bottom", order[:, ::-1][:, :k])):
            shares = {s: float(np.mean([(labels[row] == s).mean() for row in picks])) for s in sources}
            result[side][str(k)] = {s: shares[s] / corpus[s] for s in sources}
    return result


def correlations(matrix: np.ndarray, query_ids: list[str], tasks: dict[str, str]) -> dict:
    """Query-by-query Pearson correlation over documents, with means within and across tasks."""
    corr = np.corrcoef(matrix) if len(query_ids) > 1 else np.ones((1, 1))
    names = [tasks[q] for q in query_ids]
    within, across = {}, []
    for task in sorted(set(names)):
        idx = [i for i, t in enumerate(names) if t == task]
        pairs = [corr[i, j] for a, i in enumerate(idx) for j in idx[a + 1:]]
        within[task] = float(np.mean(pairs)) if pairs else None
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if names[i] != names[j]:
                across.append(corr[i, j])
    return {"query_ids": query_ids, "tasks": names, "matrix": corr.tolist(), "mean_within_task": within,
            "mean_across_tasks": float(np.mean(across)) if across else None}


def cumulative_positive(row: np.ndarray, percents: list[float]) -> list[float]:
    """Share of a query's total positive influence held by its top p% of documents."""
    positive = np.sort(np.clip(row, 0, None))[::-1]
    total = positive.sum()
    out = []
    for p in percents:
        k = max(1, math.ceil(len(row) * p / 100))
        out.append(float(positive[:k].sum() / total) if total > 0 else 0.0)
    return out


def power_law(row: np.ndarray, top: int = 500) -> dict | None:
    """Least-squares fit of log(score) = c − α·log(rank) over the top positive scores; α and its
    standard error. None with fewer than three positive scores."""
    ranked = np.sort(row)[::-1][:top]
    ranked = ranked[ranked > 0]
    if len(ranked) < 3:
        return None
    x = np.log(np.arange(1, len(ranked) + 1))
    y = np.log(ranked)
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    dof = len(x) - 2
    sigma2 = float(residual @ residual) / dof if dof > 0 else 0.0
    se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[1, 1])
    return {"alpha": float(-coef[1]), "se": se, "n": int(len(ranked))}


PERCENTS = [0.1, 0.5, 1, 2, 5, 10, 20, 50, 100]


def concentration(matrix: np.ndarray, query_ids: list[str], tasks: dict[str, str]) -> dict:
    per_query = {}
    for q, row in zip(query_ids, matrix, strict=True):
        per_query[q] = {"task": tasks[q], "cumulative": cumulative_positive(row, PERCENTS), "power_law": power_law(row)}
    per_task = {}
    for task in sorted(set(tasks[q] for q in query_ids)):
        mine = [per_query[q] for q in query_ids if tasks[q] == task]
        fits = [m["power_law"] for m in mine if m["power_law"]]
        per_task[task] = {
            "cumulative": np.mean([m["cumulative"] for m in mine], axis=0).tolist(),
            "alpha_mean": float(np.mean([f["alpha"] for f in fits])) if fits else None,
            "alpha_se_mean": float(np.mean([f["se"] for f in fits])) if fits else None,
        }
    return {"percents": PERCENTS, "per_query": per_query, "per_task": per_task}


def answer_pattern(answer: str) -> re.Pattern:
    """The answer as a whole token: '7' does not match inside '17' or '7.5'; text is case-insensitive."""
    escaped = re.escape(answer.strip())
    return re.compile(rf"(?<![\w.]){escaped}(?![\w]|\.\d)", re.IGNORECASE)


def answer_occurrence(matrix: np.ndarray, query_ids: list[str], doc_ids: np.ndarray, texts: dict[int, str],
                      answers: dict[str, str | None], tasks: dict[str, str], top: int = 500) -> dict:
    """For each query with an answer: how many of its top documents contain the answer string, and the rank
    (1 = most helpful) of the best-placed document that contains it, over all documents (None: none does).

    The rank says what the count cannot when the corpus is not much larger than `top`:
    whether the document holding a fact is the one that drives its answer."""
    containing = {}
    per_query = {}
    for q, row in zip(query_ids, matrix, strict=True):
        answer = answers.get(q)
        if not answer or not answer.strip():
            continue
        if answer not in containing:
            pattern = answer_pattern(answer)
            containing[answer] = np.array([bool(pattern.search(texts[int(d)])) for d in doc_ids])
        has = containing[answer][np.argsort(-row, kind="stable")]
        hits = int(has[:top].sum())
        first = int(np.argmax(has)) + 1 if has.any() else None
        per_query[q] = {"task": tasks[q], "answer": answer, "top": int(min(top, len(has))), "contains": hits,
                        "first_rank": first}
    summary = {}
    for group, members in (("reasoning", [q for q in per_query if per_query[q]["task"] in REASONING_TASKS]),
                           ("factual", [q for q in per_query if per_query[q]["task"] == "factual"])):
        if members:
            counts = [per_query[q]["contains"] for q in members]
            ranks = [per_query[q]["first_rank"] for q in members if per_query[q]["first_rank"] is not None]
            summary[group] = {"queries": len(members), "mean_documents_with_answer": float(np.mean(counts)),
                              "queries_with_any": int(sum(c > 0 for c in counts)),
                              "median_first_rank": float(np.median(ranks)) if ranks else None}
    return {"top": top, "per_query": per_query, "summary": summary}


def compare_runs(a, b) -> dict:
    """Per-query Pearson and Spearman between two runs' scores over their common documents."""
    import polars as pl

    joined = a.join(b, on=["query_id", "doc_id"], suffix="_b")
    out = {}
    for (query_id,), group in joined.group_by(["query_id"], maintain_order=True):
        x, y = group["score"].to_numpy().astype(float), group["score_b"].to_numpy().astype(float)
        if len(x) < 2:
            continue
        rx, ry = pl.Series(x).rank().to_numpy(), pl.Series(y).rank().to_numpy()
        out[query_id] = {"pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": float(np.corrcoef(rx, ry)[0, 1]),
                         "documents": len(x)}
    return dict(sorted(out.items()))
