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
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20), raw, "zstd"
    return raw, raw, None


class TruncatedStream(OSError):
    pass


class _ZstdFrames(io.RawIOBase):
    """Decompresses consecutive zstd frames, and raises if the input ends inside one.

    zstandard's own stream reader returns a truncated frame's data and then simply
    stops, which would make a cut-off file look complete.
    """

    def __init__(self, raw: io.BufferedIOBase, read_size: int = 1 << 20):
        self._raw = raw
        self._read_size = read_size
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = b""      # decompressed bytes not yet handed out, from _offset on
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            data = self._raw.read(self._read_size)
            if not data:
                if self._in_frame:
                    raise TruncatedStream("the input ends inside a zstd frame (truncated file)")
                return 0
            self._pending, self._offset = self._decompress(data), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = memoryview(self._pending)[self._offset:self._offset + n]
        self._offset += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            # The frame ended; anything after it starts the next frame.
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)
