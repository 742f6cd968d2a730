"""Open a file as a binary stream, decompressing gzip or zstd by its magic bytes."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# What a truncated or corrupt compressed stream raises while it is being read.
DECOMPRESSION_ERRORS = (zstandard.ZstdError, EOFError, gzip.BadGzipFile, OSError)


def open_decompressed(path: Path) -> tuple[io.BufferedIOBase, io.BufferedIOBase, str | None]:
    """Returns (stream to read, underlying raw file, compression name or None).

    The raw file's position tells how far into the input we are, for progress.
    """
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw, "gzip"
    if magic.startswith(ZSTD_MAGIC):
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20), raw, "zstd"
    return raw, raw, None
