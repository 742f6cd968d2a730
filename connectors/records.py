"""What every connector yields: a document, or a bad record with its reason.

These are plain slotted classes rather than pydantic models because millions of
them pass through the hot loop of an ingest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from curator.constants import Kind, values

KINDS: tuple[str, ...] = values(Kind)

@dataclass(slots=True)
class RawDocument:
    text: str
    origin: str                       # file:line, file#row N, or a path
    external_id: str | None = None
    kind: str | None = None           # None: the source's kind decides
    metadata: dict | None = None


@dataclass(slots=True)
class BadRecord:
    origin: str
    problem: str                      # short category, e.g. "malformed JSON"
    detail: str = ""                  # what exactly, for the user

    @property
    def reason(self) -> str:
        return f"{self.problem}: {self.detail}" if self.detail else self.problem


@dataclass(slots=True)
class ReadSettings:
    """How records become documents; shared by every connector."""

    text_field: str = "text"
    id_field: str | None = None       # None: use an `id` field when present


@dataclass(slots=True)
class ByteCounter:
    """Input bytes consumed so far (compressed bytes for compressed files)."""

    done: int = 0


@dataclass(slots=True)
class InputFile:
    """One file of a planned ingest, with the reader that will read it."""

    path: Path
    display: str                      # how messages name it: the path as the user gave it
    format: Literal["jsonl", "parquet", "text", "hf"]
    size: int
    mtime_ns: int
    extra: dict = field(default_factory=dict)   # e.g. the split of an HF dataset file
