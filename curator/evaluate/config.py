"""Settings of `curator evaluate`: one pydantic model, stored with every evaluation.

Fields marked NOT_IDENTITY change how the evaluation runs, never its numbers, so an evaluation
resumed on another device finds its finished arms again.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from curator.artifacts import NOT_IDENTITY, Settings
from curator.constants import DEVICE_PATTERN

Baseline = Literal["random", "source-matched", "bottom"]
BASELINES: tuple[str, ...] = ("random", "source-matched", "bottom")


class EvaluateConfig(Settings):
    """Train every arm on the same number of tokens from the same weights, then measure it."""

    mixtures: list[str] = Field(min_length=1, description="mixtures to evaluate; the first is the one the "
                                                          "source-matched and bottom baselines are built for")
    baselines: list[Baseline] = Field(default_factory=lambda: list(BASELINES),
                                      description="random, source-matched, bottom")
    tokens: int = Field(gt=0, description="training tokens per arm (rounded down to whole batches)")
    seeds: int = Field(3, ge=1, le=32, description="seeds 0..n-1: data order, random baselines, from-scratch init")
    eval_queries: str | None = Field(
        None, description="catalog query selector for held-out queries; default: generated held-out queries")
    eval_per_task: int = Field(8, ge=1, description="generated held-out queries per task")
    eval_seed: int = Field(1001, description="generator seed of the held-out queries and of the held-out text")
    heldout_docs: int = Field(32, ge=1, description="documents held out of every arm for general-text perplexity")
    from_scratch: str | None = Field(None, description="JSON model config: train a new small model instead of "
                                                       "continuing the ranking's model")
    model: str | None = Field(None, description="default: the model the ranking's run was scored with")
    seq_len: int = Field(128, ge=8, description="tokens per training sequence")
    batch_rows: int = Field(8, ge=1, description="sequences per optimiser step")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default 5e-5, or 1e-3 from scratch")
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="share of steps with a linear warm-up")
    checkpoints: int = Field(4, ge=1, description="points along training where the held-out loss is measured "
                                                  "and the state is saved (resumes start there)")
    max_new_tokens: int = Field(96, ge=1, description="greedy tokens generated per accuracy query")
    bootstrap: int = Field(2000, ge=100, description="resamples of the held-out queries behind each comparison's "
                                                    "paired bootstrap interval", json_schema_extra=NOT_IDENTITY)
    bootstrap_seed: int = Field(0, description="seed of the bootstrap's resamples", json_schema_extra=NOT_IDENTITY)
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu, cuda or cuda:N",
                        json_schema_extra=NOT_IDENTITY)
    keep_final: bool = Field(False, description="keep each arm's final weights (safetensors)",
                             json_schema_extra=NOT_IDENTITY)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.from_scratch else 5e-5)

    @property
    def batch_tokens(self) -> int:
        return self.batch_rows * self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


class Arm(BaseModel):
    """One training arm of one seed: its documents, in selection order."""

    name: str                 # the mixture's name, or a baseline's
    kind: Literal["mixture", "random", "source-matched", "bottom"]
    seed: int
    doc_ids: list[int]
    tokens: int               # the documents' tokens (the ranking's tokenizer), within one document of the target

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


class ArmResult(BaseModel):
    """What one arm and seed measured after training (or the base model, `arm` = "base")."""

    arm: str
    kind: str
    seed: int
    documents: int
    distinct_tokens: int      # tokens of the arm's documents
    trained_tokens: int       # tokens the optimiser saw: steps × batch_rows × seq_len
    reasoning_loss: float     # nats per completion token, mean over reasoning queries
    factual_loss: float | None
    general_ppl: float
    accuracy: float | None    # exact match of greedy completions, answers recomputed from the prompts
    per_task_loss: dict[str, float]
    per_task_accuracy: dict[str, float]
    curve: list[dict]         # {tokens, reasoning_loss, factual_loss} at step 0 and each checkpoint
    seconds: float = 0.0
    # metric → query id → the query's value (its completion loss; 1.0 or 0.0 for a right or wrong answer): what
    # the bootstrap over queries resamples. None in results measured before it was recorded.
    per_query: dict[str, dict[str, float]] | None = None
