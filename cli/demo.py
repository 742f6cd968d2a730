"""`curator demo`: the whole job on a real model and real offline text, one command.

The demo is a list of ordinary `curator` command lines, run in this process and
printed as they run, so that docs/quickstart.md can show the same steps one at a
time. Each stage is timed; the timings and settings can be recorded in a
Markdown file (docs/benchmarks.md).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from curator.cli.common import console
from curator.constants import CONTROL_TASKS, REASONING_TASKS
from curator.demo import CPU_DEMO, GPU_DEMO

SEARCH_PROMPT = "Solve for x: 4x + 7 = 31\n\nThink step-by-step."
SEARCH_COMPLETION = "Subtract 7 from both sides: 4x = 24. Divide both sides by 4: x = 6. The answer is 6."


def demo(
    ctx: typer.Context,
    gpu: Annotated[bool, typer.Option("--gpu", help="The same pipeline at a larger size on a CUDA GPU: "
                                                    f"{GPU_DEMO.docs_per_source:,} documents per source, windows "
                                                    f"of {GPU_DEMO.max_seq_len}, blocks {GPU_DEMO.layers}.")]
    = False,
    model: Annotated[str | None, typer.Option(help="Model (default smollm2-135m): a name, a .gguf file or a "
                                                   "save_pretrained folder.", show_default=False)] = None,
    docs_per_source: Annotated[int | None, typer.Option(help="Documents from each of the four sources "
                                                             f"(default {CPU_DEMO.docs_per_source}; "
                                                             f"{GPU_DEMO.docs_per_source:,} with --gpu).",
                                                        show_default=False)] = None,
    max_chars: Annotated[int | None, typer.Option(help="Longest document in characters (default "
                                                        f"{CPU_DEMO.max_chars}).",
                                                  show_default=False)] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Tokens per window (default "
                                                          f"{CPU_DEMO.max_seq_len}; {GPU_DEMO.max_seq_len} with --gpu).",
                                                    show_default=False)] = None,
    layers: Annotated[str | None, typer.Option(help="Blocks whose MLPs are tracked (default "
                                                    f"{CPU_DEMO.layers}; {GPU_DEMO.layers} with --gpu).", show_default=False)] = None,
    fit_docs: Annotated[int | None, typer.Option(help="Documents in the EK-FAC fitting sample (default "
                                                       f"{CPU_DEMO.fit_docs}).",
                                                 show_default=False)] = None,
    queries_per_task: Annotated[int | None, typer.Option(help="Scored queries per task (default "
                                                               f"{CPU_DEMO.queries_per_task}).",
                                                         show_default=False)] = None,
    sketch_rank: Annotated[int | None, typer.Option(help="k of the k × k sketch per layer (default "
                                                          f"{CPU_DEMO.sketch_rank}).",
                                                    show_default=False)] = None,
    corpus_only: Annotated[bool, typer.Option("--corpus-only", help="Only write the corpus files and the factual "
                                                                    "queries, and print the commands that use "
                                                                    "them (docs/quickstart.md starts here).")]
    = False,
    record: Annotated[Path | None, typer.Option(help="Write settings and stage timings into this Markdown file "
                                                     "(between demo markers).", show_default=False)] = None,
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder to create or reuse.")]
    = Path("demo-workspace"),
) -> None:
    """Run the whole job on SmolLM2-135M and a real corpus, offline: ingest, fit, score, sketch, rank, mix,
    export, audit.

    The corpus has four kinds of source, all on this machine: standard-library functions (code), installed
    packages' Markdown descriptions (markdown), trivia cards from the red-trivia package (trivia) and mpmath's
    function documentation (math). Queries are the paper's three reasoning tasks, their controls, and factual
    questions whose answers are in the trivia. The default size takes about 10 minutes on a 2-core CPU;
    `--gpu` runs the same steps larger. Every step is an ordinary curator command, printed as it runs
    (docs/quickstart.md goes through them one at a time). A second run reuses what the first computed.
    """
    from curator.catalog.database import create_workspace
    from curator.demo import build_demo_corpus, record_timings

    overrides = {"model": model, "docs_per_source": docs_per_source, "max_chars": max_chars,
                 "max_seq_len": max_seq_len, "layers": layers, "fit_docs": fit_docs,
                 "queries_per_task": queries_per_task, "sketch_rank": sketch_rank}
    settings = (GPU_DEMO if gpu else CPU_DEMO).model_copy(
        update={k: v for k, v in overrides.items() if v is not None})
    settings = type(settings).model_validate(settings.model_dump())
    ws, _ = create_workspace(workspace)
    _print_settings(settings, ws.root)

    timings: list[tuple[str, float]] = []
    started = time.perf_counter()
    with _stage("corpus", timings):
        corpus = build_demo_corpus(ws.root / "demo-corpus", settings)
    if corpus_only:
        for source in corpus.sources:
            console.print(f"{source.name} ({source.kind}): {' '.join(source.paths)}", highlight=False)
        console.print(f"factual queries: {corpus.factual_queries}", highlight=False)
        console.print("\nThe demo's steps, one command at a time:")
        # The mixture's budget (40% of the corpus's tokens) is known once scoring has counted them.
        for _, argv in _steps(settings, ws.root, corpus, budget=lambda _: "TOKENS"):
            for args in (argv(ws.root) if callable(argv) else [argv]):
                console.print(f"  curator {shlex.join(args)}", highlight=False, soft_wrap=True)
        return
    for stage, argv in _steps(settings, ws.root, corpus):
        with _stage(stage, timings):
            for args in (argv(ws.root) if callable(argv) else [argv]):
                _run(ctx, args, ws.root)
    total = time.perf_counter() - started

    _print_timings(timings, total)
    report, shards = ws.root / "reports" / "audit.html", ws.root / "shards" / "reasoning"
    console.print(f"\n[bold]Report:[/] {report}  (numbers: {report.with_suffix('.json')})")
    console.print(f"[bold]Shards:[/] {shards}  (manifest: {shards / 'manifest.json'})")
    console.print(f"[bold]Workspace:[/] {ws.root}  (try: curator runs -w {ws.root})")
    if record:
        record_timings(record, settings, timings, total)
        console.print(f"Recorded the settings and timings in {record}.")


class _stage:
    """Times one stage and prints its heading."""

    def __init__(self, name: str, timings: list):
        self.name, self.timings = name, timings

    def __enter__(self):
        console.rule(f"[bold]{self.name}")
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if exc[0] is None:
            self.timings.append((self.name, time.perf_counter() - self.start))


def _run(ctx: typer.Context, args: list[str], root: Path) -> None:
    """One curator command line, as a user would type it, run in this process."""
    shown = [a if a != str(root) else shlex.quote(str(root)) for a in args]
    console.print(f"[dim]$[/] [bold cyan]curator {shlex.join(shown)} -w {shlex.quote(str(root))}[/]",
                  highlight=False)
    # The root of the command line running now: the demo is one of its commands.
    root_command = ctx.find_root().command
    root_command.main(args=[*args, "-w", str(root)], prog_name="curator", standalone_mode=False)


def _steps(settings, root: Path, corpus, budget=None):
    """(stage, argv or a function of the workspace giving argv lists), in pipeline order."""
    device = ["--device", settings.device]
    batch = ["--batch-tokens", str(settings.batch_tokens)]
    ingest = [["ingest", *source.paths, "--source", source.name, "--kind", source.kind,
               *(["--glob", source.glob] if source.glob else [])] for source in corpus.sources]
    yield "ingest", lambda _: [*ingest, ["sources"]]
    yield "fit", ["fit", "--model", settings.model, "--layers", settings.layers, "--max-seq-len",
                  str(settings.max_seq_len), "--max-docs", str(settings.fit_docs), *device, *batch]
    n, suite = str(settings.queries_per_task), str(settings.suite_per_task)
    yield "queries", lambda _: [
        *(["queries", "generate", "--task", task, "--n", n, "--seed", "0"] for task in (*REASONING_TASKS, *CONTROL_TASKS)),
        ["queries", "add", str(corpus.factual_queries), "--set", "trivia"],
        # The sketch's suite: other queries of the same tasks (seed 1), so that the
        # scored queries (seed 0) measure its fidelity on queries it was not built from.
        *(["queries", "generate", "--task", task, "--n", suite, "--seed", "1"] for task in REASONING_TASKS),
        ["queries", "list", "-q", "trivia"]]
    scored = ",".join([f"{task}-s0" for task in (*REASONING_TASKS, *CONTROL_TASKS)] + ["trivia"])
    memory = ["--query-memory-mb", str(settings.query_memory_mb)] if settings.query_memory_mb != 2048 else []
    yield "score (exact)", ["score", "--queries", scored, *memory, *device, *batch]
    yield "sketch", ["sketch", "--suite", ",".join(f"{t}-s1" for t in REASONING_TASKS), "--rank",
                     str(settings.sketch_rank), "--holdout", ",".join(f"{t}-s0" for t in REASONING_TASKS),
                     *device, *batch]
    yield "index + search", lambda _: [
        ["index", "build"],
        ["search", "--prompt", SEARCH_PROMPT, "--completion", SEARCH_COMPLETION, "--top", "5", "--bottom", "3",
         "--rerank", str(max(10, settings.docs_per_source)), *device]]
    yield "rank + mix", lambda ws_root: [
        ["rank", "--tasks", ",".join(REASONING_TASKS), "--normalize", "per-token", "--name", "reasoning", "--show", "5",
         "--replace"],
        ["mix-weights", "--rank", "reasoning", "--out", str(ws_root / "mix-weights.json")],
        ["mix", "reasoning", "--rank", "reasoning", "--budget-tokens", str((budget or _budget)(ws_root)),
         "--quota", "package-docs=0.1:", "--quota", "stdlib=:50%", "--replace"]]
    yield "export", ["export", "reasoning", "--shard-format", "parquet", "--out", str(root / "shards" / "reasoning"),
                     "--force"]
    yield "audit", ["audit", "--out", str(root / "reports" / "audit.html"),
                    "--json", str(root / "reports" / "audit.json")]


def _budget(root: Path) -> int:
    from curator.demo import mixture_budget

    return mixture_budget(root)


def _print_settings(settings, root: Path) -> None:
    from rich.table import Table

    table = Table(title="Demo settings", title_justify="left", show_header=False, box=None, pad_edge=False)
    for name, field in type(settings).model_fields.items():
        table.add_row(name, str(getattr(settings, name)), f"[dim]{field.description or ''}[/]")
    console.print(table)
    console.print(f"Workspace: [bold]{root}[/]")


def _print_timings(timings, total: float) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="Time per stage", title_justify="left", header_style="bold", pad_edge=False,
                  box=box.SIMPLE_HEAD)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in timings:
        table.add_row(name, f"{seconds:,.1f}")
    table.add_row("[bold]total", f"[bold]{total:,.1f}")
    console.print(table)
