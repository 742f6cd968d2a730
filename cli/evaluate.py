"""`curator evaluate`: does the mixture help? Train at equal tokens and measure reasoning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curator.cli.common import (
    DeviceOption,
    OutputFormat,
    OutputOption,
    WorkspaceOption,
    console,
    err_console,
    print_frame,
    workspace_from,
)


class TrainingBar:
    """curator.evaluate.train.Progress on a rich bar (stderr): one line per arm, steps done."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("steps"), TimeElapsedColumn(), console=err_console)
        self.task = None

    def __enter__(self) -> TrainingBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stage(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/]")

    def arm(self, label: str, steps: int, done: int) -> None:
        resumed = f" (resumed at step {done})" if done else ""
        self.task = self.progress.add_task(f"training {label}{resumed}", total=steps, completed=done)

    def advance(self, steps: int) -> None:
        self.progress.update(self.task, advance=steps)

    def checkpoint(self, label: str, step: int) -> None:
        pass


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def evaluate(
    mixtures: Annotated[str, typer.Option(help="Comma-separated mixtures to evaluate (`curator mixes` lists them). "
                                               "The baselines are built for the first.", show_default=False)],
    tokens: Annotated[int, typer.Option(help="Training tokens per arm, the same for every arm (rounded down to "
                                             "whole batches of --batch-rows × --seq-len). At most the mixture's "
                                             "tokens.", show_default=False)],
    baselines: Annotated[str, typer.Option(
        help="Comma-separated, or 'none'. random: documents drawn uniformly from the whole catalog (scored "
             "or not); source-matched: random documents of the catalog with the mixture's token share per "
             "source (which documents, not which sources); bottom: the ranking's most harmful documents (a "
             "sign check).")]
    = "random,source-matched,bottom",
    seeds: Annotated[int, typer.Option(help="Seeds per arm: each changes the data order (and the random "
                                            "baselines' draw); intervals come from the spread over seeds.")] = 3,
    eval_queries: Annotated[str | None, typer.Option(
        help="Held-out queries from the catalog (a selector: tasks, query sets or ids). Any query the ranking "
             "was built from is refused. Default: new queries generated for the paper's three reasoning tasks "
             "plus factual controls, and the catalog's factual questions not ranked on.", show_default=False)]
    = None,
    eval_seed: Annotated[int, typer.Option(help="Generator seed of the default held-out queries and of the "
                                                "held-out text.")] = 1001,
    eval_per_task: Annotated[int, typer.Option(help="Generated held-out queries per task.")] = 8,
    from_scratch: Annotated[Path | None, typer.Option(
        help="A JSON model config (with model_type, e.g. llama) to train a new small model from a seeded init, "
             "instead of continuing the ranking's model. The ranking's tokenizer is used.", show_default=False)]
    = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Starting model. Default: the model the "
                                              "ranking was scored with.", show_default=False)] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 128,
    batch_rows: Annotated[int, typer.Option(help="Sequences per optimiser step.")] = 8,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine). Default: "
                                                  "5e-5, or 1e-3 from scratch.", show_default=False)] = None,
    checkpoints: Annotated[int, typer.Option(help="Points along training where the held-out loss is measured "
                                                  "(the plot) and the state saved (a killed run resumes there).")]
    = 4,
    heldout_docs: Annotated[int, typer.Option(help="Ranked documents kept out of every arm to measure general-"
                                                   "text perplexity.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per accuracy query.")] = 96,
    bootstrap: Annotated[int, typer.Option(help="Resamples of the held-out queries behind each comparison's "
                                                "paired bootstrap interval (seeded; changes no arm).")] = 2000,
    device: DeviceOption = "cpu",
    keep_final: Annotated[bool, typer.Option("--keep-final", help="Keep each arm's trained weights.")] = False,
    out: Annotated[Path | None, typer.Option(help="HTML report (the JSON goes beside it). Default: "
                                                  "reports/evaluation-ID.html in the workspace.",
                                             show_default=False)] = None,
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Does the mixture help? Train on it and on honest baselines at equal tokens, then measure reasoning.

    Every arm starts from the same weights (the model the ranking was scored with, or --from-scratch) and
    trains on the same number of tokens with the same optimiser, schedule, batch shape and data order;
    only its documents differ. Each trained model, and the starting one as the reference row, is measured
    on held-out queries that never touched the ranking:

    - **reasoning loss**: nats per completion token on arithmetic, slope and linear queries;
    - **control loss**: the same on factual queries;
    - **perplexity** of held-out documents (nothing else broke);
    - **accuracy**: exact match of greedy completions, the answer solved again from each prompt.

    Results per arm and seed go to the catalog; the report (HTML + JSON) gives means with 95% intervals
    over seeds, each comparison with a second interval from a paired bootstrap over the held-out queries,
    the loss over training tokens per arm, and says plainly when the mixture does not beat a baseline
    (it beats one only when both intervals lie on the better side).
    A killed evaluation resumes at its first unfinished arm, from that arm's last checkpoint.

    Example: curator evaluate --mixtures math-code --tokens 200000 --seeds 3
    """
    import polars as pl

    from curator.evaluate.config import BASELINES, EvaluateConfig
    from curator.evaluate.run import evaluate as run_evaluate
    from curator.evaluate.stats import OUTCOME_METRICS

    chosen = [] if baselines.strip() == "none" else _names(baselines)
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        raise typer.BadParameter(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)} or none",
                                 param_hint="--baselines")
    config = EvaluateConfig(mixtures=_names(mixtures), baselines=chosen, tokens=tokens, seeds=seeds,
                            eval_queries=eval_queries, eval_seed=eval_seed, eval_per_task=eval_per_task,
                            from_scratch=str(from_scratch) if from_scratch else None, model=model, seq_len=seq_len,
                            batch_rows=batch_rows, lr=lr, checkpoints=checkpoints, heldout_docs=heldout_docs,
                            max_new_tokens=max_new_tokens, bootstrap=bootstrap, device=device,
                            keep_final=keep_final)
    ws = workspace_from(workspace)
    with TrainingBar() as bar:
        data = run_evaluate(ws, config, progress=bar, out=out)
    rows = []
    for arm, stats in data["summary"].items():
        row = {"arm": arm, "seeds": stats["reasoning_loss"]["n"]}
        for metric in ("reasoning_loss", "factual_loss", "general_ppl", "accuracy"):
            s = stats[metric]
            row[metric] = s["mean"]
            row[f"{metric} ±"] = None if s["low"] is None else (s["high"] - s["low"]) / 2
        rows.append(row)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    setup = data["setup"]
    print_frame(frame, output, title=f"Evaluation {data['id']}: {setup['trained_tokens']:,} tokens per arm, "
                                     f"{setup['seeds']} seed(s), {setup['queries']} held-out queries",
                formats={c: ".4g" for c in frame.columns if c not in ("arm", "seeds")},
                headers={"reasoning_loss": "reasoning loss", "reasoning_loss ±": "±", "factual_loss": "control loss",
                         "factual_loss ±": "±", "general_ppl": "text ppl", "general_ppl ±": "±",
                         "accuracy ±": "±"})
    if output is OutputFormat.table:
        compared = pl.DataFrame(
            [{"mixture": c["mixture"], "against": c["against"], "metric": c["metric"], "improvement": c["mean"],
              "seeds low": c["low"], "seeds high": c["high"],
              "queries low": (c["queries"] or {}).get("low"), "queries high": (c["queries"] or {}).get("high"),
              "verdict": c["verdict"]}
             for c in data["comparisons"] if c["against"] in config.baselines and c["metric"] in OUTCOME_METRICS],
            schema={"mixture": pl.String, "against": pl.String, "metric": pl.String, "improvement": pl.Float64,
                    "seeds low": pl.Float64, "seeds high": pl.Float64, "queries low": pl.Float64,
                    "queries high": pl.Float64, "verdict": pl.String})
        if not compared.is_empty():
            print_frame(compared, output, title="Against the baselines (improvement > 0: the mixture did better; "
                                                "95% intervals over seeds and over held-out queries)",
                        formats={c: ".4g" for c in ("improvement", "seeds low", "seeds high", "queries low",
                                                    "queries high")})
        for sentence in data["sentences"]:
            console.print(f"• {sentence}", highlight=False)
        console.print(f"Report: {data['report']} (numbers: {data['report_json']})")
