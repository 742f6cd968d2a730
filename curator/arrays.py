"""Arrow columns to numpy arrays and back, without pyarrow's import of pandas.

pyarrow 26 imports pandas the first time an array is converted with `to_numpy` (or `np.asarray`), or
built from a numpy array with `pa.array`, whether or not pandas is used: 0.8–1.1 s of a stage's start
on this project's 2-core machine, a fifth of ranking 2M documents. A fixed-width number column without
nulls is one buffer, so it is read in place (zero copy, read-only) and built around the numpy array's
memory; anything else (nulls, booleans, strings) goes through pyarrow's own conversion.
"""

from __future__ import annotations

import numpy as np

# Arrow's names of the fixed-width number types (`str(type)`) → numpy's dtypes. (pyarrow's own
# `to_pandas_dtype` imports pandas too.)
_NUMBERS = {**{f"{sign}int{bits}": np.dtype(f"{sign}int{bits}") for sign in ("", "u") for bits in (8, 16, 32, 64)},
            "halffloat": np.dtype(np.float16), "float": np.dtype(np.float32), "double": np.dtype(np.float64)}


def numpy_of(column) -> np.ndarray:
    """A pyarrow Array or ChunkedArray as a numpy array (a read-only view where it can be one)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    dtype = _NUMBERS.get(str(column.type))
    if dtype is not None and column.null_count == 0:
        data = column.buffers()[1]
        if data is None:                     # an empty array may have no data buffer
            return np.empty(0, dtype=dtype)
        view = np.frombuffer(data, dtype=dtype, count=len(column), offset=column.offset * dtype.itemsize)
        view.setflags(write=False)           # Arrow's memory (a Parquet read's is writable): never write into it
        return view
    return column.to_numpy(zero_copy_only=False)


def arrow_of(values: np.ndarray, kind: str):
    """A numpy array as a pyarrow Array of the number type `kind` ("int64", "double", …: Arrow's names),
    converted first if it is another type that converts without loss (int32 → int64, float32 → double;
    float → int64 is refused, as `pa.array` refuses it)."""
    import pyarrow as pa

    dtype = _NUMBERS[kind]
    values = np.ascontiguousarray(np.asarray(values).astype(dtype, casting="safe", copy=False))
    return pa.Array.from_buffers(pa.type_for_alias(kind), len(values), [None, pa.py_buffer(values)])
