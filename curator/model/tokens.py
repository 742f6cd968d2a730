"""Turning documents and queries into token windows and padded batches.

A document longer than the window is split into windows that overlap by one
token, so every token after the first is predicted exactly once: the sum of
the windows' losses is the document's loss with a truncated context, and
because gradients are linear, a document's score is the sum of its windows'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from curator.errors import CuratorError


@dataclass(frozen=True)
class Window:
    owner: int               # document id, or the query's position in its suite
    ids: tuple[int, ...]
    first_target: int = 1    # positions >= first_target are predicted (queries: the completion)
    index: int = 0           # the window's number within its document (what seeds its sampled labels)

    @property
    def targets(self) -> int:
        return len(self.ids) - self.first_target


@dataclass
class TokenBatch:
    input_ids: object      # (B, T) long
    attention_mask: object # (B, T) long
    target_mask: object    # (B, T) bool: token t is predicted from tokens < t
    owners: object         # (B,) long
    windows: object = None # (B,) long: each row's window number within its owner

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def split_windows(owner: int, ids: Sequence[int], max_len: int) -> list[Window]:
    if max_len < 2:
        raise CuratorError("--max-seq-len must be at least 2 (one token of context, one to predict)")
    step = max_len - 1
    return [Window(owner, tuple(ids[start:start + max_len]), index=number)
            for number, start in enumerate(range(0, max(len(ids) - 1, 0), step))]


def tokenize_documents(tokenizer, docs: Sequence[tuple[int, str]], max_len: int
                       ) -> tuple[list[Window], dict[int, int]]:
    """Windows of a chunk of (doc_id, text) rows, and each document's token count."""
    if not docs:
        return [], {}
    encoded = tokenizer([text for _, text in docs], add_special_tokens=True)["input_ids"]
    windows, counts = [], {}
    for (doc_id, _), ids in zip(docs, encoded, strict=True):
        counts[doc_id] = len(ids)
        windows.extend(split_windows(doc_id, ids, max_len))
    return windows, counts


def format_prompt(tokenizer, prompt: str, chat_template: str = "auto") -> tuple[str, bool]:
    """The prompt as the model sees it, and whether it already carries special tokens."""
    if chat_template not in ("auto", "none"):
        raise CuratorError(f"--chat-template {chat_template!r}: expected auto or none")
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return text, True
    # Without a template the completion starts on a line of its own, as a reply would.
    return (prompt if prompt[-1:].isspace() else prompt + "\n"), False


def tokenize_query(tokenizer, owner: int, prompt: str, completion: str, max_len: int,
                   chat_template: str = "auto", query_id: str = "") -> Window:
    """prompt + completion as one window whose targets are the completion's tokens.

    The two parts are tokenized separately, so the boundary is exactly where the
    completion starts whatever the tokenizer would merge across it.
    """
    text, templated = format_prompt(tokenizer, prompt, chat_template)
    prompt_ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise CuratorError(f"query {query_id or owner}: the completion is empty")
    if not prompt_ids:
        raise CuratorError(f"query {query_id or owner}: the prompt is empty")
    ids = list(prompt_ids) + list(completion_ids)
    if len(ids) > max_len:
        raise CuratorError(
            f"query {query_id or owner} is {len(ids)} tokens, longer than the model's context ({max_len} tokens)")
    return Window(owner, tuple(ids), first_target=len(prompt_ids))


def pad_batch(windows: Sequence[Window], pad_id: int, device="cpu") -> TokenBatch:
    import torch

    width = max(len(w.ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(windows), width), dtype=torch.long)
    targets = torch.zeros((len(windows), width), dtype=torch.bool)
    for row, window in enumerate(windows):
        n = len(window.ids)
        input_ids[row, :n] = torch.tensor(window.ids, dtype=torch.long)
        attention[row, :n] = 1
        targets[row, window.first_target:n] = True
    owners = torch.tensor([w.owner for w in windows], dtype=torch.long)
    numbers = torch.tensor([w.index for w in windows], dtype=torch.long)
    return TokenBatch(input_ids.to(device), attention.to(device), targets.to(device), owners.to(device),
                      numbers.to(device))


# Per-sequence gradients take d_out × d_in floats per row and layer, so many short
# windows must not share one batch just because they fit the token budget.
MAX_ROWS = 64


def batches(windows: Iterable[Window], batch_tokens: int, pad_id: int, device="cpu",
            sort: bool = True, max_rows: int = MAX_ROWS) -> Iterator[TokenBatch]:
    """Padded batches of at most `batch_tokens` tokens (padding included) and `max_rows` rows.

    Sorting by length first keeps padding small; a window longer than the
    budget goes in a batch of its own.
    """
    pending = sorted(windows, key=lambda w: len(w.ids)) if sort else list(windows)
    group: list[Window] = []
    for window in pending:
        width = max([len(window.ids)] + [len(w.ids) for w in group])
        if group and (width * (len(group) + 1) > batch_tokens or len(group) >= max_rows):
            yield pad_batch(group, pad_id, device)
            group = []
        group.append(window)
    if group:
        yield pad_batch(group, pad_id, device)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
