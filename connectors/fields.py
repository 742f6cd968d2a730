"""Picking the text and id out of a record (a dict from JSON, Parquet or Arrow)."""

from __future__ import annotations

from curator.connectors.records import BadRecord, RawDocument, ReadSettings

_MISSING = object()

_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def get_field(record: dict, name: str):
    """`name` may be a dotted path into nested objects (`meta.content`)."""
    if name in record:
        return record[name]
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def to_document(record: dict, origin: str, settings: ReadSettings) -> RawDocument | BadRecord:
    text = get_field(record, settings.text_field)
    if text is _MISSING:
        return BadRecord(origin, "missing text field", f"no field {settings.text_field!r}")
    if text is None:
        return BadRecord(origin, "missing text field", f"field {settings.text_field!r} is null")
    if not isinstance(text, str):
        kind = _TYPE_NAMES.get(type(text), type(text).__name__)
        return BadRecord(origin, "text field not a string", f"field {settings.text_field!r} is {kind}")
    if not text.strip():
        return BadRecord(origin, "empty text", f"field {settings.text_field!r} is blank")

    id_name = settings.id_field or "id"
    external_id = get_field(record, id_name)
    if external_id is _MISSING or external_id is None:
        if settings.id_field is not None:
            return BadRecord(origin, "missing id field", f"no field {settings.id_field!r}")
        external_id = None
    else:
        external_id = str(external_id)

    metadata = {k: v for k, v in record.items() if k != settings.text_field and k != id_name}
    return RawDocument(text=text, origin=origin, external_id=external_id, metadata=metadata or None)
