"""Hugging Face datasets saved with ``save_to_disk`` (a Dataset or a DatasetDict).

The on-disk format is Arrow IPC stream files listed in ``state.json`` (one per
split folder for a DatasetDict, whose splits ``dataset_dict.json`` names). They
are read with pyarrow directly, batch by batch: the ``datasets`` package is not
needed to ingest them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from curator.connectors.arrow_rows import check_text_column, documents_from_batches
from curator.connectors.records import BadRecord, ByteCounter, InputFile, RawDocument, ReadSettings


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def arrow_files(root: Path) -> list[tuple[Path, str | None]]:
    """The dataset's Arrow files in order, each with its split (None for a plain Dataset)."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        return [(path, split) for split in splits for path, _ in arrow_files(root / split)]
    state = json.loads((root / "state.json").read_text())
    return [(root / entry["filename"], None) for entry in state["_data_files"]]


def read_hf_arrow(
    file: InputFile, settings: ReadSettings, progress: ByteCounter
) -> Iterator[RawDocument | BadRecord]:
    try:
        try:
            source = pa.memory_map(str(file.path))
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowException, OSError) as exc:
            yield BadRecord(file.display, "unreadable file", f"not an Arrow stream file ({exc})")
            return
        problem = check_text_column(reader.schema, settings, file.display)
        if problem:
            yield problem
            return
        split = file.extra.get("split")
        yield from documents_from_batches(reader, file.display, settings, {"split": split} if split else None)
    finally:
        progress.done += file.size
