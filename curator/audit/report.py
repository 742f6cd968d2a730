"""The audit report: one self-contained HTML file drawn from the audit's JSON.

Charts are SVG inlined in the page (curator/plots.py), so it opens offline and prints
sharply; every number in a chart is also in the JSON written beside it.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from curator import plots
from curator.plots import PALETTE, Series

CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1.5em;
color:#1d2327}
h1{font-size:1.7em;margin-bottom:.1em}h2{margin-top:2.2em;border-bottom:2px solid #e2e6ea;padding-bottom:.2em}
.meta{color:#5c6670}.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{padding:.25em .8em;text-align:right;
border-bottom:1px solid #e2e6ea}th{background:#f4f6f8}td:first-child,th:first-child{text-align:left}
.plot{margin:.5em 0}.plot svg{max-width:100%;height:auto}.explain{color:#3b444b;max-width:80ch}
"""


def _plot(svg: str) -> str:
    return f'<div class="plot">{svg}</div>'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))
    # Text columns read left-aligned, numbers (and percentages) right-aligned.
    text = [bool(rows) and isinstance(rows[0][i], str) and not rows[0][i].endswith("%") for i in range(len(header))]
    align = ["left" if t else "right" for t in text]
    head = "".join(f"<th style='text-align:{a}'>{html.escape(h)}</th>" for h, a in zip(header, align, strict=True))
    body = "".join("<tr>" + "".join(f"<td style='text-align:{a}'>{cell(v)}</td>" for v, a in zip(row, align,
                                                                                                  strict=True))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def composition_section(data: dict) -> str:
    rows = data["composition"]["rows"]
    if not rows:
        return "<h2>1. Corpus composition</h2><p class='note'>The catalog has no documents yet.</p>"
    tokens_known = all(r["tokens"] is not None for r in rows)
    total_tokens = sum(r["tokens"] or 0 for r in rows)
    table = _table(
        ["source", "kind", "documents", "tokens", "bytes", "share of documents", "share of tokens"],
        [[r["source"], r["kind"], r["documents"], r["tokens"], r["bytes"], f"{r['docs_share']:.1%}",
          f"{r['tokens'] / total_tokens:.1%}" if tokens_known and total_tokens else "–"] for r in rows])
    labels = [f"{r['source']} ({r['kind']})" for r in rows]
    series = [("documents", [r["docs_share"] for r in rows]),
              ("bytes", [r["bytes"] / (sum(x["bytes"] for x in rows) or 1) for r in rows])]
    if tokens_known and total_tokens:
        series.append(("tokens", [r["tokens"] / total_tokens for r in rows]))
    chart = plots.horizontal(labels, [Series(name, values, PALETTE[i]) for i, (name, values) in enumerate(series)],
                             x_label="share of the corpus")
    note = "" if tokens_known else "<p class='explain'>Token counts appear once a model has tokenized every " \
                                   "document (<code>curator score</code>).</p>"
    return f"<h2>1. Corpus composition</h2>{table}{note}{_plot(chart)}"


def source_section(data: dict) -> str:
    parts = ["<h2>2. Influence by source</h2><p class='explain'>For each task, each source's share of a query's "
             "top-k (most helpful) and bottom-k (most harmful) documents, averaged over the task's queries and "
             "divided by the source's share of the corpus. Above 1: the source is over-represented among the "
             "documents that drive the task (Ruis et al. 2024 found code and maths over-represented for "
             "reasoning).</p>"]
    tasks = list(data["influence_by_source"].items())
    if not tasks:
        return "".join(parts)
    panels, tables = [], []
    for task, result in tasks:
        sources = sorted(result["corpus_share"])
        ks = list(result["top"])
        series = []
        for i, k in enumerate(ks):
            color = PALETTE[i % len(PALETTE)]
            series += [Series(f"top {k}", [result["top"][k][s] for s in sources], color),
                       Series(f"bottom {k}", [result["bottom"][k][s] for s in sources], color, opacity=0.35)]
        panels.append(plots.bars(sources, series, title=task, y_label="share / corpus share", reference=1.0,
                                 legend=False))
        rows = [[s, f"{result['corpus_share'][s]:.1%}", *[result["top"][k][s] for k in ks],
                 *[result["bottom"][k][s] for k in ks]] for s in sources]
        tables.append(f"<h3>{html.escape(task)}</h3>" + _table(
            ["source", "corpus share", *[f"top {k}" for k in ks], *[f"bottom {k}" for k in ks]], rows))
    # One figure with a panel per task and one legend (the k's are the same for every task).
    return "".join(parts) + _plot(plots.stack(panels)) + "".join(tables)


def correlation_section(data: dict) -> str:
    corr = data["correlations"]
    n = len(corr["query_ids"])
    # Queries grouped by task (in id order within one), whatever order their ids put them in: one block
    # per task, and one pair of separating lines per task rather than per query.
    order = sorted(range(n), key=lambda i: corr["tasks"][i])
    matrix = np.array(corr["matrix"], dtype=np.float64)[np.ix_(order, order)]
    chart = plots.heatmap(matrix, [corr["tasks"][i] for i in order], label="Pearson r")
    rows = [[task, value] for task, value in corr["mean_within_task"].items()]
    rows.append(["across tasks", corr["mean_across_tasks"]])
    return ("<h2>3. Query-by-query correlation</h2><p class='explain'>Pearson correlation between two queries' "
            "influence scores over all documents, queries grouped by task. High correlation within a task "
            "means its queries draw on the same documents: shared procedural knowledge.</p>"
            + _plot(chart) + _table(["mean correlation", "r"], rows))


def concentration_section(data: dict) -> str:
    conc = data["concentration"]
    series = [Series(task, result["cumulative"], PALETTE[i % len(PALETTE)], x=conc["percents"], markers=True)
              for i, (task, result) in enumerate(conc["per_task"].items())]
    chart = plots.lines(series, x_log=True, x_ticks=[(p, f"{p:g}%") for p in conc["percents"]],
                        x_label="top k% of documents (log scale)", y_label="share of positive influence",
                        y_fmt=plots.percent, x_fmt=lambda p: f"{p:g}%")
    rows = [[task, r["alpha_mean"], r["alpha_se_mean"],
             sum(1 for q in conc["per_query"].values() if q["task"] == task and q["power_law"])]
            for task, r in conc["per_task"].items()]
    return ("<h2>4. Concentration of influence</h2><p class='explain'>How much of a query's total positive "
            "influence its top k% of documents hold (a task whose curve rises slowly draws on many documents, "
            "as the paper found for reasoning), and a power-law fit log(score) = c − α·log(rank) over each "
            "query's top 500 positive scores.</p>"
            + _plot(chart) + _table(["task", "mean α", "mean s.e. of α", "queries fitted"], rows))


def answer_section(data: dict) -> str:
    occ = data["answer_occurrence"]
    if not occ["per_query"]:
        return ("<h2>5. Answer occurrence</h2><p class='note'>No scored query has an answer string to look "
                "for.</p>")
    summary = [[g, s["queries"], s["mean_documents_with_answer"], s["queries_with_any"],
                s.get("median_first_rank")] for g, s in occ["summary"].items()]
    rows = [[q, r["task"], r["answer"], r["contains"], r["top"], r.get("first_rank")]
            for q, r in occ["per_query"].items()]
    return (f"<h2>5. Answer occurrence</h2><p class='explain'>How many of each query's top {occ['top']} documents "
            "contain its answer as a whole token (for reasoning queries the final answer; the paper found "
            "answers in top documents for factual queries far more than for reasoning ones), and the rank of "
            "the most helpful document that contains it (1 = the top document).</p>"
            + _table(["queries", "count", "mean documents with the answer", "queries with any",
                      "median rank of the first with it"], summary)
            + "<details><summary>Per query</summary>"
            + _table(["query", "task", "answer", "top documents with it", "of", "rank of the first with it"], rows)
            + "</details>")


def render(data: dict) -> str:
    run = data["run"]
    header = (f"<h1>curator audit</h1><p class='meta'>Workspace {html.escape(data['workspace'])} · generated "
              f"{data['generated']} · curator {data['curator_version']}</p>")
    if run:
        header += (f"<p class='meta'>Run <b>{html.escape(run['id'])}</b> ({run['method']}) of "
                   f"{html.escape(run['model'])}: {run['queries']} queries "
                   f"({', '.join(f'{t} {n}' for t, n in run['queries_per_task'].items())}) × "
                   f"{run['documents']:,} documents.</p>")
    body = [composition_section(data)]
    if data["missing"]:
        body.append("<div class='note'><b>Needs a scored run:</b> " + ", ".join(data["missing"])
                    + ". Fit factors and score queries (<code>curator fit</code>, <code>curator queries "
                      "generate</code>, <code>curator score</code>), then run the audit again.</div>")
    else:
        body += [source_section(data), correlation_section(data), concentration_section(data),
                 answer_section(data)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>curator audit</title>"
            f"<style>{CSS}</style></head><body>{header}{''.join(body)}</body></html>")


def compare_plot(result: dict) -> str:
    """An SVG of per-query Pearson and Spearman between two runs."""
    per_query = result["per_query"]
    names = list(per_query)
    series = [Series("Pearson", [per_query[n]["pearson"] for n in names], PALETTE[0]),
              Series("Spearman", [per_query[n]["spearman"] for n in names], PALETTE[2])]
    chart = plots.bars(names, series, width=max(420, 26 * len(names) + 120), height=300,
                       title=f"{result['run_a']} vs {result['run_b']}", y_label="correlation", rotate=60)
    return plots.svg(chart.width, chart.height, chart.body)


def write_report(data: dict, out: Path, json_out: Path | None = None) -> None:
    """The HTML report (and, if asked, the JSON behind it), each written whole or not at all."""
    import json

    from curator.artifacts import write_text_atomic

    write_text_atomic(out, render(data))
    if json_out:
        write_text_atomic(json_out, json.dumps(data, indent=1, default=str))


def write_compare_plot(result: dict, path: Path) -> None:
    from curator.artifacts import write_text_atomic

    write_text_atomic(path, compare_plot(result))
