"""The names every layer shares: tasks, kinds, formats and the choices of each setting.

Settings models take their Literal types from here and the CLI builds its
choices from the same ones (``typing.get_args``), so the two cannot drift. The
module imports nothing heavy: `curator --help` reads it.
"""

from __future__ import annotations

from typing import Literal, get_args

# The paper's reasoning tasks (Ruis et al. 2024) and their controls.
REASONING_TASKS = ("arithmetic", "slope", "linear")
CONTROL_TASKS = ("factual-control", "reasoning-control")
GENERATED_TASKS = (*REASONING_TASKS, *CONTROL_TASKS)
# How a reasoning query is written: the paper's step-by-step format (what sketch suites are built
# from) and held-out families that other people's queries look like.
QUERY_FAMILIES = ("paper", "terse", "prose", "code", "chat")

Kind = Literal["code", "math", "web", "wiki", "qa", "trivia", "markdown", "arxiv", "stackexchange", "other"]
InputFormat = Literal["auto", "jsonl", "parquet", "text", "hf"]
ModelDType = Literal["float32", "bfloat16"]
DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]+)?)$"      # the torch devices curator runs on: cpu, cuda or cuda:N
Fisher = Literal["sampled", "empirical"]
ChatTemplate = Literal["auto", "none"]
ScoreMethod = Literal["exact", "sketch"]
SketchMethod = Literal["whitened-subspace", "mixed", "query-subspace", "eigen", "random"]
SketchPrecision = Literal["float16", "float32"]
SketchBudgetSplit = Literal["uniform", "energy"]
Aggregate = Literal["mean-z", "mean", "max", "rank-vote"]
Normalize = Literal["per-nat", "per-token", "raw"]
MixStrategy = Literal["top", "threshold", "sample"]
ShardFormat = Literal["parquet", "jsonl.zst", "megatron"]


def values(literal) -> tuple[str, ...]:
    return get_args(literal)
