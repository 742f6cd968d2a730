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


def source_counts(row: np.ndarray, doc_codes: np.ndarray, n_sources: int, ks: list[int]) -> dict:
    """For each k: how many of a query's top-k and bottom-k documents each source holds (by source code).
    Documents are in doc-id order; ties keep that order, as a stable sort does."""
    order = np.argsort(-row, kind="stable")
    return {side: {k: np.bincount(doc_codes[picks[:k]], minlength=n_sources)
                   for k in ks} for side, picks in (("top", order), ("bottom", order[::-1]))}


def source_ratios(per_query_counts: list[dict], sources: list[str], doc_codes: np.ndarray, ks: list[int]) -> dict:
    """For each k: each source's share of a query's top-k and bottom-k documents, averaged over the
    queries, divided by the source's share of the corpus (documents). 1 = as often as chance."""
    corpus_counts = np.bincount(doc_codes, minlength=len(sources))
    corpus = {s: float(corpus_counts[i] / len(doc_codes)) for i, s in enumerate(sources)}
    result = {"corpus_share": corpus, "top": {}, "bottom": {}}
    for k in ks:
        for side in ("top", "bottom"):
            shares = {s: float(np.mean([counts[side][k][i] / min(k, len(doc_codes)) for counts in per_query_counts]))
                      for i, s in enumerate(sources)}
            result[side][str(k)] = {s: shares[s] / corpus[s] for s in sources}
    return result


class Gram:
    """Query-by-query co-moments of scores, added a block of documents at a time: the Pearson correlation
    of every pair of queries without the whole query × document matrix, and without the means
    beforehand. Each block is centred on its own means, so its products do not cancel however far its
    means are from other blocks' (documents are in id order, and one source's scores can sit apart), and
    is merged into the running co-moments as parallel variance algorithms merge (Chan et al.):
    C = C_a + C_b + (n_a·n_b / n)·(μ_a − μ_b)(μ_a − μ_b)ᵀ.

    Products are taken at the scores' own precision and summed in float64 from block to block: float32
    scores (as `curator score` writes them) are centred and multiplied in float32, half the work of
    float64 products, and the correlations stay within ~1e-7 of float64's for blocks of 16,384 documents
    (the scores carry 24 bits to begin with); float64 scores keep float64 products."""

    def __init__(self, n_queries: int):
        self.mean = np.zeros(n_queries)
        self.products = np.zeros((n_queries, n_queries))     # Σ (x − μ)(y − μ) over the documents so far
        self.n = 0
        self._buffer: np.ndarray | None = None

    def add(self, block: np.ndarray) -> None:
        """`block`: queries × a set of documents (every query's scores of the same documents)."""
        block = np.asarray(block)
        width = block.shape[1]
        if width == 0:
            return
        dtype = np.float32 if block.dtype == np.float32 else np.float64
        # Into one buffer kept between blocks (a new array per block costs its page faults again: 25% of
        # this step), centred on the block's means as the products' type holds them; the centred sums say
        # what that rounding left, and the co-moments are moved to the block's exact means.
        if self._buffer is None or self._buffer.shape != block.shape or self._buffer.dtype != dtype:
            self._buffer = np.empty(block.shape, dtype=dtype)
        shift = block.mean(axis=1, dtype=dtype)
        centred = self._buffer
        np.subtract(block, shift[:, None], out=centred)
        sums = centred.sum(axis=1, dtype=np.float64)
        products = np.dot(centred, centred.T).astype(np.float64) - np.outer(sums, sums) / width
        # `@` takes OpenBLAS's syrk for float64, 7× slower than the general product
        mean = shift.astype(np.float64) + sums / width
        total = self.n + width
        delta = mean - self.mean
        self.products += products + np.outer(delta, delta) * (self.n * width / total)
        self.mean += delta * (width / total)
        self.n = total

    def merge(self, other: Gram) -> None:
        """Add the co-moments `other` summed over other documents (the same merge as `add`'s)."""
        total = self.n + other.n
        if other.n == 0:
            return
        delta = other.mean - self.mean
        self.products += other.products + np.outer(delta, delta) * (self.n * other.n / total)
        self.mean += delta * (other.n / total)
        self.n = total

    def means(self) -> np.ndarray:
        return self.mean

    def correlation(self) -> np.ndarray:
        if len(self.mean) == 1:
            return np.ones((1, 1))
        scale = np.sqrt(np.diag(self.products))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(self.products / np.outer(scale, scale), -1, 1)


def correlations(corr: np.ndarray, query_ids: list[str], tasks: dict[str, str]) -> dict:
    """Query-by-query Pearson correlation over documents (from `Gram`), with means within and across tasks."""
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


def power_law(row: np.ndarray, top: int = 500, presorted: bool = False) -> dict | None:
    """Least-squares fit of log(score) = c − α·log(rank) over the top positive scores; α and its
    standard error. None with fewer than three positive scores. `presorted`: `row` is already in
    descending order."""
    ranked = (row if presorted else np.sort(row)[::-1])[:top]
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


def query_concentration(row: np.ndarray) -> dict:
    """One query's cumulative positive shares at PERCENTS and its power-law fit."""
    return {"cumulative": cumulative_positive(row, PERCENTS), "power_law": power_law(row)}


def concentration(per_query: dict[str, dict], query_ids: list[str], tasks: dict[str, str]) -> dict:
    """`query_concentration` of every query, with each task's means."""
    per_query = {q: {"task": tasks[q], **per_query[q]} for q in query_ids}
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


def answer_finder(answer: str):
    """`answer_pattern(answer).search` as a test of one text, quicker where it can be: when no character
    of the answer has a case (a number, as most reasoning answers are), the pattern matches its characters
    exactly, so only a text holding the answer verbatim can match, and `in` finds those ~20× faster than
    the pattern rejects the others."""
    pattern = answer_pattern(answer)
    literal = answer.strip()
    if any(c.lower() != c or c.upper() != c for c in literal):
        return lambda text: pattern.search(text) is not None
    return lambda text: literal in text and pattern.search(text) is not None


def answer_re2(answer: str) -> str:
    """`answer_pattern` for DuckDB's RE2 (which has no look-around): the answer as a whole token, not inside
    a word or number, case-insensitive. Word characters are letters, numbers and '_' (Python's \\w), digits
    are decimal digits (Python's \\d); the preceding and following characters are matched, not looked at,
    which finds the same texts."""
    literal = "".join("\\" + c if c.isascii() and not c.isalnum() else c for c in answer.strip())
    word = r"\pL\pN_"
    return rf"(?is)(?:^|[^{word}.]){literal}(?:$|[^{word}.]|\.$|\.[^\p{{Nd}}])"


def query_answer(row: np.ndarray, contains: np.ndarray, top: int = 500) -> dict:
    """How many of a query's top documents contain its answer, and the rank (1 = most helpful) of the
    best-placed document that contains it, over all documents (None: none does). `contains` is a
    boolean per document, in the row's (doc-id) order.

    The rank says what the count cannot when the corpus is not much larger than `top`:
    whether the document holding a fact is the one that drives its answer."""
    has = contains[np.argsort(-row, kind="stable")]
    first = int(np.argmax(has)) + 1 if has.any() else None
    return {"top": int(min(top, len(has))), "contains": int(has[:top].sum()), "first_rank": first}


def answer_occurrence(per_query: dict[str, dict], tasks: dict[str, str], top: int = 500) -> dict:
    """`query_answer` of every query with an answer (each entry also holding "answer"), with the
    reasoning and factual summaries."""
    per_query = {q: {"task": tasks[q], "answer": r["answer"], "top": r["top"], "contains": r["contains"],
                     "first_rank": r["first_rank"]} for q, r in per_query.items()}
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


# -- the same numbers from each source's scores sorted ------------------------------------------
# A stable argsort of millions of scores costs ~30× a plain sort of the values, and the functions above
# need several per query. `RankedScores` gives the same results from each source's scores sorted once:
# the k-th largest score of the whole row by bisection, each source's count above it by binary search,
# and a document's place among equal scores (doc-id order) only where a k-th score has ties. Sorting
# the sources apart instead of the row as a whole is what makes the per-source counts free: they were
# one comparison pass over every source's scores per k (2M scores, ten k: 6 ms a query, with a sort of
# 7 ms; sorted per source: 8.4 ms for both).


SOURCE_RUNS = 64       # a source in at most this many runs of consecutive documents is copied run by run


class SourceSplit:
    """The documents (positions in doc-id order) of each source code, to sort a query's scores per source.
    A source ingested as a few batches holds a few runs of consecutive ids: its scores are copied a run at
    a time (a copy of memory) instead of gathered position by position (2.3 ms for 2M scores in four
    sources that alternate, against 0.3 ms in four runs)."""

    def __init__(self, doc_codes: np.ndarray, n_sources: int):
        self.codes, self.n_sources = doc_codes, n_sources
        self.members = [np.flatnonzero(doc_codes == c) for c in range(n_sources)]
        self.runs = [_runs(members) for members in self.members]

    def scores(self, row: np.ndarray, source: int) -> np.ndarray:
        """A new array of `row`'s values at the documents of `source`, in doc-id order."""
        runs = self.runs[source]
        if runs is None:
            return row[self.members[source]]
        return np.concatenate([row[run] for run in runs]) if runs else row[:0].copy()


def _runs(members: np.ndarray) -> list[slice] | None:
    """`members` (ascending positions) as slices of consecutive positions; None past SOURCE_RUNS of them."""
    if not len(members):
        return []
    ends = np.flatnonzero(np.diff(members) != 1)
    if len(ends) >= SOURCE_RUNS:
        return None
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends + 1, [len(members)]])
    return [slice(int(members[a]), int(members[b - 1]) + 1) for a, b in zip(starts, stops)]


class ScoresNotANumber(ValueError):
    """A query's scores hold NaN, which has no place in an order."""


def order_keys(dtype):
    """(to key, to value): scores of `dtype` (float32, float64) as unsigned integers in the same order, and
    back: a negative number's bits below the sign flipped (then the integers order as the numbers do,
    signed), and the sign bit flipped (then they order unsigned). -0.0 and 0.0 get two keys and compare
    equal, which bisection over the values allows."""
    dtype = np.dtype(dtype)
    signed, key_type = {4: (np.int32, np.uint32), 8: (np.int64, np.uint64)}[dtype.itemsize]
    width = 8 * dtype.itemsize - 1
    low_bits = signed(np.iinfo(signed).max)
    sign = key_type(1) << key_type(width)

    def flip_negatives(bits):                 # its own inverse: the sign bit is kept
        return bits ^ ((bits >> width) & low_bits)

    def to_key(values):
        return flip_negatives(np.asarray(values, dtype=dtype).view(signed)).view(key_type) ^ sign

    def to_value(keys):
        return flip_negatives((np.asarray(keys, dtype=key_type) ^ sign).view(signed)).view(dtype)

    return to_key, to_value


class RankedScores:
    """One query's scores (`row`, in doc-id order, float32 or float64) sorted within each source of `split`.

    kth(ranks)           the k-th largest score for each k (1 = the largest; `np.sort(row)[n - k]`, but
                         0.0 where that is -0.0, which compares equal), found together by bisection over
                         the scores' bits and kept for later calls;
    at_least / above     each source's number of scores ≥ (>) each value: sources × values;
    positives()          the number of scores above 0;
    top_values(n)        the n largest scores, largest first."""

    def __init__(self, row: np.ndarray, split: SourceSplit):
        self.row, self.split, self.n = row, split, len(row)
        self.parts = [split.scores(row, source) for source in range(split.n_sources)]
        for part in self.parts:
            part.sort()                                   # in place: the copy above is the only one
        if any(len(part) and np.isnan(part[-1]) for part in self.parts):       # NaN sorts last
            raise ScoresNotANumber("the scores hold NaN")
        self.sizes = np.array([len(part) for part in self.parts])
        self._kth: dict[int, float] = {}

    def positives(self) -> int:
        return int(self.above(np.zeros(1, dtype=self.row.dtype)).sum())

    def at_least(self, values) -> np.ndarray:
        return np.array([len(p) - np.searchsorted(p, values, "left") for p in self.parts]).reshape(len(self.parts), -1)

    def above(self, values) -> np.ndarray:
        return np.array([len(p) - np.searchsorted(p, values, "right") for p in self.parts]).reshape(len(self.parts), -1)

    def kth(self, ranks: list[int]) -> np.ndarray:
        """The k-th largest score for each k of `ranks` (1 ≤ k ≤ n): the largest value v with at least k
        scores ≥ v, which is a score; bisection over the keys between the smallest and largest score, all
        ranks at once (32 rounds for float32, each a binary search per source)."""
        missing = sorted({int(k) for k in ranks} - self._kth.keys())
        if missing:
            if missing[0] < 1 or missing[-1] > self.n:
                raise ValueError(f"ranks run from 1 to {self.n}: {missing[0]}, {missing[-1]}")
            to_key, to_value = order_keys(self.row.dtype)
            wanted = np.array(missing)
            filled = [p for p in self.parts if len(p)]
            low = np.full(len(wanted), to_key(min(p[0] for p in filled)))
            high = np.full(len(wanted), to_key(max(p[-1] for p in filled)))
            one = low.dtype.type(1)
            while (open_ := low < high).any():
                gap = high - low
                middle = low + (gap >> one) + (gap & one)                   # the upper middle: no overflow
                enough = self.at_least(to_value(middle)).sum(axis=0) >= wanted
                low = np.where(open_ & enough, middle, low)
                high = np.where(open_ & ~enough, middle - one, high)
            self._kth.update(zip(missing, to_value(low).tolist()))
        return np.array([self._kth[int(k)] for k in ranks], dtype=self.row.dtype)

    def top_values(self, n: int) -> np.ndarray:
        tails = np.concatenate([p[-n:] for p in self.parts if len(p)])
        return np.sort(tails)[::-1][:n]


def query_ranks(ranked: RankedScores, ks: list[int], percents: list[float], more: list[int]) -> list[int]:
    """Every k whose k-th largest score one query's analyses read (to find them in one bisection): the top
    and bottom k of `source_counts_ranked`, the k of `cumulative_positive_ranked`, and `more`."""
    n = ranked.n
    ks = [min(k, n) for k in ks]
    wanted = {*ks, *(n - k + 1 for k in ks), *_cumulative_ks(n, ranked.positives(), percents), *more}
    return sorted(k for k in wanted if 1 <= k <= n)


def source_counts_ranked(ranked: RankedScores, ks: list[int]) -> dict:
    """`source_counts` without ordering the documents: a source's count in the top k is its number of
    scores above the k-th largest score, plus its share of the ties at that score taken in doc-id order
    (the stable sort's order; the bottom k take ties from the other end)."""
    n, split = ranked.n, ranked.split
    ks = [min(k, n) for k in ks]
    values = ranked.kth([*ks, *(n - k + 1 for k in ks)])
    at_least, above = ranked.at_least(values), ranked.above(values)
    result = {"top": {}, "bottom": {}}
    for i, k in enumerate(ks):
        for side, j in (("top", i), ("bottom", len(ks) + i)):
            if side == "top":      # better: above the value; the ties: at it
                better, with_ties = above[:, j], at_least[:, j]
            else:                  # below the value; at or below it
                better, with_ties = ranked.sizes - at_least[:, j], ranked.sizes - above[:, j]
            wanted = k - better.sum()
            if wanted == with_ties.sum() - better.sum():                     # every tie is in
                counts = with_ties
            else:                                                            # ties straddle the k-th place
                ties = np.flatnonzero(ranked.row == values[j])
                ties = ties[:wanted] if side == "top" else ties[::-1][:wanted]
                counts = better + np.bincount(split.codes[ties], minlength=split.n_sources)
            result[side][k] = counts
    return result


def _cumulative_ks(n_docs: int, positives: int, percents: list[float]) -> list[int]:
    """For each percent, how many of the top documents' positive scores its share sums (0: none)."""
    return [min(max(1, math.ceil(n_docs * p / 100)), positives) for p in percents]


def cumulative_positive_ranked(ranked: RankedScores, percents: list[float]) -> list[float]:
    """`cumulative_positive` from the scores sorted per source: the sum of the top k positive scores is the
    sum of those above the k-th largest plus its ties, and each source's scores are summed a band at a time
    from the top (each positive score added once, not once per percent). Equal to `cumulative_positive` up
    to the order of float64 additions."""
    parts = ranked.parts
    tops = _cumulative_ks(ranked.n, ranked.positives(), percents)
    sums, total, ends = {0: 0.0}, 0.0, [len(p) for p in parts]
    ks = sorted(set(tops) - {0})
    for k, value in zip(ks, ranked.kth(ks)):
        greater = 0
        for s, part in enumerate(parts):
            start = int(np.searchsorted(part, value, "right"))
            total += float(part[start:ends[s]].sum(dtype=np.float64))
            ends[s], greater = start, greater + len(part) - start
        sums[k] = total + (k - greater) * float(value)
    grand = total + sum(float(part[np.searchsorted(part, 0, "right"):ends[s]].sum(dtype=np.float64))
                        for s, part in enumerate(parts))
    return [sums[k] / grand if grand > 0 else 0.0 for k in tops]


def top_order(ranked: RankedScores, n: int) -> np.ndarray:
    """The first n positions of `np.argsort(-row, kind="stable")` (best first, ties in doc-id order)."""
    n = min(n, ranked.n)
    return top_order_above(ranked.row, ranked.kth([n])[0], n)


def top_order_above(row: np.ndarray, value: float, n: int) -> np.ndarray:
    """`top_order` given its n-th largest score `value` (`np.sort(row)[len(row) - n]`), n ≤ len(row): one pass
    over the row for the scores at or above it; only ties at `value` that straddle the n-th place are
    cut, keeping the first in doc-id order."""
    picks = np.flatnonzero(row >= value)
    if len(picks) > n:
        strictly = picks[row[picks] > value]
        picks = np.concatenate([strictly, picks[row[picks] == value][:n - len(strictly)]])
    return picks[np.lexsort((picks, -row[picks]))]


def best_rank(row: np.ndarray, members: np.ndarray) -> int | None:
    """The rank (1 = best, ties in doc-id order) of the best-placed of the documents at positions
    `members`, as `query_answer`'s first_rank; None when there are none."""
    if not len(members):
        return None
    value = row[members].max()
    first = members[row[members] == value][0]
    return int((row > value).sum() + (row[:first] == value).sum() + 1)
