"""The one loop over documents that every model pass shares: fit, exact scoring, sketching.

Documents are read from the catalog a chunk at a time, split into token
windows, batched, and run through one forward + backward; each tracked
layer's (a, δ) goes to the caller's ``LayerWork``, which may add a per-window
row of numbers (scores, a sketch) into the batch's output. The pass sums those
rows over each document's windows and hands every finished chunk of documents
to ``on_chunk``. A chunk that ``chunk_done`` says exists already is skipped,
which is how a killed run resumes. Under torchrun the chunks still to do are
handed out to ranks balanced by size (curator/model/distributed.py); the chunks
themselves are the same on any number of ranks, so a run resumes on any number.

Fitting passes ``width=0``: its layer work accumulates statistics itself and
the chunks carry no output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from curator.catalog.database import Catalog
from curator.catalog.documents import chunk_sizes, read_texts
from curator.model.distributed import SINGLE, Ranks, assign
from curator.model.losses import backward_layers
from curator.model.tokens import TokenBatch, Window, batches, pad_token_id, tokenize_documents


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


# (layer name, a, δ, the batch, its output rows (windows × width)) → None; adds into the output.
LayerWork = Callable[[str, torch.Tensor, torch.Tensor, TokenBatch, torch.Tensor], None]


@dataclass(frozen=True)
class PassSettings:
    max_len: int                 # tokens per window
    batch_tokens: int            # tokens per forward + backward, padding included
    chunk_docs: int              # documents per chunk (the unit of output and of resuming)
    labels: str = "data"         # "data", or "sampled" from the model (the true Fisher)
    seed: int = 0                # of the sampled labels (drawn per document window: see losses.label_uniforms)


@dataclass
class PassTotals:
    windows: int = 0
    tokens: int = 0


def chunks_of(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[start:start + size]) for start in range(0, len(ids), size)]


def chunk_texts(catalog: Catalog, ids: Sequence[int]) -> list[tuple[int, str]]:
    """(id, text) of these documents, in one statement."""
    return [row for part in read_texts(catalog, ids, chunk=max(len(ids), 1)) for row in part]


def windows_of(tokenizer, rows: list[tuple[int, str]], max_len: int, counts: dict[int, int]) -> list[Window]:
    """The windows of these documents (in id order within each), filling `counts` with token counts."""
    windows, chunk_counts = tokenize_documents(tokenizer, rows, max_len)
    counts.update(chunk_counts)
    return windows


def document_windows(catalog: Catalog, tokenizer, ids: Sequence[int], max_len: int, counts: dict[int, int]
                     ) -> list[Window]:
    return windows_of(tokenizer, chunk_texts(catalog, ids), max_len, counts)


def read_ahead(catalog: Catalog, chunks: list[list[int]], order: list[int]) -> Iterator[list[tuple[int, str]]]:
    """The texts of chunks[n] for n in `order`, each read on a thread while the caller works on the one
    before: a pass's catalog opens a connection per statement (so writers get their turn between
    chunks), and the opening then overlaps the model's work instead of adding to it."""
    from concurrent.futures import ThreadPoolExecutor

    reader = ThreadPoolExecutor(1, thread_name_prefix="curator-read-ahead")
    try:
        upcoming = reader.submit(chunk_texts, catalog, chunks[order[0]]) if order else None
        for position in range(len(order)):
            rows = upcoming.result()
            if position + 1 < len(order):
                upcoming = reader.submit(chunk_texts, catalog, chunks[order[position + 1]])
            yield rows
    finally:
        # When the pass fails, its error comes out now, not after a read that may be waiting its turn.
        reader.shutdown(wait=False, cancel_futures=True)


def document_batches(catalog: Catalog, tokenizer, ids: Sequence[int], max_len: int, batch_tokens: int,
                     device, counts: dict[int, int], chunk_docs: int = 256
                     ) -> Iterator[tuple[int, TokenBatch | None]]:
    """(documents finished, batch) pairs, `chunk_docs` documents batched together at a time;
    a chunk's document count comes with its last batch."""
    pad = pad_token_id(tokenizer)
    for chunk in chunks_of(ids, chunk_docs):
        windows = document_windows(catalog, tokenizer, chunk, max_len, counts)
        planned = list(batches(windows, batch_tokens, pad, device))
        if not planned:
            yield len(chunk), None
        for position, batch in enumerate(planned):
            yield (len(chunk) if position == len(planned) - 1 else 0), batch


def plan_chunks(catalog: Catalog, chunks: list[list[int]], chunk_done, ranks: Ranks) -> list[int]:
    """The numbers of the chunks this rank does: those not done, balanced over ranks by size.

    Rank 0 decides and tells the others, so no rank sees a chunk that another has just
    finished as done and the plan covers every chunk once.
    """
    plan = None
    if ranks.main:
        pending = [n for n, chunk in enumerate(chunks) if chunk_done is None or not chunk_done(n, chunk)]
        sizes = chunk_sizes(catalog, [chunks[n] for n in pending]) if ranks.distributed else [0] * len(pending)
        plan = [[pending[i] for i in mine] for mine in assign(sizes, ranks.world)]
    return ranks.share(plan)[ranks.rank]


def document_pass(model, modules: dict, tokenizer, catalog: Catalog, ids: Sequence[int], settings: PassSettings,
                  work: LayerWork, *, width: int = 0,
                  on_chunk: Callable[[int, list[int], torch.Tensor], None] | None = None,
                  chunk_done: Callable[[int, list[int]], bool] | None = None,
                  progress: PassProgress | None = None, description: str = "documents",
                  counts: dict[int, int] | None = None, ranks: Ranks = SINGLE) -> PassTotals:
    """One forward + backward over every window of every document, chunk by chunk.

    `on_chunk(number, chunk ids, sums)` receives each finished chunk with `sums`
    (documents × width, float64, CPU): the per-window output rows summed over each
    document's windows. Under torchrun each rank does its share of the chunks and
    the totals are this rank's. Sampled labels are drawn per document window from
    `settings.seed`, so they do not depend on chunks, batches or ranks.
    """
    counts = counts if counts is not None else {}
    chunks = chunks_of(ids, settings.chunk_docs)
    mine = plan_chunks(catalog, chunks, chunk_done, ranks)
    progress = progress or NoProgress()
    if ranks.distributed:
        progress = progress if ranks.main else NoProgress()
        progress.stage(f"{description} (rank 0 of {ranks.world}: its share)", sum(len(chunks[n]) for n in mine))
    else:
        progress.stage(description, len(ids))
        for number in sorted(set(range(len(chunks))) - set(mine)):           # finished by an earlier run
            progress.advance(len(chunks[number]), 0)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    totals = PassTotals()
    for number, rows in zip(mine, read_ahead(catalog, chunks, mine), strict=True):
        chunk = chunks[number]
        position = {doc_id: row for row, doc_id in enumerate(chunk)}
        sums = torch.zeros(len(chunk), width, dtype=torch.float64)
        windows = windows_of(tokenizer, rows, settings.max_len, counts)
        for batch in batches(windows, settings.batch_tokens, pad, device):
            output = torch.zeros(batch.input_ids.shape[0], width, device=device)

            def on_layer(name, a, delta, batch=batch, output=output):
                work(name, a, delta, batch, output)

            backward_layers(model, modules, batch, on_layer, labels=settings.labels, seed=settings.seed)
            if width:
                rows = torch.tensor([position[owner] for owner in batch.owners.tolist()])
                sums.index_add_(0, rows, output.double().cpu())
            totals.windows += batch.input_ids.shape[0]
            totals.tokens += batch.tokens
            progress.advance(0, batch.tokens)
        if on_chunk is not None:
            on_chunk(number, chunk, sums)
        progress.advance(len(chunk), 0)
    return totals
