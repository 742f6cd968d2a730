"""Parquet files, read in record batches so that memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curator.connectors.arrow_rows import check_text_column, documents_from_batches
from curator.connectors.records import BadRecord, ByteCounter, InputFile, RawDocument, ReadSettings

BATCH_ROWS = 2048


def read_parquet(
    file: InputFile, settings: ReadSettings, progress: ByteCounter
) -> Iterator[RawDocument | BadRecord]:
    try:
        try:
            parquet = pq.ParquetFile(file.path)
        except (pa.ArrowException, OSError) as exc:
            yield BadRecord(file.display, "unreadable file", f"not a readable Parquet file ({exc})")
            return
        with parquet:
            problem = check_text_column(parquet.schema_arrow, settings, file.display)
            if problem:
                yield problem
                return
            if parquet.metadata.num_rows == 0:
                yield BadRecord(file.display, "empty file", "no rows")
                return
            try:
                yield from documents_from_batches(
                    parquet.iter_batches(batch_size=BATCH_ROWS), file.display, settings
                )
            except (pa.ArrowException, OSError) as exc:
                yield BadRecord(file.display, "unreadable file", f"corrupt Parquet data ({exc}); the rest was skipped")
    finally:
        progress.done += file.size
