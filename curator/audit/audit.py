"""`curator audit` and `curator compare`: the numbers behind the report.

The audit gathers the corpus composition from the catalog and, when a scored
run exists, the paper's analyses (curator/audit/analyses.py) on its scores. The
result is one JSON-ready dict; curator/audit/report.py draws the HTML from it, so
every figure's numbers are in the JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from curator import __version__
from curator.audit import analyses
from curator.catalog.database import Catalog
from curator.catalog.composition import composition, token_counts_available
from curator.errors import CuratorError
from curator.catalog.records import RunRecord, get_run, load_run_scores
from curator.catalog.workspace import Workspace

SECTIONS_NEEDING_SCORES = ["influence by source", "query correlations", "concentration", "answer occurrence"]


def audit(ws: Workspace, run_id: str | None = None) -> dict:
    with Catalog.open(ws) as catalog:
        has_runs = catalog.one("SELECT count(*) FROM runs")[0] > 0
        run = get_run(catalog, run_id) if (run_id or has_runs) else None
        tokenizer = None
        if run is not None:
            tokenizer = catalog.one("SELECT tokenizer_id FROM models WHERE id = ?", [run.model_id])[0]
        elif token_counts_available(catalog):
            tokenizer = token_counts_available(catalog)[0]
        comp = composition(catalog, tokenizer)
        report = {
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "curator_version": __version__,
            "workspace": str(ws.root),
            "composition": {"tokenizer": tokenizer, "rows": comp.to_dicts()},
            "run": None, "missing": [],
        }
        if run is None:
            report["missing"] = SECTIONS_NEEDING_SCORES
            return report
        queries = catalog.frame("SELECT id, task, answer FROM queries WHERE id IN (SELECT unnest(?))",
                                [run.query_ids])
        model = catalog.one("SELECT name FROM models WHERE id = ?", [run.model_id])
        scores = load_run_scores(run, ["query_id", "doc_id", "score"])
        query_ids, doc_ids, matrix = analyses.score_matrix(scores)
        docs = catalog.sql("SELECT id, source, text FROM documents WHERE id IN (SELECT unnest(?))",
                           [doc_ids.tolist()])
    source_of = {d: s for d, s, _ in docs}
    texts = {d: t for d, _, t in docs}
    tasks = dict(zip(queries["id"], queries["task"], strict=True))
    answers = dict(zip(queries["id"], queries["answer"], strict=True))
    report["run"] = _run_summary(run, model[0] if model else run.model_id, len(query_ids), len(doc_ids), tasks)
    doc_sources = [source_of[int(d)] for d in doc_ids]
    ks = analyses.k_values(len(doc_ids))
    report["influence_by_source"] = {
        task: analyses.source_ratios(matrix[[i for i, q in enumerate(query_ids) if tasks[q] == task]],
                                     doc_sources, ks)
        for task in sorted(set(tasks.values()))}
    report["correlations"] = analyses.correlations(matrix, query_ids, tasks)
    report["concentration"] = analyses.concentration(matrix, query_ids, tasks)
    report["answer_occurrence"] = analyses.answer_occurrence(matrix, query_ids, doc_ids, texts, answers, tasks)
    return report


def _run_summary(run: RunRecord, model: str, n_queries: int, n_docs: int, tasks: dict) -> dict:
    per_task: dict[str, int] = {}
    for task in tasks.values():
        per_task[task] = per_task.get(task, 0) + 1
    return {"id": run.id, "method": run.method, "model": model, "factors": run.factors_id, "queries": n_queries,
            "documents": n_docs, "queries_per_task": dict(sorted(per_task.items()))}


def compare(ws: Workspace, run_a: str, run_b: str, plot: Path | None = None) -> dict:
    """Per-query correlation of two runs over their common documents; writes the SVG plot to `plot`
    (default: reports/compare-A-B.svg in the workspace) and names it in the result."""
    from curator.audit.report import write_compare_plot

    with Catalog.open(ws) as catalog:
        a, b = get_run(catalog, run_a), get_run(catalog, run_b)
    frames = [load_run_scores(run, ["query_id", "doc_id", "score"]) for run in (a, b)]
    per_query = analyses.compare_runs(*frames)
    if not per_query:
        raise CuratorError(f"runs {a.id} and {b.id} share no (query, document) pairs to compare")
    values = list(per_query.values())
    result = {"run_a": a.id, "run_b": b.id, "per_query": per_query,
              "mean_pearson": sum(v["pearson"] for v in values) / len(values),
              "mean_spearman": sum(v["spearman"] for v in values) / len(values)}
    plot = Path(plot) if plot else ws.artifact_dir("reports") / f"compare-{a.id}-{b.id}.svg"
    write_compare_plot(result, plot)
    result["plot"] = str(plot)
    return result
