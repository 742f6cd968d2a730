"""`curator rank`, `mix`, `mix-weights`, `mixes` and `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curator import constants
from curator.cli.common import (
    OutputFormat,
    OutputOption,
    WorkspaceOption,
    choices,
    console,
    print_frame,
    workspace_from,
)
from curator.constants import REASONING_TASKS, values

Aggregate = choices("Aggregate", values(constants.Aggregate))
Normalize = choices("Normalize", values(constants.Normalize))
Strategy = choices("Strategy", values(constants.MixStrategy))
ShardFormat = choices("ShardFormat", values(constants.ShardFormat))

SHARE_FORMATS = {"mix share": ".1%", "corpus share": ".1%", "min": ".0%", "max": ".0%", "weight": ".1%",
                 "score": ".3g", "influence per token": ".3g", "positive influence": ".3g"}


def _print_documents(frame, title: str) -> None:
    import polars as pl

    frame = frame.with_columns(pl.col("snippet").str.slice(0, 70))
    print_frame(frame, OutputFormat.table, title=title, formats={"score": ".4g"})


def rank(
    name: Annotated[str, typer.Option("--name", help="Name of the ranking, used by `curator mix --rank`.",
                                      show_default=False)],
    run: Annotated[str | None, typer.Option(help="Scoring run (id or unique prefix; `curator runs` lists "
                                                 "them). Default: the latest.", show_default=False)] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated query tasks whose influence counts.")]
    = ",".join(REASONING_TASKS),
    aggregate: Annotated[Aggregate, typer.Option(
        help="Over queries: mean-z (z-score each query over documents, then average: every query has an equal "
             "say), mean, max (helps any one query strongly), rank-vote (average percentile rank).")] = "mean-z",
    normalize: Annotated[Normalize, typer.Option(
        help="Before aggregating: per-nat (score / the completion's loss in nats), per-token (per-nat / the "
             "document's tokens, so long documents do not win by length), raw.")] = "per-nat",
    show: Annotated[int, typer.Option(help="How many top and bottom documents to print.")] = 10,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a ranking of the same name.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Turn a scored run into one reasoning score per document, stored in the catalog.

    Example: curator rank --tasks arithmetic,slope,linear --aggregate mean-z --normalize per-token --name reasoning
    """
    from curator.curate.rank import rank as run_rank
    from curator.curate.rank import RankConfig, ranked_documents

    ws = workspace_from(workspace)
    config = RankConfig(name=name, run=run, tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                        aggregate=aggregate.value, normalize=normalize.value)
    result = run_rank(ws, config, replace=replace)
    console.print(f"Ranking [bold]{result.name}[/]: {result.documents:,} documents from run {result.run_id}, "
                  f"{len(result.query_ids)} queries ({config.aggregate} of {config.normalize} scores).")
    _print_documents(ranked_documents(ws, name, show), f"Top {show}: most helpful to {tasks}")
    _print_documents(ranked_documents(ws, name, show, bottom=True), f"Bottom {show}: most harmful")


def mix(
    name: Annotated[str, typer.Argument(help="Name of the new mixture, or `show` followed by a mixture's name.",
                                        show_default=False)],
    shown: Annotated[str | None, typer.Argument(help="With `show`: the mixture to show.", show_default=False)]
    = None,
    rank: Annotated[str | None, typer.Option("--rank", help="Ranking to draw from (`curator rank --name`).",
                                             show_default=False)] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="Tokens to select (counted with the run's tokenizer).",
                                                      show_default=False)] = None,
    strategy: Annotated[Strategy, typer.Option(
        help="top: best first; threshold: an even seeded sample of documents above --min-score; sample: seeded, "
             "probability ∝ exp(z/T) of the standardised score.")] = "top",
    temperature: Annotated[float, typer.Option(help="T for --strategy sample: lower is greedier.")] = 1.0,
    quota: Annotated[list[str] | None, typer.Option(
        help="SOURCE=MIN:MAX share of the mixture's tokens, as fractions or percentages; repeatable "
             "(e.g. --quota web=0.2: --quota code=:40%).", show_default=False)] = None,
    weights: Annotated[Path | None, typer.Option(help="Per-source weights (from `curator mix-weights --out`) as "
                                                      "maximum shares; unlisted sources are left out.",
                                                 show_default=False)] = None,
    min_score: Annotated[float | None, typer.Option(help="Only documents with a reasoning score at least this.",
                                                    show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for threshold and sample strategies.")] = 0,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a mixture of the same name.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Build a mixture: fill a token budget from a ranking under per-source quotas. `curator mix show NAME`
    shows one.

    The budget and every maximum share are never exceeded; the budget is met to within one document. A quota
    that cannot be met is an error naming it. No document is selected twice.

    Example: curator mix math-code --rank reasoning --budget-tokens 2000000 --quota web=0.2: --quota code=:0.4
    """
    from curator.curate.mix import mix as run_mix
    from curator.curate.mix import MixSpec, mixture_report, parse_quota, read_weights, source_table

    ws = workspace_from(workspace)
    if name == "show":
        if not shown:
            raise typer.BadParameter("`curator mix show NAME` needs the mixture's name")
        _print_mixture(*mixture_report(ws, shown))
        return
    if shown is not None:
        raise typer.BadParameter(f"unexpected argument {shown!r}")
    if rank is None or budget_tokens is None:
        raise typer.BadParameter("a new mixture needs --rank and --budget-tokens")
    spec = MixSpec(name=name, ranking=rank, budget_tokens=budget_tokens, strategy=strategy.value,
                   temperature=temperature, quotas=[parse_quota(q) for q in quota or []],
                   weights=read_weights(weights) if weights else None, min_score=min_score, seed=seed)
    result = run_mix(ws, spec, replace=replace)
    _print_mixture(result, source_table(ws, result))


def _print_mixture(result, frame) -> None:
    spec = result.spec
    console.print(f"Mixture [bold]{spec.name}[/]: {result.documents:,} documents, {result.tokens:,} of "
                  f"{spec.budget_tokens:,} tokens from ranking {spec.ranking} ({spec.strategy}"
                  + (f", T={spec.temperature:g}" if spec.strategy == "sample" else "")
                  + (f", seed {spec.seed}" if spec.strategy != "top" else "") + ")")
    print_frame(frame, OutputFormat.table, formats=SHARE_FORMATS,
                footer={"source": "total", "documents": result.documents, "tokens": result.tokens})


def mixes(
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """The mixtures in the catalog."""
    from curator.curate.mix import mixtures_table

    frame = mixtures_table(workspace_from(workspace))
    print_frame(frame, output, title=f"{frame.height} mixtures")


def mix_weights(
    rank: Annotated[str, typer.Option("--rank", help="Ranking to analyse.", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Write the weights as JSON, for `curator mix --weights`.",
                                             show_default=False)] = None,
    output: OutputOption = OutputFormat.table,
    workspace: WorkspaceOption = None,
) -> None:
    """Propose per-source mixing weights ∝ each source's positive reasoning influence per token.

    The paper's source analysis turned into a recipe: sources whose tokens help the ranked tasks most get the
    largest share. Use the result with `curator mix NAME --rank R --weights FILE`.
    """
    from curator.curate.mix import mixture_weights, save_weights

    frame = mixture_weights(workspace_from(workspace), rank)
    if out:
        save_weights(out, rank, frame)
    print_frame(frame, output, title=f"Proposed weights from ranking {rank}", formats=SHARE_FORMATS)
    if out and output is OutputFormat.table:
        console.print(f"Wrote {out}; use it with `curator mix NAME --rank {rank} --weights {out} …`")


def export(
    name: Annotated[str, typer.Argument(help="Mixture to export.", show_default=False)],
    shard_format: Annotated[ShardFormat, typer.Option(
        "--shard-format", help="Format of the shards: parquet or jsonl.zst (id, text, source, score, "
                               "metadata), or megatron (tokenized .bin/.idx pairs).")] = "parquet",
    out: Annotated[Path, typer.Option(help="Folder to create (written as OUT.part and renamed when complete).",
                                      show_default=False)] = ...,
    shard_tokens: Annotated[int | None, typer.Option(help="Start a new shard after this many tokens "
                                                          "(default 100M).", show_default=False)] = None,
    shard_bytes: Annotated[int | None, typer.Option(help="Or after this many bytes of text.",
                                                    show_default=False)] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Model whose tokenizer writes megatron ids. Default: the "
                                                       "scored run's model.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is a previous export (a folder "
                                                        "holding only what its manifest.json lists); any "
                                                        "other folder or file is refused.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Write a mixture as training shards with a manifest.json (per-shard documents, tokens, bytes and sha256,
    the mixture's spec and the curator version)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from curator.cli.common import err_console
    from curator.curate.export import ExportSpec
    from curator.curate.export import export as run_export

    spec = ExportSpec(mixture=name, format=shard_format.value, out=out, shard_tokens=shard_tokens,
                      shard_bytes=shard_bytes, tokenizer=tokenizer)
    with Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("export", total=None)
        result = run_export(workspace_from(workspace), spec, force=force,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    manifest = result.manifest
    console.print(f"Exported [bold]{name}[/] as {shard_format.value}: {manifest['documents']:,} documents, "
                  f"{manifest['tokens']:,} tokens in {len(manifest['shards'])} shard{'s' * (len(manifest['shards']) != 1)} "
                  f"→ {result.out}")
