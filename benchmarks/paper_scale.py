"""The paper's scale on paper: what fit, score and sketch of 5M documents / 2.5B tokens (Ruis et al.
2024) cost for SmolLM2-135M and a 7B Llama-shaped model on 1, 8 and 64 GPUs, and the disk of each
artifact.

    python benchmarks/paper_scale.py [--record docs/scaling.md]

Everything here is projected; what it rests on is said per line:
- the cost of each pass relative to a plain forward + backward over the same tokens, *measured*
  on SmolLM2-135M on this project's CPU (docs/benchmarks.md: fit 0.64× and 1.00×, exact scoring
  0.50×, sketching ~0.33× a forward + backward's time per token), and for the 7B shape
  *counted* from the layer shapes (multiply-adds of the EK-FAC work against those of the model);
- a GPU forward + backward at an assumed fraction of an H100/H200's dense bf16 peak (989 TFLOP/s):
  25% for a 135M model (small matrices), 45% for 7B; both are assumptions, not measurements;
- scaling over GPUs at the efficiency given (default 90%: the passes only all-reduce at the end).
Disk sizes are exact arithmetic from the shapes and the formats.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recording import record_section  # noqa: E402

DOCS, TOKENS = 5_000_000, 2_500_000_000     # Ruis et al. 2024: 5M documents, 2.5B tokens, 512-token windows
WINDOW = 512
PEAK_BF16 = 989e12


@dataclass
class Shape:
    name: str
    params: float
    layers: int
    hidden: int
    intermediate: int
    utilisation: float

    def mlp_linears(self) -> list[tuple[int, int]]:
        """(d_out, d_in) of each tracked MLP linear: gate, up, down per block."""
        per_block = [(self.intermediate, self.hidden)] * 2 + [(self.hidden, self.intermediate)]
        return per_block * self.layers


SMOL = Shape("SmolLM2-135M", 135e6, 30, 576, 1536, 0.25)
LLAMA7B = Shape("7B (Llama-2 shape)", 6.7e9, 32, 4096, 11008, 0.45)

# Measured on SmolLM2-135M, CPU (docs/benchmarks.md): pass time ÷ plain forward+backward time, same tokens.
MEASURED_RATIO = {"fit pass 1": 0.64, "fit pass 2": 1.00, "score (100 queries)": 0.50, "sketch": 0.33}


def counted_ratios(shape: Shape, queries: int = 100, rank: int = 32, sketch_k: int = 64) -> dict[str, float]:
    """Per-token multiply-adds of each pass over those of a forward + backward (3 × 2 × params)."""
    step = 6 * shape.params
    linears = shape.mlp_linears()
    per_sequence = {
        # A and S: d_in² + d_out² per token.
        "fit pass 1": sum(d_in ** 2 + d_out ** 2 for d_out, d_in in linears) * 2,
        # G per sequence (T d_in d_out), rotated by Q_S, Q_A (d_out² d_in + d_out d_in²) once per window.
        "fit pass 2": sum(WINDOW * d_in * d_out + d_out * d_out * d_in + d_out * d_in * d_in
                          for d_out, d_in in linears) * 2 / WINDOW,
        # G per window, then the stacked rank-r queries: T d_in d_out + Q (d_in + d_out) r … as DESIGN.md.
        "score (100 queries)": sum(WINDOW * d_in * d_out + queries * d_in * d_out for d_out, d_in in linears)
        * 2 / WINDOW,
        # Uᵀδ and Vᵀa per token (k (d_in + d_out)), then k × k per token.
        "sketch": sum(sketch_k * (d_in + d_out) + sketch_k ** 2 for d_out, d_in in linears) * 2,
    }
    return {name: 1.0 + work / step for name, work in per_sequence.items()}


def gpu_hours(shape: Shape, ratio: float, tokens: float) -> float:
    tokens_per_second = shape.utilisation * PEAK_BF16 / (6 * shape.params)
    return tokens * ratio / tokens_per_second / 3600


def disk(shape: Shape, queries: int = 100, sketch_bytes: int = 48 * 1024) -> dict[str, str]:
    factors = sum(8 * (2 * d_in ** 2 + 2 * d_out ** 2 + d_out * d_in + d_in + d_out) for d_out, d_in in
                  shape.mlp_linears())          # float64: A, Q_A, S, Q_S, Λ, eigenvalues
    scores = DOCS * queries * (8 + 4 + 4 + 2)   # doc id, two float32, a dictionary-coded query id (before zstd)
    return {"factors": f"{factors / 1e9:.1f} GB", "scores (100 queries)": f"≤ {scores / 1e9:.0f} GB",
            "sketch store (48 KB/doc)": f"{DOCS * sketch_bytes / 1e12:.2f} TB"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-docs", type=int, default=100_000, help="the fitting sample (not the whole corpus)")
    parser.add_argument("--efficiency", type=float, default=0.9)
    parser.add_argument("--record", type=Path)
    args = parser.parse_args()
    fit_tokens = TOKENS * args.fit_docs / DOCS
    lines = [f"5M documents, 2.5B tokens; factors fitted on a sample of {args.fit_docs:,} documents "
             f"({fit_tokens / 1e6:.0f}M tokens). GPU-hours and wall-clock on 1 / 8 / 64 GPUs at "
             f"{args.efficiency:.0%} scaling efficiency.", "",
             "| model | pass | cost × fwd+bwd (source) | GPU-hours | 1 GPU | 8 GPUs | 64 GPUs |",
             "|---|---|---|---|---|---|---|"]
    for shape in (SMOL, LLAMA7B):
        counted = counted_ratios(shape)
        for name in ("fit pass 1", "fit pass 2", "score (100 queries)", "sketch"):
            if shape is SMOL:
                ratio, source = MEASURED_RATIO[name], "measured, CPU"
            else:
                ratio, source = counted[name], "counted"
            tokens = fit_tokens if name.startswith("fit") else TOKENS
            hours = gpu_hours(shape, ratio, tokens)
            walls = [hours / (n * (args.efficiency if n > 1 else 1.0)) for n in (1, 8, 64)]
            lines.append(f"| {shape.name} | {name} | {ratio:.2f} ({source}) | {hours:,.1f} | "
                         + " | ".join(_duration(w) for w in walls) + " |")
    lines += ["", "| model | " + " | ".join(disk(SMOL)) + " |", "|---|---|---|---|"]
    for shape in (SMOL, LLAMA7B):
        lines.append(f"| {shape.name} | " + " | ".join(disk(shape).values()) + " |")
    lines += ["", "GPU throughput is assumed: a forward + backward at "
              f"{SMOL.utilisation:.0%} (135M) and {LLAMA7B.utilisation:.0%} (7B) of 989 TFLOP/s bf16. Replace "
              "these with `benchmarks/distributed_scaling.py --device cuda` numbers when a GPU is measured. For "
              "SmolLM2 the pass ratios are the CPU's; on a GPU the EK-FAC matmuls run at the same rate as the "
              "model's, so the ratios carry over roughly. The 7B ratios count multiply-adds only."]
    print("\n".join(lines))
    if args.record:
        record_section(args.record, "paper_scale", "The paper's scale, projected", "paper_scale.py", lines)


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


if __name__ == "__main__":
    main()
