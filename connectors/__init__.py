"""Corpus readers: every format becomes one stream of documents and bad records.

`plan_inputs` turns the paths a user gave into a list of files, each with the
reader that will read it (so an ingest knows its total size up front, and can
fingerprint its inputs); `read_inputs` streams them. One file per format:

- ``jsonl.py``      JSON Lines, plain / .gz / .zst
- ``parquet.py``    Parquet files
- ``hf.py``         Hugging Face datasets saved with ``save_to_disk``
- ``textfiles.py``  plain files as single documents (code, Markdown, TeX, text)
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from curator.constants import InputFormat as Format
from curator.constants import Kind
from curator.connectors.hf import arrow_files, is_saved_dataset, read_hf_arrow
from curator.connectors.jsonl import read_jsonl
from curator.connectors.parquet import read_parquet
from curator.connectors.records import (
    KINDS,
    BadRecord,
    ByteCounter,
    InputFile,
    RawDocument,
    ReadSettings,
)
from curator.connectors.textfiles import read_text_file

__all__ = [
    "KINDS", "BadRecord", "ByteCounter", "Format", "InputFile", "Kind", "RawDocument",
    "ReadSettings", "plan_inputs", "read_inputs", "format_from_name",
]

READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text_file, "hf": read_hf_arrow}

_COMPRESSED = (".gz", ".zst", ".zstd")
_SKIPPED_DIRS = {"__pycache__", "node_modules"}


def format_from_name(path: Path) -> str:
    """The reader for a file found in a directory, when --format is auto."""
    name = path.name.lower()
    compressed = name.endswith(_COMPRESSED)
    if compressed:
        name = name.rsplit(".", 1)[0]
    if name.endswith((".jsonl", ".ndjson")) or (compressed and name.endswith(".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def plan_inputs(
    paths: Sequence[str | os.PathLike], fmt: str = "auto", glob: str | None = None
) -> tuple[list[InputFile], list[BadRecord]]:
    """Expand paths into files to read. Returns the files and the paths that cannot be read."""
    files: list[InputFile] = []
    problems: list[BadRecord] = []
    for given in paths:
        path = Path(given)
        shown = str(given)
        if not path.exists():
            problems.append(BadRecord(shown, "missing path", "no such file or directory"))
        elif is_saved_dataset(path) and fmt in ("auto", "hf"):
            for arrow_path, split in arrow_files(path):
                if not arrow_path.is_file():
                    problems.append(BadRecord(str(arrow_path), "missing path", "listed in state.json but absent"))
                    continue
                display = os.path.join(shown, os.path.relpath(arrow_path, path))
                files.append(_input_file(arrow_path, display, "hf", split=split))
        elif fmt == "hf":
            problems.append(BadRecord(shown, "not a saved dataset", "no state.json or dataset_dict.json"))
        elif path.is_dir():
            found = list(_walk(path, glob))
            if not found:
                detail = f"no files matching {glob!r}" if glob else "no files"
                problems.append(BadRecord(shown, "empty directory", detail))
            for file in found:
                relative = file.relative_to(path).as_posix()
                file_format = format_from_name(file) if fmt == "auto" else fmt
                files.append(_input_file(file, os.path.join(shown, relative), file_format, relative=relative))
        elif path.is_file():
            file_format = format_from_name(path) if fmt == "auto" else fmt
            files.append(_input_file(path, shown, file_format, relative=path.name))
        else:
            problems.append(BadRecord(shown, "unreadable file", "not a regular file or directory"))
    return files, problems


def read_inputs(
    files: Sequence[InputFile], settings: ReadSettings, progress: ByteCounter | None = None
) -> Iterator[RawDocument | BadRecord]:
    progress = progress if progress is not None else ByteCounter()
    for file in files:
        yield from READERS[file.format](file, settings, progress)


def _walk(root: Path, glob: str | None) -> Iterator[Path]:
    """Files under root in a stable order, hidden files and caches left out."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            if not path.is_file():
                continue
            if glob and not fnmatch.fnmatch(path.relative_to(root).as_posix(), glob):
                continue
            yield path


def _input_file(path: Path, display: str, fmt: str, **extra) -> InputFile:
    stat = path.stat()
    return InputFile(path=path, display=display, format=fmt, size=stat.st_size,
                     mtime_ns=stat.st_mtime_ns, extra=extra)
