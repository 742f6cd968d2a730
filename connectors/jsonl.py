"""JSON Lines, plain or gzip/zstd compressed: one JSON object per line.

Streams line by line, so memory stays bounded whatever the file's size. Each
bad line becomes a :class:`BadRecord` naming file:line; blank lines are not
records and are passed over.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from curator.connectors.compression import DECOMPRESSION_ERRORS, open_decompressed
from curator.connectors.fields import to_document
from curator.connectors.records import BadRecord, ByteCounter, InputFile, RawDocument, ReadSettings

_PROGRESS_EVERY = 1024  # lines between progress updates


def read_jsonl(
    file: InputFile, settings: ReadSettings, progress: ByteCounter
) -> Iterator[RawDocument | BadRecord]:
    stream, raw, compression = open_decompressed(file.path)
    counted = 0
    lineno = 0
    seen_record = False
    try:
        try:
            for lineno, line in enumerate(stream, 1):
                if lineno % _PROGRESS_EVERY == 0:
                    position = raw.tell()
                    progress.done += position - counted
                    counted = position
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                seen_record = True
                yield _parse_line(line, f"{file.display}:{lineno}", settings)
        except DECOMPRESSION_ERRORS as exc:
            yield BadRecord(
                f"{file.display}:{lineno + 1}",
                "unreadable file",
                f"{compression or 'file'} stream is corrupt or truncated ({exc}); the rest of the file was skipped",
            )
            seen_record = True
        if not seen_record:
            yield BadRecord(file.display, "empty file", "no records")
    finally:
        stream.close()
        raw.close()
        progress.done += file.size - counted


def _parse_line(line: bytes, origin: str, settings: ReadSettings) -> RawDocument | BadRecord:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        # orjson rejects bytes that are not UTF-8 too; name that problem precisely.
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return BadRecord(origin, "not valid UTF-8", f"byte 0x{line[bad.start]:02x} at column {bad.start + 1}")
        return BadRecord(origin, "malformed JSON", f"{exc.msg} at column {exc.colno}")
    if not isinstance(record, dict):
        return BadRecord(origin, "not a JSON object", f"the line holds a {type(record).__name__}")
    return to_document(record, origin, settings)
