"""The evaluation report: one self-contained HTML page and the JSON it is drawn from.

The plot (held-out reasoning loss over training tokens, per arm) is SVG inlined in the page (curator/plots.py),
as in the audit report; every number in the page is in the JSON.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from curator.artifacts import write_text_atomic
from curator import plots
from curator.audit.report import CSS
from curator.plots import PALETTE, Series

COLUMNS = [("reasoning_loss", "reasoning loss (nats/token)"), ("factual_loss", "control loss (nats/token)"),
           ("general_ppl", "held-out text perplexity"), ("accuracy", "exact-match accuracy")]


def _num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    if stat.get("same"):
        return f"{_num(stat['mean'])} <span class='meta'>(every seed)</span>"
    if stat["low"] is None:
        return _num(stat["mean"])
    return f"{_num(stat['mean'])} <span class='meta'>[{_num(stat['low'])}, {_num(stat['high'])}]</span>"


def _table(data: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["arm", "seeds", "documents", "trained tokens",
                                                          *[c[1] for c in COLUMNS]])
    rows = []
    for arm, stats in data["summary"].items():
        info = data["arms"][arm]
        cells = [html.escape(arm), str(stats["reasoning_loss"]["n"]), f"{info['documents']:,}" if
                 info["documents"] is not None else "–", f"{info['trained_tokens']:,}"]
        cells += [_cell(stats[key]) for key, _ in COLUMNS]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _span(low, high) -> str:
    return "–" if low is None else f"[{_num(low)}, {_num(high)}]"


def _comparisons(data: dict) -> str:
    """Every mixture against every other arm, per metric: the improvement (positive: the mixture did better),
    its interval over seeds and over held-out queries, and the verdict."""
    names = dict(COLUMNS)
    head = "".join(f"<th>{h}</th>" for h in ["mixture", "against", "metric", "improvement", "95% over seeds",
                                              "95% over held-out queries", "verdict"])
    rows = []
    for c in data["comparisons"]:
        q = c.get("queries")
        over_queries = _span(q["low"], q["high"]) if q else f"– <span class='meta'>" \
                                                            f"({html.escape(c.get('queries_note') or '')})</span>"
        cells = [html.escape(c["mixture"]), html.escape(c["against"]), html.escape(names[c["metric"]]),
                 _num(c["mean"]), _span(c["low"], c["high"]), over_queries, html.escape(c["verdict"])]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _per_task(data: dict) -> str:
    tasks = sorted({t for r in data["results"] for t in r["per_task_loss"]})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["arm", *[f"{t} loss" for t in tasks],
                                                          *[f"{t} accuracy" for t in sorted(
                                                              {t for r in data["results"]
                                                               for t in r["per_task_accuracy"]})]])
    acc_tasks = sorted({t for r in data["results"] for t in r["per_task_accuracy"]})
    rows = []
    for arm in data["summary"]:
        mine = [r for r in data["results"] if r["arm"] == arm]
        losses = [sum(r["per_task_loss"].get(t, 0.0) for r in mine) / len(mine) for t in tasks]
        accs = [sum(r["per_task_accuracy"].get(t, 0.0) for r in mine) / len(mine) for t in acc_tasks]
        rows.append("<tr>" + f"<td>{html.escape(arm)}</td>" + "".join(f"<td>{_num(v)}</td>" for v in losses + accs)
                    + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _plot(data: dict) -> str:
    series = []
    arms = [a for a in data["summary"] if a != "base"]
    for i, arm in enumerate(arms):
        curves = [r["curve"] for r in data["results"] if r["arm"] == arm]
        color = PALETTE[i % len(PALETTE)]
        for seed, curve in enumerate(curves):
            series.append(Series(f"{arm}, seed {seed + 1}", [p["reasoning_loss"] for p in curve], color,
                                 x=[p["tokens"] for p in curve], opacity=0.25, width=1, legend=False))
        points = len(min(curves, key=len))
        mean = [sum(c[k]["reasoning_loss"] for c in curves) / len(curves) for k in range(points)]
        series.append(Series(arm, mean, color, x=[p["tokens"] for p in curves[0][:points]], width=2.2,
                             markers=True))
    chart = plots.lines(series, width=760, height=340, x_label="training tokens",
                        y_label="held-out reasoning loss (nats/token)")
    return f'<div class="plot">{chart}</div>'


def render(data: dict) -> str:
    verdicts = "".join(f"<li>{html.escape(s)}</li>" for s in data["sentences"])
    setup = data["setup"]
    meta = (f"Evaluation {html.escape(data['id'])} · model {html.escape(setup['model'])} "
            f"({'trained from scratch' if setup['from_scratch'] else 'continued pretraining'}) · "
            f"{setup['trained_tokens']:,} training tokens per arm ({setup['steps']} "
            f"step{'s' if setup['steps'] != 1 else ''} of "
            f"{setup['batch_rows']} × {setup['seq_len']}) · {setup['seeds']} seed(s) · "
            f"{setup['queries']} held-out queries · {setup['heldout_docs']} held-out documents · "
            f"{html.escape(data['generated'])}")
    explain = ("<p class='explain'>Every arm starts from the same weights and trains on the same number of tokens "
               "with the same optimiser, schedule, batch shape and data-order seed; only its documents differ. "
               "<b>base</b> is the model before training. Losses are nats per completion token on held-out "
               "queries that no ranking used; control queries are the factual ones. Accuracy is the exact match "
               "of greedy completions, the answer solved again from each prompt. Brackets in the results: 95% "
               "intervals over seeds (Student's t); they cover the variation between seeds, not the sampling of "
               "the few held-out queries. '(every seed)': the same value on every seed, so no interval. Each "
               "comparison adds a paired bootstrap over the held-out queries (the same resample for both arms "
               f"and every seed, {setup['bootstrap_resamples']:,} resamples): a mixture beats another arm "
               "only when both intervals lie wholly on the better side.</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>curator evaluation {html.escape(data['id'])}"
            f"</title><style>{CSS}</style></head><body><h1>Does the mixture help?</h1><p class='meta'>{meta}</p>"
            f"<div class='note'><b>Outcome</b><ul>{verdicts}</ul></div>{explain}<h2>Results</h2>{_table(data)}"
            f"<h2>Comparisons</h2><p class='explain'>Improvement: positive when the mixture did better.</p>"
            f"{_comparisons(data)}"
            f"<h2>Loss over training tokens</h2><p class='explain'>Thick: the mean over seeds; thin: each seed."
            f"</p>{_plot(data)}<h2>Per task</h2>{_per_task(data)}</body></html>")


def write_report(data: dict, html_path: Path, json_path: Path) -> None:
    write_text_atomic(json_path, json.dumps(data, indent=2, default=str) + "\n")
    write_text_atomic(html_path, render(data))
