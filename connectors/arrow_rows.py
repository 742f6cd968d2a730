"""Rows of Arrow record batches to documents; shared by the Parquet and HF readers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from curator.connectors.fields import to_document
from curator.connectors.records import BadRecord, RawDocument, ReadSettings


def check_text_column(schema: pa.Schema, settings: ReadSettings, where: str) -> BadRecord | None:
    """A whole file is unusable when its text column is absent or not a string."""
    top = settings.text_field.split(".")[0]
    if top not in schema.names:
        return BadRecord(
            where, "missing text field", f"no column {top!r} (columns: {', '.join(schema.names)})"
        )
    column_type = schema.field(top).type
    if top == settings.text_field and not (
        pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
        or pa.types.is_string_view(column_type)
    ):
        return BadRecord(where, "text field not a string", f"column {top!r} has type {column_type}")
    return None


def documents_from_batches(
    batches: Iterable[pa.RecordBatch],
    origin_prefix: str,
    settings: ReadSettings,
    extra_metadata: dict | None = None,
) -> Iterator[RawDocument | BadRecord]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            item = to_document(record, f"{origin_prefix}#row {row}", settings)
            if extra_metadata and isinstance(item, RawDocument):
                item.metadata = {**(item.metadata or {}), **extra_metadata}
            row += 1
            yield item
