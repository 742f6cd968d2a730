"""The audit report: one self-contained HTML file drawn from the audit's JSON.

Plots are matplotlib SVG inlined in the page, so it opens offline and prints
sharply; every number in a plot is also in the JSON written beside it.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1.5em;
color:#1d2327}
h1{font-size:1.7em;margin-bottom:.1em}h2{margin-top:2.2em;border-bottom:2px solid #e2e6ea;padding-bottom:.2em}
.meta{color:#5c6670}.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{padding:.25em .8em;text-align:right;
border-bottom:1px solid #e2e6ea}th{background:#f4f6f8}td:first-child,th:first-child{text-align:left}
.plot{margin:.5em 0}.plot svg{max-width:100%;height:auto}.explain{color:#3b444b;max-width:80ch}
"""

PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00", "#b82e2e",
           "#316395"]


def _svg(fig) -> str:
    buffer = io.StringIO()
    # The figures lay themselves out (constrained layout): bbox_inches="tight" would draw each one twice.
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return f'<div class="plot">{text[text.index("<svg"):]}</div>'


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


STYLE = {"font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none"}


def _figure(width=8.0, height=3.6, panels: int | None = None):
    """A figure and its axes (`panels`: that many stacked axes, as an array). Figures are made without
    pyplot (its import and its figure manager were a fifth of a large audit's report), so nothing opens a
    window and nothing needs closing."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(STYLE)
    figure = Figure(figsize=(width, height), layout="constrained")
    if panels is None:
        return figure, figure.subplots()
    return figure, figure.subplots(panels, 1, squeeze=False)[:, 0]


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
    fig, ax = _figure(8, 0.9 + 0.55 * len(rows))
    labels = [f"{r['source']} ({r['kind']})" for r in rows]
    series = [("documents", [r["docs_share"] for r in rows]),
              ("bytes", [r["bytes"] / (sum(x["bytes"] for x in rows) or 1) for r in rows])]
    if tokens_known and total_tokens:
        series.append(("tokens", [r["tokens"] / total_tokens for r in rows]))
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.barh([y - 0.4 + height * (i + 0.5) for y in range(len(rows))], values, height=height * 0.95,
                color=PALETTE[i], label=name)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_xlabel("share of the corpus")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(rows) > 2 else -0.5), ncol=3, frameon=False)
    note = "" if tokens_known else "<p class='explain'>Token counts appear once a model has tokenized every " \
                                   "document (<code>curator score</code>).</p>"
    return f"<h2>1. Corpus composition</h2>{table}{note}{_svg(fig)}"


def source_section(data: dict) -> str:
    parts = ["<h2>2. Influence by source</h2><p class='explain'>For each task, each source's share of a query's "
             "top-k (most helpful) and bottom-k (most harmful) documents, averaged over the task's queries and "
             "divided by the source's share of the corpus. Above 1: the source is over-represented among the "
             "documents that drive the task (Ruis et al. 2024 found code and maths over-represented for "
             "reasoning).</p>"]
    import numpy as np

    tasks = list(data["influence_by_source"].items())
    if not tasks:
        return "".join(parts)
    # One figure with a panel per task and one legend: each figure costs a layout and an SVG pass of its
    # own (four task figures were a second of a 2M-document audit).
    fig, panels = _figure(9, 0.9 + 2.4 * len(tasks), panels=len(tasks))
    tables = []
    for axes, (task, result) in zip(panels, tasks, strict=True):
        sources = sorted(result["corpus_share"])
        ks = list(result["top"])
        width = min(0.8 / (2 * len(ks)), 0.12)
        x = np.arange(len(sources))
        for i, k in enumerate(ks):
            axes.bar(x + (2 * i) * width - 0.4, [result["top"][k][s] for s in sources], width,
                     color=PALETTE[i % len(PALETTE)], label=f"top {k}")
            axes.bar(x + (2 * i + 1) * width - 0.4, [result["bottom"][k][s] for s in sources], width,
                     color=PALETTE[i % len(PALETTE)], alpha=0.35, label=f"bottom {k}")
        axes.axhline(1, color="#555", lw=0.8, ls="--")
        axes.set_xticks(x - 0.4 + width * len(ks) - width / 2, sources)
        axes.set_ylabel("share / corpus share")
        axes.set_title(f"{task}", loc="left")
        rows = [[s, f"{result['corpus_share'][s]:.1%}", *[result["top"][k][s] for k in ks],
                 *[result["bottom"][k][s] for k in ks]] for s in sources]
        tables.append(f"<h3>{html.escape(task)}</h3>" + _table(
            ["source", "corpus share", *[f"top {k}" for k in ks], *[f"bottom {k}" for k in ks]], rows))
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=min(6, len(labels)), fontsize=8, frameon=False, loc="outside lower center")
    return "".join(parts) + _svg(fig) + "".join(tables)


def correlation_section(data: dict) -> str:
    corr = data["correlations"]
    import numpy as np

    n = len(corr["query_ids"])
    # Queries grouped by task (in id order within one), whatever order their ids put them in: one block
    # per task, and one pair of separating lines per task rather than per query.
    order = sorted(range(n), key=lambda i: corr["tasks"][i])
    matrix = np.array(corr["matrix"])[np.ix_(order, order)]
    tasks = [corr["tasks"][i] for i in order]
    fig, ax = _figure(min(9, 2 + 0.3 * n), min(8, 1.6 + 0.3 * n))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    boundaries = [i for i in range(1, n) if tasks[i] != tasks[i - 1]]
    for b in boundaries:
        ax.axhline(b - 0.5, color="k", lw=1)
        ax.axvline(b - 0.5, color="k", lw=1)
    starts = [0, *boundaries]
    ends = [*boundaries, n]
    ax.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)],
                  [tasks[s] for s in starts], rotation=30, ha="right")
    ax.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)], [tasks[s] for s in starts])
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    rows = [[task, value] for task, value in corr["mean_within_task"].items()]
    rows.append(["across tasks", corr["mean_across_tasks"]])
    return ("<h2>3. Query-by-query correlation</h2><p class='explain'>Pearson correlation between two queries' "
            "influence scores over all documents, queries grouped by task. High correlation within a task "
            "means its queries draw on the same documents: shared procedural knowledge.</p>"
            + _svg(fig) + _table(["mean correlation", "r"], rows))


def concentration_section(data: dict) -> str:
    conc = data["concentration"]
    fig, ax = _figure(7, 3.4)
    for i, (task, result) in enumerate(conc["per_task"].items()):
        ax.plot(conc["percents"], result["cumulative"], marker="o", ms=3, color=PALETTE[i % len(PALETTE)],
                label=task)
    ax.set_xscale("log")
    ax.set_xticks(conc["percents"], [f"{p:g}%" for p in conc["percents"]])
    ax.minorticks_off()
    ax.set_xlabel("top k% of documents (log scale)")
    ax.set_ylabel("share of positive influence")
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.legend(frameon=False)
    rows = [[task, r["alpha_mean"], r["alpha_se_mean"],
             sum(1 for q in conc["per_query"].values() if q["task"] == task and q["power_law"])]
            for task, r in conc["per_task"].items()]
    return ("<h2>4. Concentration of influence</h2><p class='explain'>How much of a query's total positive "
            "influence its top k% of documents hold (a task whose curve rises slowly draws on many documents, "
            "as the paper found for reasoning), and a power-law fit log(score) = c − α·log(rank) over each "
            "query's top 500 positive scores.</p>"
            + _svg(fig) + _table(["task", "mean α", "mean s.e. of α", "queries fitted"], rows))


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
    fig, ax = _figure(max(5, 0.35 * len(per_query) + 2), 3.2)
    names = list(per_query)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [per_query[n]["pearson"] for n in names], 0.4, color=PALETTE[0], label="Pearson")
    ax.bar([i + 0.2 for i in x], [per_query[n]["spearman"] for n in names], 0.4, color=PALETTE[2],
           label="Spearman")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(min(0, *(v["pearson"] for v in per_query.values())) - 0.05, 1.05)
    ax.set_title(f"{result['run_a']} vs {result['run_b']}", loc="left")
    ax.legend(frameon=False)
    return _svg(fig)


def write_report(data: dict, out: Path, json_out: Path | None = None) -> None:
    """The HTML report (and, if asked, the JSON behind it), each written whole or not at all."""
    import json

    from curator.artifacts import write_text_atomic

    write_text_atomic(out, render(data))
    if json_out:
        write_text_atomic(json_out, json.dumps(data, indent=1, default=str))


def write_compare_plot(result: dict, path: Path) -> None:
    from curator.artifacts import write_text_atomic

    svg = compare_plot(result)
    write_text_atomic(path, svg[svg.index("<svg"):svg.rindex("</svg>") + 6])
