"""Plain files, one document each: source code, Markdown, TeX, text.

Binary files (a NUL byte in the first 8 KiB) and files that are not UTF-8 are
reported and skipped, never decoded with replacement characters.
"""

from __future__ import annotations

from collections.abc import Iterator

from curator.connectors.kinds import kind_from_extension
from curator.connectors.records import BadRecord, ByteCounter, InputFile, RawDocument, ReadSettings

BINARY_SNIFF_BYTES = 8192


def read_text_file(
    file: InputFile, settings: ReadSettings, progress: ByteCounter
) -> Iterator[RawDocument | BadRecord]:
    try:
        try:
            data = file.path.read_bytes()
        except OSError as exc:
            yield BadRecord(file.display, "unreadable file", str(exc))
            return
        if not data.strip():
            yield BadRecord(file.display, "empty file", "no text" if data else "0 bytes")
            return
        if b"\x00" in data[:BINARY_SNIFF_BYTES]:
            yield BadRecord(file.display, "binary file", "contains NUL bytes")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            yield BadRecord(
                f"{file.display}:{line}", "not valid UTF-8", f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
            )
            return
        relative = file.extra.get("relative", file.path.name)
        yield RawDocument(
            text=text,
            origin=file.display,
            external_id=relative,
            kind=kind_from_extension(file.path),
            metadata={"path": relative, "extension": file.path.suffix.lower()},
        )
    finally:
        progress.done += file.size
