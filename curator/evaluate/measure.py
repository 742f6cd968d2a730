"""What an evaluation measures on a model: completion loss, general-text perplexity, greedy accuracy.

Every number is computed the same way for the base model and every trained arm:
  completion loss   nats per completion token of each held-out query (prompt formatted as the ranking's
                    run formatted it), averaged over a task's queries;
  perplexity        exp(nats / predicted tokens) over the held-out documents, in windows of the training
                    sequence length;
  accuracy          greedy completions of the reasoning queries, right when the completion's final number
                    equals the answer solved again from the prompt (`heldout.answer_from_prompt`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from curator.catalog.queries import Query
from curator.constants import REASONING_TASKS
from curator.evaluate.heldout import answer_from_prompt, answer_in_completion
from curator.model.tokens import Window, format_prompt, pad_batch, pad_token_id, split_windows, tokenize_query

ROWS_PER_BATCH = 16
# Part of every evaluation's id: a change to what is measured, or how, must not reuse arms measured the
# old way. 2: the stated answer is read across blank lines (chat models' layout).
VERSION = 2


def _summed_losses(model, windows: Sequence[Window], pad_id: int, device) -> list[tuple[float, int]]:
    """(nats, predicted tokens) of each window's targets, from the model's own logits."""
    out = []
    for start in range(0, len(windows), ROWS_PER_BATCH):
        batch = pad_batch(windows[start:start + ROWS_PER_BATCH], pad_id, device)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        targets = batch.target_mask[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1),
                              reduction="none").reshape(targets.shape)
        sums = (nll * targets).sum(dim=1).double().tolist()
        out += list(zip(sums, targets.sum(dim=1).tolist(), strict=True))
    return out


def _losses_in_eval_mode(model, tokenizer, windows: Sequence[Window]) -> list[tuple[float, int]]:
    """(nats, target tokens) per window, measured with dropout off; the model's mode is put back after."""
    was_training = model.training
    model.eval()
    try:
        return _summed_losses(model, windows, pad_token_id(tokenizer), next(model.parameters()).device)
    finally:
        model.train(was_training)


def query_windows(tokenizer, queries: Sequence[Query], max_len: int, chat_template: str) -> list[Window]:
    return [tokenize_query(tokenizer, i, q.prompt, q.completion, max_len, chat_template, q.id)
            for i, q in enumerate(queries)]


def completion_losses(model, tokenizer, queries: Sequence[Query], windows: Sequence[Window]) -> dict[str, float]:
    """Nats per completion token of each query, by id."""
    losses = _losses_in_eval_mode(model, tokenizer, windows)
    return {q.id: nats / max(tokens, 1) for q, (nats, tokens) in zip(queries, losses, strict=True)}


def task_means(queries: Sequence[Query], per_query: dict[str, float]) -> dict[str, float]:
    by_task: dict[str, list[float]] = {}
    for q in queries:
        if q.id in per_query:
            by_task.setdefault(q.task, []).append(per_query[q.id])
    return {task: sum(v) / len(v) for task, v in sorted(by_task.items())}


def by_metric(queries: Sequence[Query], per_query: dict[str, float], records: Sequence[dict]
              ) -> dict[str, dict[str, float]]:
    """The per-query values behind each query metric, by query id: the reasoning and control queries'
    losses, and 1.0 / 0.0 for each checked answer. Each metric is the plain mean of its values."""
    return {"reasoning_loss": {q.id: per_query[q.id] for q in queries if q.task in REASONING_TASKS},
            "factual_loss": {q.id: per_query[q.id] for q in queries if q.task not in REASONING_TASKS},
            "accuracy": {r["id"]: float(r["got"] == r["expected"]) for r in records}}


def split_means(queries: Sequence[Query], per_query: dict[str, float]) -> tuple[float, float | None]:
    """(mean over reasoning queries, mean over the other (control) queries or None)."""
    reasoning = [per_query[q.id] for q in queries if q.task in REASONING_TASKS]
    control = [per_query[q.id] for q in queries if q.task not in REASONING_TASKS]
    return sum(reasoning) / len(reasoning), (sum(control) / len(control) if control else None)


def text_windows(tokenizer, texts: Sequence[str], seq_len: int) -> list[Window]:
    windows = []
    for i, text in enumerate(texts):
        windows += split_windows(i, tokenizer(text)["input_ids"], seq_len)
    return windows


def perplexity(model, tokenizer, windows: Sequence[Window]) -> float:
    losses = _losses_in_eval_mode(model, tokenizer, windows)
    nats = sum(n for n, _ in losses)
    tokens = sum(t for _, t in losses)
    return math.exp(nats / max(tokens, 1))


def checkable(queries: Sequence[Query]) -> list[tuple[Query, int]]:
    """The reasoning queries whose prompt states a problem `answer_from_prompt` can solve, with that answer."""
    out = []
    for q in queries:
        if q.task in REASONING_TASKS and (answer := answer_from_prompt(q.task, q.prompt)) is not None:
            out.append((q, answer))
    return out


def greedy_completions(model, tokenizer, prompts: Sequence[str], chat_template: str, max_new_tokens: int
                       ) -> list[str]:
    """Greedy continuations of each prompt (formatted as for scoring), left-padded in batches."""
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), ROWS_PER_BATCH):
            encoded = []
            for prompt in prompts[start:start + ROWS_PER_BATCH]:
                text, templated = format_prompt(tokenizer, prompt, chat_template)
                encoded.append(tokenizer(text, add_special_tokens=not templated)["input_ids"])
            width = max(len(ids) for ids in encoded)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                           max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                           eos_token_id=eos, num_beams=1, temperature=None, top_p=None,
                                           top_k=None)
            for row in generated[:, width:].tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def accuracy(model, tokenizer, checked: Sequence[tuple[Query, int]], chat_template: str, max_new_tokens: int
             ) -> tuple[float | None, dict[str, float], list[dict]]:
    """(overall exact match, per task, one record per query: id, expected, got, completion)."""
    if not checked:
        return None, {}, []
    completions = greedy_completions(model, tokenizer, [q.prompt for q, _ in checked], chat_template,
                                     max_new_tokens)
    records, by_task = [], {}
    for (query, expected), text in zip(checked, completions, strict=True):
        got = answer_in_completion(text)
        records.append({"id": query.id, "task": query.task, "expected": expected, "got": got, "completion": text})
        by_task.setdefault(query.task, []).append(got == expected)
    per_task = {task: sum(v) / len(v) for task, v in sorted(by_task.items())}
    overall = sum(r["got"] == r["expected"] for r in records) / len(records)
    return overall, per_task, records
