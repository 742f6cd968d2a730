"""Model passes over documents: progress reporting and the shared loop.

Fitting (two passes) and scoring (one pass) all stream documents from the
catalog, tokenize them into windows, batch them and run a forward + backward
with the tracked layers' (a, δ) handed to a callback. This is that loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from curator.catalog.database import Catalog
from curator.catalog.corpus import document_windows
from curator.model.losses import backward_layers
from curator.model.tokens import TokenBatch, batches, pad_token_id


class PassProgress(Protocol):
    def stage(self, description: str, total_docs: int) -> None: ...
    def advance(self, docs: int, tokens: int) -> None: ...


class NoProgress:
    def stage(self, description: str, total_docs: int) -> None:
        pass

    def advance(self, docs: int, tokens: int) -> None:
        pass


class Timer:
    """Seconds per named stage, for run records."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.start, 3)

        return _Span()


def document_batches(catalog: Catalog, tokenizer, ids: Sequence[int], max_len: int, batch_tokens: int,
                     device, counts: dict[int, int]) -> Iterator[tuple[int, TokenBatch | None]]:
    """(documents finished, batch) pairs; a chunk's document count comes with its last batch."""
    pad = pad_token_id(tokenizer)
    for n_docs, windows in document_windows(catalog, tokenizer, ids, max_len, counts):
        chunk = list(batches(windows, batch_tokens, pad, device))
        if not chunk:
            yield n_docs, None
        for position, batch in enumerate(chunk):
            yield (n_docs if position == len(chunk) - 1 else 0), batch


def run_pass(model, modules: dict, catalog: Catalog, tokenizer, ids: Sequence[int], *, max_len: int,
             batch_tokens: int, labels: str, seed: int,
             on_batch: Callable[[TokenBatch], Callable[[str, torch.Tensor, torch.Tensor], None]],
             progress: PassProgress, counts: dict[int, int]) -> dict:
    """Forward + backward over every document; `on_batch(batch)` gives that batch's layer callback."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sequences = tokens = 0
    for done, batch in document_batches(catalog, tokenizer, ids, max_len, batch_tokens, device, counts):
        batch_tokens_seen = 0
        if batch is not None:
            backward_layers(model, modules, batch, on_batch(batch), labels=labels, generator=generator)
            sequences += batch.input_ids.shape[0]
            batch_tokens_seen = batch.tokens
            tokens += batch_tokens_seen
        progress.advance(done, batch_tokens_seen)
    return {"sequences": sequences, "tokens": tokens}
