"""`curator audit`: the numbers behind the report (`curator compare` is curator/audit/compare.py).

The audit gathers the corpus composition from the catalog and, when a scored
run exists, the paper's analyses (curator/audit/analyses.py) on its scores. The
result is one JSON-ready dict; curator/audit/report.py draws the HTML from it, so
every figure's numbers are in the JSON.

The scores are held at most SLICE_BYTES at a time (curator/audit/slices.py):
the run's dataset is read into numpy slices (parts with a summary, as `curator
score` writes them: only their score column; other files through DuckDB),
  queries    groups of queries with all their documents: each query's
             concentration, top and bottom documents per source and answer
             ranks, from its scores sorted once per source;
  documents  blocks of documents with every query's scores: the query-by-query
             correlations (sums of products, `analyses.Gram`), read only when
             the queries do not all fit in one group (then the group is used);
and each answer is looked for in the texts of its query's top documents, every
text being searched (by DuckDB, `analyses.answer_re2`) only for an answer that
none of the top ANSWER_WIDER documents holds (looked at a tier at a time: the top 5,000, then 50,000).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from curator import __version__
from curator.arrays import numpy_of
from curator.audit import analyses
from curator.audit.slices import SliceMemory, document_blocks, not_full, queries_of, query_groups
from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, get_run
from curator.catalog.workspace import Workspace
from curator.curate.scores import arrow_batches, reading_scores, scores_view, summarised_parts
from curator.errors import CuratorError
from curator.influence.score_dataset import PartSummary
from curator.threads import one_blas_thread, thread_pool

SECTIONS_NEEDING_SCORES = ["influence by source", "query correlations", "concentration", "answer occurrence"]
GRAM_COLUMNS = 2**14           # documents per block of the correlations' sums of products
ANSWER_TOP = 500               # the paper's top documents searched for a query's answer
ANSWER_WIDER = (5_000, 50_000)  # searched next, tier by tier, for the best-placed document holding it
QUERY_THREADS = 2              # threads sorting and counting queries (beside the correlations' one)
ANSWER_QUERIES = 20            # queries whose answers are looked up together (one fetch of their texts)
READ_THREADS = 2               # threads reading score parts into the slice


def audit(ws: Workspace, run_id: str | None = None) -> dict:
    with Catalog.open(ws) as catalog:
        has_runs = catalog.one("SELECT count(*) FROM runs")[0] > 0
        run = get_run(catalog, run_id) if (run_id or has_runs) else None
        tokenizer = None
        if run is not None:
            tokenizer = catalog.one("SELECT tokenizer_id FROM models WHERE id = ?", [run.model_id])[0]
        else:
            from curator.catalog.composition import token_counts_available

            tokenizer = next(iter(token_counts_available(catalog)), None)
        report = {
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "curator_version": __version__,
            "workspace": str(ws.root), "composition": None, "run": None, "missing": [],
        }
        if run is None:
            report["composition"] = _composition(catalog, tokenizer)
            report["missing"] = SECTIONS_NEEDING_SCORES
            return report
        model = catalog.one("SELECT name FROM models WHERE id = ?", [run.model_id])
        with one_blas_thread(), thread_pool(READ_THREADS) as readers, thread_pool(1) as side:
            with reading_scores(run):
                scores = _start_reading(catalog, run, readers)
                # The documents' sources while the scores are read (the reads release the GIL): the first
                # query batch read is analysed with them. Inside `reading_scores`: without a range of ids
                # they are found by reading the scores through DuckDB.
                documents = _documents_of(catalog, run, len(scores.query_ids), scores.dense)
            # The composition, which only the report needs, on its own connection beside the reads and the
            # analyses, outside `reading_scores`, whose errors name the score files.
            composition = side.submit(_composition_apart, catalog.cursor(), tokenizer)
            with reading_scores(run):
                report.update(_run_analyses(catalog, run, model[0] if model else run.model_id, scores, documents,
                                            readers))
            report["composition"] = composition.result()
    return report


def _composition(catalog: Catalog, tokenizer: str | None) -> dict:
    # Imported here: polars (a sixth of a second) then loads while the scores are read, not before.
    from curator.catalog.composition import composition

    return {"tokenizer": tokenizer, "rows": composition(catalog, tokenizer).to_dicts()}


def _composition_apart(cursor: Catalog, tokenizer: str | None) -> dict:
    """`_composition` on a cursor of its own (`Catalog.cursor`), on a thread of its own; closes it."""
    with cursor:
        return _composition(cursor, tokenizer)


class _Reading(NamedTuple):
    """A run's scores as the audit reads them: its parts (None: read through DuckDB), its queries, its
    doc-id range when dense, the slices (`query_groups`), the first one's reads already started when the
    ids are a range, and the memory every slice is read into in turn."""
    parts: list[PartSummary] | None
    query_ids: list[str]
    dense: tuple[int, int] | None
    groups: Iterator | None
    memory: SliceMemory


def _start_reading(catalog: Catalog, run: RunRecord, readers: ThreadPoolExecutor) -> _Reading:
    """`_Reading` of the run. When its parts have summaries and its ids are a range (as `curator score`
    writes them), the documents are known without the catalog, so the first slice starts filling on
    `readers` now, while the catalog answers the composition and the documents' sources."""
    scores_view(catalog, run)
    parts = summarised_parts(run)
    query_ids, dense = queries_of(catalog, run, parts)
    groups, memory = None, SliceMemory()
    if parts is not None and dense:
        doc_ids = np.arange(dense[0], dense[1] + 1, dtype=np.int64)
        groups = query_groups(catalog, run, query_ids, doc_ids, parts, readers, memory)
        groups = itertools.chain([next(groups)], groups)
    return _Reading(parts, query_ids, dense, groups, memory)


def _run_analyses(catalog: Catalog, run: RunRecord, model: str, scores: _Reading,
                  documents: tuple[np.ndarray, np.ndarray, list[str]], readers: ThreadPoolExecutor) -> dict:
    parts, query_ids = scores.parts, scores.query_ids
    doc_ids, doc_codes, sources = documents
    queries = catalog.frame("SELECT id, task, answer FROM queries WHERE id IN (SELECT unnest(?))", [query_ids])
    tasks = dict(zip(queries["id"], queries["task"], strict=True))
    unknown = [q for q in query_ids if q not in tasks]
    if unknown:
        raise CuratorError(f"the scores of run {run.id} hold queries the catalog does not know: {', '.join(unknown[:5])}")
    answers = {q: a for q, a in zip(queries["id"], queries["answer"], strict=True) if a and a.strip()}
    ks = analyses.k_values(len(doc_ids))
    split = analyses.SourceSplit(doc_codes, len(sources))
    gram = analyses.Gram(len(query_ids))
    counts, concentration, occurrence = {}, {}, {}
    groups = scores.groups or query_groups(catalog, run, query_ids, doc_ids, parts, readers, scores.memory)
    with thread_pool(1) as background, thread_pool(QUERY_THREADS) as workers:
        summed = None
        for group, matrix, complete in groups:
            # Each query's sort and counts start as soon as its rows are read (a query batch at a time),
            # while the next batch is read: numpy's sorts and pyarrow's reads release the GIL.
            analysed = [(p, workers.submit(_query_analyses, matrix[p], split, ks, group[p] in answers))
                        for positions in complete for p in positions]
            if len(group) == len(query_ids):        # every query in one slice: its columns are the blocks
                # The sums of products (BLAS, which releases the GIL) run on their own thread while the
                # others sort and count each query's scores: all of them only read the slice.
                summed = background.submit(lambda m=matrix: [gram.add(m[:, start:start + GRAM_COLUMNS])
                                                             for start in range(0, m.shape[1], GRAM_COLUMNS)])
            # The answers are looked up a few queries at a time as their analyses end, while the workers
            # sort the next ones (DuckDB fetches the texts without the GIL; the tests are short).
            rows, tops, wider = dict(zip(group, matrix, strict=True)), {}, {}
            for number, (p, future) in enumerate(analysed, start=1):    # in the order they were started
                query_id = group[p]
                try:
                    row_counts, row_concentration, top, tiers = future.result()
                except analyses.ScoresNotANumber:
                    raise CuratorError(f"the scores of run {run.id} hold NaN for query {query_id}: a score "
                                       f"dataset written by `curator score` has none (it stops on them)") from None
                counts[query_id], concentration[query_id] = row_counts, row_concentration
                if query_id in answers:
                    tops[query_id], wider[query_id] = top, tiers
                if tops and (len(tops) == ANSWER_QUERIES or number == len(analysed)):
                    occurrence.update(_answer_ranks(catalog, rows, tops, wider, answers, doc_ids))
                    tops, wider = {}, {}
        if summed is not None:
            summed.result()
    matrix = rows = None        # the last group's slice: its memory is lent to the document blocks now
    if gram.n == 0:
        _gram_of_blocks(gram, document_blocks(catalog, run, query_ids, doc_ids, parts, scores.memory, readers))
    return {
        "run": _run_summary(run, model, len(query_ids), len(doc_ids), tasks),
        "influence_by_source": {
            task: analyses.source_ratios([counts[q] for q in query_ids if tasks[q] == task], sources, doc_codes, ks)
            for task in sorted(set(tasks.values()))},
        "correlations": analyses.correlations(gram.correlation(), query_ids, tasks),
        "concentration": analyses.concentration(concentration, query_ids, tasks),
        "answer_occurrence": analyses.answer_occurrence(
            {q: occurrence[q] for q in query_ids if q in occurrence}, tasks),
    }


def _gram_of_blocks(gram: analyses.Gram, blocks) -> None:
    """The sums of products of the document blocks, GRAM_COLUMNS documents at a time, alternately into
    `gram` and a second one on two threads (nothing else runs then: one left a core idle), merged at the
    end. Every run cuts and deals the columns the same way, so the sums come out the same. A block is
    finished with before the next is asked for (its memory is read into again)."""
    second = analyses.Gram(len(gram.mean))
    with thread_pool(1) as one, thread_pool(1) as other:
        for block in blocks:
            starts = range(0, block.shape[1], GRAM_COLUMNS)
            adds = [(one, gram) if i % 2 == 0 else (other, second) for i in range(len(starts))]
            for added in [pool.submit(into.add, block[:, start:start + GRAM_COLUMNS])
                          for (pool, into), start in zip(adds, starts)]:
                added.result()
    gram.merge(second)


def _query_analyses(row: np.ndarray, split: analyses.SourceSplit, ks: list[int], top: bool):
    """One query's source counts, concentration and, with `top`, its ANSWER_TOP best positions and its
    k-th largest score for each k of ANSWER_WIDER, from its scores sorted once per source (numpy's sorts
    and searches release the GIL, so queries run on QUERY_THREADS threads)."""
    ranked = analyses.RankedScores(row, split)
    wider = [k for k in ANSWER_WIDER if k < len(row)] if top else []
    more = [min(ANSWER_TOP, len(row)), *wider] if top else []         # the k `top_order` reads, too
    ranked.kth(analyses.query_ranks(ranked, ks, analyses.PERCENTS, more))
    concentration = {"cumulative": analyses.cumulative_positive_ranked(ranked, analyses.PERCENTS),
                     "power_law": analyses.power_law(ranked.top_values(500).astype(np.float64), presorted=True)}
    counts = analyses.source_counts_ranked(ranked, ks)
    if not top:
        return counts, concentration, None, None
    return counts, concentration, analyses.top_order(ranked, ANSWER_TOP), list(zip(wider, ranked.kth(wider)))


def _documents_of(catalog: Catalog, run: RunRecord, n_queries: int,
                  dense: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The run's document ids in order (also as the temporary table audit_docs), each one's source as a
    code into the sorted source names, and those names. Every query must score every document: with
    consecutive ids the counts per query say so; otherwise a grouping by document checks it."""
    if dense:
        catalog.sql("CREATE OR REPLACE TEMP TABLE audit_docs AS SELECT range AS doc_id FROM range(?, ?)",
                    [dense[0], dense[1] + 1])
    else:
        catalog.sql("CREATE OR REPLACE TEMP TABLE audit_docs AS "
                    "SELECT doc_id, count(*) AS n FROM scores GROUP BY doc_id ORDER BY doc_id")
        partial = catalog.one("SELECT doc_id, n FROM audit_docs WHERE n <> ? ORDER BY doc_id LIMIT 1", [n_queries])
        if partial:
            raise not_full(run, partial[0], partial[1], n_queries)
    if dense:     # a range of ids: read it (5× faster than the join with audit_docs, measured at 2M)
        table = catalog.con.sql("SELECT id AS doc_id, source FROM documents WHERE id BETWEEN ? AND ? ORDER BY id",
                                params=[dense[0], dense[1]]).to_arrow_table()
        if table.num_rows != dense[1] - dense[0] + 1:
            held = numpy_of(table.column("doc_id"))
            gap = np.flatnonzero(held != np.arange(dense[0], dense[0] + len(held)))
            missing = dense[0] + (int(gap[0]) if len(gap) else len(held))
            raise CuratorError(f"run {run.id} scored document {missing}, which the catalog no longer holds")
    else:
        table = catalog.con.sql("SELECT a.doc_id, d.source FROM audit_docs a LEFT JOIN documents d "
                                "ON d.id = a.doc_id ORDER BY a.doc_id").to_arrow_table()
    doc_ids = numpy_of(table.column("doc_id"))
    source = table.column("source")
    if source.null_count:
        missing = doc_ids[np.flatnonzero(source.is_null().to_numpy(zero_copy_only=False))[0]]
        raise CuratorError(f"run {run.id} scored document {missing}, which the catalog no longer holds")
    encoded = source.dictionary_encode().combine_chunks()
    names = encoded.dictionary.to_pylist()
    order = np.argsort(names)                        # codes into the sorted names
    codes = np.argsort(order)[numpy_of(encoded.indices)]
    return doc_ids, codes.astype(np.int64), [names[i] for i in order]


def _answer_ranks(catalog: Catalog, rows: dict[str, np.ndarray], tops: dict[str, np.ndarray],
                  wider: dict[str, list], answers: dict[str, str], doc_ids: np.ndarray) -> dict[str, dict]:
    """`analyses.query_answer` of each query in `tops` (its ANSWER_TOP best positions, in order) without
    matching every text: the answer is looked for in the texts of those documents, then of the next best
    a tier of ANSWER_WIDER at a time (`wider`: each query's tiers) where none holds it, and only then in
    every text (by DuckDB, for those answers alone)."""
    result = {}
    texts = _texts(catalog, doc_ids[np.unique(np.concatenate(list(tops.values())))] if tops else [])
    for query_id, top in tops.items():
        found = analyses.answer_finder(answers[query_id])
        has = np.array([found(texts[d]) for d in doc_ids[top]], dtype=bool)
        first = int(np.argmax(has)) + 1 if has.any() else None
        if first is None and len(top) < len(doc_ids):
            first = _first_rank_beyond(catalog, rows[query_id], wider[query_id], found, answers[query_id],
                                       doc_ids)
        result[query_id] = {"answer": answers[query_id], "top": int(min(ANSWER_TOP, len(doc_ids))),
                            "contains": int(has[:ANSWER_TOP].sum()), "first_rank": first}
    return result


def _first_rank_beyond(catalog: Catalog, row: np.ndarray, tiers: list[tuple[int, float]], found, answer: str,
                       doc_ids: np.ndarray) -> int | None:
    """The rank of the best document holding the answer when none of the top ANSWER_TOP does. `tiers`:
    (k, the row's k-th largest score) for each k of ANSWER_WIDER below the row's length; each tier's
    texts are read only when the tier before holds no answer (most answers of a reasoning query are
    in the next few thousand), then the whole row's when it is short, then every text by DuckDB."""
    n, checked = len(row), min(ANSWER_TOP, len(row))
    steps = [*tiers, *([(n, None)] if n <= ANSWER_WIDER[-1] else [])]
    for k, value in steps:
        order = np.argsort(-row, kind="stable") if value is None else analyses.top_order_above(row, value, k)
        fresh = doc_ids[order[checked:]]
        texts = _texts(catalog, fresh)
        has = np.array([found(texts[d]) for d in fresh], dtype=bool)
        if has.any():
            return checked + int(np.argmax(has)) + 1
        checked = k
    if checked >= n:
        return None
    return analyses.best_rank(row, np.flatnonzero(_answer_documents(catalog, doc_ids, {answer})[answer]))


def _texts(catalog: Catalog, ids) -> dict[int, str]:
    """The texts of the documents `ids`, by id."""
    if not len(ids):
        return {}
    return dict(catalog.sql("SELECT id, text FROM documents WHERE id IN (SELECT unnest(?::BIGINT[]))",
                            [[int(i) for i in ids]]))


def _answer_documents(catalog: Catalog, doc_ids: np.ndarray, answers: set[str]) -> dict[str, np.ndarray]:
    """For each answer, a boolean per run document (doc-id order): does its text contain the answer as a
    whole token? One scan of the texts for all answers."""
    found = {answer: np.zeros(len(doc_ids), dtype=bool) for answer in answers}
    if not answers:
        return found
    ordered = sorted(answers)
    tests = ", ".join("regexp_matches(d.text, ?)" for _ in ordered)
    query = (f"SELECT a.doc_id, [{tests}] AS hits FROM audit_docs a JOIN documents d ON d.id = a.doc_id "
             f"WHERE list_bool_or([{tests}])")
    patterns = [analyses.answer_re2(a) for a in ordered]
    for batch in arrow_batches(catalog, query, patterns + patterns):
        positions = np.searchsorted(doc_ids, numpy_of(batch.column("doc_id")))
        hits = np.array(batch.column("hits").to_pylist(), dtype=bool).reshape(len(positions), len(ordered))
        for j, answer in enumerate(ordered):
            found[answer][positions[hits[:, j]]] = True
    return found


def _run_summary(run: RunRecord, model: str, n_queries: int, n_docs: int, tasks: dict) -> dict:
    per_task: dict[str, int] = {}
    for task in tasks.values():
        per_task[task] = per_task.get(task, 0) + 1
    return {"id": run.id, "method": run.method, "model": model, "factors": run.factors_id, "queries": n_queries,
            "documents": n_docs, "queries_per_task": dict(sorted(per_task.items()))}
