"""Arrow number columns to numpy and back without pyarrow's pandas import (curator/arrays.py). (pyarrow's
dataset reader, `pq.read_table`, imports pandas itself; the stages read parts with `ParquetFile`.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curator.arrays import arrow_of, numpy_of


def test_numpy_of_reads_offsets_chunks_empties_and_nulls(tmp_path):
    values = np.arange(10, dtype=np.int64)
    table = pa.Table.from_arrays([arrow_of(values, "int64"), arrow_of(values / 4, "double")], names=["i", "x"])
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    read = pq.read_table(tmp_path / "t.parquet")
    assert read.column("i").num_chunks > 1                       # several row groups: a chunked column
    np.testing.assert_array_equal(numpy_of(read.column("i")), values)
    np.testing.assert_array_equal(numpy_of(read.column("x").chunk(0).slice(1, 2)), values[1:3] / 4)  # an offset
    empty = numpy_of(pa.chunked_array([], type=pa.float32()))
    assert empty.dtype == np.float32 and len(empty) == 0
    with_null = numpy_of(pa.array([1.5, None], type=pa.float64()))
    assert with_null[0] == 1.5 and np.isnan(with_null[1])
    assert numpy_of(pa.array([1, 2], type=pa.uint16())).dtype == np.uint16


def test_numpy_of_views_are_read_only(tmp_path):
    pq.write_table(pa.table({"x": arrow_of(np.ones(4), "double")}), tmp_path / "t.parquet")
    view = numpy_of(pq.read_table(tmp_path / "t.parquet").column("x"))
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 2.0


def test_arrow_of_converts_only_without_loss():
    assert arrow_of(np.array([1, 2], dtype=np.int32), "int64").type == pa.int64()
    assert arrow_of(np.array([0.5], dtype=np.float32), "double").to_pylist() == [0.5]
    with pytest.raises(TypeError):
        arrow_of(np.array([1.7]), "int64")


def test_neither_direction_imports_pandas(tmp_path):
    code = (f"import sys, numpy as np, pyarrow.parquet as pq, pyarrow as pa\n"
            f"from curator.arrays import arrow_of, numpy_of\n"
            f"pq.write_table(pa.table({{'x': arrow_of(np.arange(5), 'int64')}}), {str(tmp_path / 'p.parquet')!r})\n"
            f"assert numpy_of(pq.ParquetFile({str(tmp_path / 'p.parquet')!r}).read().column('x')).sum() == 10\n"
            f"print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
