"""The one training loop every arm goes through.

Same initial weights, optimiser (AdamW, β = (0.9, 0.95)), schedule (linear warm-up, then cosine decay
to a tenth of the peak), batch shape (batch_rows × seq_len tokens) and data-order seed for every arm:
only the documents differ. An arm's documents are put in an order that depends on their ids and the
seed alone, concatenated with EOS between them, and cut into sequences; an arm whose documents hold
fewer tokens than the steps need (less than one document short, by construction of the arms) starts
over from its first document, so every arm trains on exactly steps × batch_rows × seq_len tokens.

At each checkpoint the held-out losses are measured (the curve of loss over training tokens) and the
model, optimiser and random-generator states are saved (`state.pt`, written as `.part` and renamed); a
killed arm resumes from its last checkpoint and reaches bit-for-bit the numbers an uninterrupted run
reaches. torch's generators (dropout) are seeded at the start of every arm from its seed alone, so an
arm's numbers depend neither on the arms trained before it nor on where a resumed run started.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from curator.artifacts import atomic_file
from curator.errors import CuratorError
from curator.evaluate.arms import seeded_order
from curator.evaluate.config import EvaluateConfig

STATE_FILE = "state.pt"


def data_order(doc_ids: Sequence[int], seed: int) -> list[int]:
    return seeded_order(sorted(doc_ids), seed, "data-order")


def packed_sequences(token_lists: Sequence[Sequence[int]], eos_id: int, config: EvaluateConfig) -> torch.Tensor:
    """(steps, batch_rows, seq_len) token ids: the documents (in order) with EOS after each, cycled."""
    stream = [t for ids in token_lists for t in (*ids, eos_id)]
    need = config.steps * config.batch_tokens
    if not stream:
        raise CuratorError("an arm has no tokens to train on")
    repeats = -(-need // len(stream))
    full = (stream * repeats)[:need]
    return torch.tensor(full, dtype=torch.long).reshape(config.steps, config.batch_rows, config.seq_len)


def learning_rate(step: int, config: EvaluateConfig) -> float:
    steps = config.steps
    warm = max(1, round(config.warmup * steps)) if config.warmup > 0 else 0
    if step < warm:
        return config.peak_lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return config.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_steps(config: EvaluateConfig) -> list[int]:
    steps = config.steps
    return sorted({max(1, round(k * steps / config.checkpoints)) for k in range(1, config.checkpoints + 1)})


def optimiser(model, config: EvaluateConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.peak_lr, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=config.weight_decay, foreach=False)


class Progress:
    """What a training loop reports; the CLI draws a bar from it, tests stop it at a checkpoint."""

    def stage(self, text: str) -> None: ...
    def arm(self, label: str, steps: int, done: int) -> None: ...
    def advance(self, steps: int) -> None: ...
    def checkpoint(self, label: str, step: int) -> None: ...


def training_seed(seed: int) -> int:
    """The seed of torch's generators (dropout) for every arm of `seed`: like the data order, the same for
    every arm of a seed, so arms given the same documents train identically, dropout or not."""
    return int.from_bytes(hashlib.sha256(f"curator-evaluate-train:{seed}".encode()).digest()[:8], "big") >> 1


def rng_state() -> dict:
    """torch's generator states (CPU, and every CUDA device when there are any)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def train_arm(model, initial_state: dict, sequences: torch.Tensor, config: EvaluateConfig, folder: Path,
              arm_key: str, seed: int, start: dict, measure: Callable[[], dict], progress: Progress,
              label: str) -> list[dict]:
    """Train `model` from `initial_state` on `sequences`, resuming from `folder/state.pt` when it holds a
    checkpoint of this arm (and then its generators' states; else torch is seeded from `training_seed`).
    Returns the curve {tokens, ...measure()}: `start` (the starting weights' numbers, measured once for
    all arms) and each checkpoint before the last; the caller measures the trained model in full and adds
    the last point."""
    device = next(model.parameters()).device
    model.load_state_dict(initial_state)
    model.requires_grad_(True)
    model.train()
    opt = optimiser(model, config)
    state_path = folder / STATE_FILE
    first, curve = 0, [{"tokens": 0, **start}]
    # Dropout draws from torch's generators: seeded for every arm (whatever ran before it) and saved with
    # each checkpoint (wherever a resumed run starts).
    torch.manual_seed(training_seed(seed))
    if state_path.is_file():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved.get("arm_key") == arm_key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            first, curve = int(saved["step"]), json.loads(saved["curve"])
            if "rng" in saved:             # (checkpoints written before the generators were saved lack it)
                set_rng_state(saved["rng"])
    marks = set(checkpoint_steps(config))
    progress.arm(label, config.steps, first)
    for step in range(first, config.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = sequences[step].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise CuratorError(f"arm {label}: the training loss became {loss.item()} at step {step + 1}; "
                               f"lower --lr (now {config.peak_lr:g})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        progress.advance(1)
        if step + 1 in marks:
            if step + 1 < config.steps:
                curve.append({"tokens": (step + 1) * config.batch_tokens, **measure()})
            save_state(state_path, {"arm_key": arm_key, "step": step + 1, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "curve": json.dumps(curve),
                                    "rng": rng_state()})
            progress.checkpoint(label, step + 1)
    model.eval()
    return curve


def save_state(path: Path, state: dict) -> None:
    with atomic_file(path) as part:
        torch.save(state, part)
