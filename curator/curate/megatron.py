"""Megatron-LM's indexed dataset: a `.bin` of token ids and an `.idx` describing it.

Layout of the `.idx` (little-endian), as Megatron's MMapIndexedDataset reads it:
  9 bytes   magic  b"MMIDIDX\\x00\\x00"
  uint64    version = 1
  uint8     dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
  uint64    number of sequences
  uint64    number of document boundaries (documents + 1)
  int32[n]  sequence lengths, in tokens
  int64[n]  byte offset of each sequence in the `.bin`
  int64[m]  document boundaries, as sequence indices (0, 1, ..., n: one sequence per document)
The `.bin` holds the sequences' token ids back to back in that dtype.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as Megatron's preprocessing chooses), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedWriter:
    """Appends documents (one sequence each) to a `.bin`, then writes the `.idx`."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.lengths: list[int] = []
        self.handle = open(prefix.with_suffix(".bin"), "wb")

    def add(self, ids) -> int:
        array = np.asarray(ids, dtype=self.dtype)
        self.handle.write(array.tobytes(order="C"))
        self.lengths.append(len(array))
        return array.nbytes

    def close(self) -> None:
        self.handle.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            offsets[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        boundaries = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.prefix.with_suffix(".idx"), "wb") as idx:
            idx.write(MAGIC)
            idx.write(struct.pack("<Q", VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", len(lengths)))
            idx.write(struct.pack("<Q", len(boundaries)))
            idx.write(lengths.tobytes())
            idx.write(offsets.tobytes())
            idx.write(boundaries.tobytes())
