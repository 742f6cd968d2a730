"""Dense slices of a run's scores for the audit: queries × documents numpy arrays of at most
SLICE_BYTES, in doc-id order, filled from the parts' score columns when every part has a summary
(as `curator score` writes them) and through DuckDB otherwise.

  query_groups     groups of queries, each with all its documents;
  document_blocks  blocks of documents, each with every query's scores;
  queries_of       a run's queries and, for a full table, its range of doc ids (the DuckDB reads join
                   the temporary table audit_queries it makes).

Either way a slice must be a full table: a document scored by some queries only, or twice by one,
is an error naming it.
"""

from __future__ import annotations

import mmap
from concurrent.futures import Executor, as_completed

import numpy as np

from curator.arrays import numpy_of
from curator.catalog.database import Catalog
from curator.catalog.records import RunRecord, score_files, sql_files
from curator.curate.scores import arrow_batches, query_rows
from curator.errors import CuratorError
from curator.influence.score_dataset import PartSummary

SLICE_BYTES = 2**30            # scores held at once: 1 GiB (float32: 2M documents × 134 queries)
READ_SHARES = 2               # reads of one document block, run side by side on the readers
LAZY_BYTES = 2**26             # slices from this size are mapped with small pages, faulted in as filled


class SliceMemory:
    """The memory of the audit's slices, taken once and lent to each slice in turn (the query groups, then
    the document blocks): a run larger than SLICE_BYTES is read as several slices, each of which used to
    be fresh memory, with the previous one still held while the next filled (4 × SLICE_BYTES at the peak).
    A slice lent is valid until the next is taken."""

    def __init__(self, reserve: int = 0):
        """`reserve`: bytes to map at the first take (a large region is mapped lazily: what no slice
        touches costs nothing), so that slices of different shapes up to it share one mapping."""
        self._region: np.ndarray | None = None
        self.reserve = reserve

    def take(self, shape: tuple[int, int], dtype, offset: int = 0) -> np.ndarray:
        """A slice of `shape` at byte `offset` of the memory (grown, the old memory dropped, if short)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._region is None or len(self._region) < offset + nbytes:
            self._region = None     # the old memory goes before the new is taken, unless a slice still holds it
            self._region = empty_slice((max(offset + nbytes, self.reserve),), np.uint8).reshape(-1)
        return self._region[offset:offset + nbytes].view(dtype).reshape(shape)


def not_full(run: RunRecord, doc_id: int, n: int, n_queries: int) -> CuratorError:
    return CuratorError(f"the scores of run {run.id} are not a full query × document table: document "
                        f"{doc_id} has {n} scores for {n_queries} queries")


def _positions(doc_ids: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
    """Where each of `ids` is in the sorted `doc_ids`: an offset for consecutive ids (searching 10⁸ ids
    in millions costs more than reading them), a binary search otherwise. None if one is not there."""
    if not len(ids):
        return ids
    if doc_ids[-1] - doc_ids[0] + 1 == len(doc_ids):
        at = ids - doc_ids[0]
        return at if at.min() >= 0 and at.max() < len(doc_ids) else None
    at = np.minimum(np.searchsorted(doc_ids, ids), len(doc_ids) - 1)
    return at if (doc_ids[at] == ids).all() else None


def _fill(catalog: Catalog, run: RunRecord, query: str, params: list, shape: tuple[int, int], dtype,
          row_offset: int, doc_ids: np.ndarray, column_offset: int = 0, memory: SliceMemory | None = None) -> np.ndarray:
    """A queries × documents slice from the rows (i, doc_id, score) of `query`, in `memory` when given.
    Cells start as NaN, so a pair scored twice, which leaves another pair without a score, is found as a
    NaN left over."""
    matrix = (memory or SliceMemory()).take(shape, dtype)
    matrix.fill(np.nan)
    for batch in arrow_batches(catalog, query, params, rows=1_000_000):
        at = _positions(doc_ids, numpy_of(batch.column("doc_id")))
        if at is None:
            raise CuratorError(f"the scores of run {run.id} are not a full query × document table: some "
                               f"documents are scored by some queries only")
        matrix[numpy_of(batch.column("i")) - row_offset, at - column_offset] = numpy_of(batch.column("score"))
    holes = np.isnan(matrix)
    if holes.any():
        column = int(np.argmax(holes.any(axis=0)))
        raise not_full(run, int(doc_ids[column + column_offset]), int(shape[0] - holes[:, column].sum()), shape[0])
    return matrix


def score_dtype(catalog: Catalog, view: str = "scores"):
    """Scores keep the dataset's precision (float32 as `curator score` writes them; float64 in older files)."""
    kind = dict((row[0], row[1]) for row in catalog.sql(f"DESCRIBE {view}"))["score"]
    return np.float32 if kind in ("FLOAT", "REAL") else np.float64


def _fill_from_parts(run: RunRecord, parts: list[PartSummary], rows: dict[str, int], doc_ids: np.ndarray,
                     start: int, stop: int, dtype, memory: SliceMemory | None = None) -> np.ndarray:
    """What `_fill` gives for the queries `rows` (id → row) × documents doc_ids[start:stop], read from parts
    with a summary: only the score column of the row groups holding those queries, each query's values
    put in place as one row (a part holds every one of its documents for each of its queries).

    That every cell is filled exactly once is checked from the parts' documents before any score is
    read, once per set of parts that hold the same queries (usually one set per query batch), so the
    slice needs no NaN fill and no pass to look for NaNs afterwards."""
    placed = _place(run, parts, doc_ids, start, stop)
    _check_covered(run, placed, rows, stop - start, doc_ids[start:stop])
    matrix = (memory or SliceMemory()).take((len(rows), stop - start), dtype)
    _read_into(matrix, placed, rows)
    return matrix


def rows_of(run: RunRecord, parts: list[PartSummary], query_ids: list[str], doc_ids: np.ndarray, dtype,
            memory: SliceMemory | None = None) -> np.ndarray:
    """The scores of `query_ids` × all of `doc_ids` (a full table's), from parts with summaries, in
    `memory` when given (valid until it lends the next slice)."""
    rows = {q: i for i, q in enumerate(query_ids)}
    return _fill_from_parts(run, parts, rows, doc_ids, 0, len(doc_ids), dtype, memory)


def _fill_from_parts_by_batch(run: RunRecord, parts: list[PartSummary], rows: dict[str, int],
                              doc_ids: np.ndarray, dtype, readers: Executor, memory: SliceMemory | None = None):
    """`_fill_from_parts` over all documents, its parts read on `readers`, one task per set of parts that
    hold the same queries (a query batch of `curator score`): the slice, and an iterator of the row
    positions that are complete, as the reads end, so that the caller analyses the first queries while
    the next are read (the cells' coverage is checked while the first reads run, before any row is handed
    out). A row is complete when every task holding its query has ended: a run scored again
    with less query memory holds a query in parts of different batches (all four queries over the first
    documents, two and two over the later ones)."""
    placed = _place(run, parts, doc_ids, 0, len(doc_ids))
    matrix = (memory or SliceMemory()).take((len(rows), len(doc_ids)), dtype)
    batches: dict[tuple[str, ...], list] = {}
    for item in placed:
        batches.setdefault(tuple(q for q in item[0].queries if q in rows), []).append(item)
    reads = {readers.submit(_read_into, matrix, items, rows): [rows[q] for q in queries]
             for queries, items in batches.items() if queries}
    # Checked while the reads run (they only fill the fresh slice): nothing is analysed before it passes.
    _check_covered(run, placed, rows, len(doc_ids), doc_ids)
    unread = np.zeros(len(rows), dtype=np.int64)          # per row: the reads holding it not yet ended
    for held in reads.values():
        unread[held] += 1

    def complete():
        for read in as_completed(reads):
            read.result()
            held = reads[read]
            unread[held] -= 1
            done = [row for row in held if unread[row] == 0]
            if done:
                yield done

    return matrix, complete()


def empty_slice(shape: tuple[int, int], dtype) -> np.ndarray:
    """`np.empty(shape, dtype)`; a large one (LAZY_BYTES or more) is an anonymous mapping of small pages
    that the readers fault in as they copy into it, two threads at once. Fresh memory is the audit's most
    variable cost on a virtual machine: numpy's large arrays ask for transparent huge pages, whose first
    touch took 0.8–2.2 s of system time for the 800 MB slice when the kernel had to compact memory for
    them; the whole mapping faulted in by one call (MAP_POPULATE) took 0.17–0.9 s on one thread while the
    readers waited for it; small pages faulted by the copies took 0.2 s of the readers' time."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    no_huge = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if no_huge is None or nbytes < LAZY_BYTES:
        return np.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(no_huge)
    except OSError:              # a kernel without transparent huge pages: small pages already
        pass
    return np.frombuffer(region, dtype=dtype).reshape(shape)       # the array keeps the mapping alive


def _place(run: RunRecord, parts: list[PartSummary], doc_ids: np.ndarray, start: int,
           stop: int) -> list[tuple[PartSummary, np.ndarray, np.ndarray | None]]:
    """The parts holding documents of doc_ids[start:stop]: (part, its columns in the slice: a `slice` when
    they are consecutive, a mask of the part's documents kept: None when all are)."""
    low, high = int(doc_ids[start]), int(doc_ids[stop - 1])
    ranged = doc_ids[-1] - doc_ids[0] + 1 == len(doc_ids)
    placed = []
    for part in parts:
        if part.first_doc is not None and (part.first_doc > high or part.first_doc + part.documents <= low):
            continue
        if ranged and part.first_doc is not None:     # two id ranges: their overlap, without an id array
            first = part.first_doc - int(doc_ids[0])   # the part's first column among all documents
            if first < 0 or first + part.documents > len(doc_ids):
                raise CuratorError(f"the scores of run {run.id} are not a full query × document table: some "
                                   f"documents are scored by some queries only")
            begin, end = max(first, start), min(first + part.documents, stop)
            inside = None
            if (begin, end) != (first, first + part.documents):
                inside = np.zeros(part.documents, dtype=bool)
                inside[begin - first:end - first] = True
            placed.append((part, slice(begin - start, end - start), inside))
            continue
        at = _positions(doc_ids, part.doc_ids())
        if at is None:
            raise CuratorError(f"the scores of run {run.id} are not a full query × document table: some "
                               f"documents are scored by some queries only")
        inside = (at >= start) & (at < stop)
        if inside.any():
            columns = at[inside] - start
            if columns[-1] - columns[0] == len(columns) - 1 and (np.diff(columns) > 0).all():   # consecutive
                columns = slice(int(columns[0]), int(columns[-1]) + 1)
            placed.append((part, columns, None if inside.all() else inside))
    return placed


def _read_into(matrix: np.ndarray, placed: list, rows: dict[str, int]) -> None:
    """The score columns of the `placed` parts, for the queries `rows`, into their cells of `matrix`."""
    for part, columns, inside in placed:
        for positions, first, _ in query_rows(part, rows):
            for at, block in part.pieces("score", first, first + len(positions)):
                here = positions[at - first:at - first + len(block)]
                block = block if inside is None else block[:, inside]
                if not isinstance(columns, slice):
                    matrix[np.ix_(here, columns)] = block
                elif here == list(range(here[0], here[0] + len(here))):    # consecutive rows: one slice
                    matrix[here[0]:here[0] + len(here), columns] = block
                else:
                    matrix[here, columns] = block


def _check_covered(run: RunRecord, placed: list, rows: dict[str, int], width: int, doc_ids: np.ndarray) -> None:
    """Every (query in `rows`, document of the slice) is held by exactly one of the placed parts; else the
    error `_fill` gives, naming the first document without one score per query."""
    holders: dict[str, list[int]] = {}
    for number, (part, _, _) in enumerate(placed):
        for query_id in part.queries:
            if query_id in rows:
                holders.setdefault(query_id, []).append(number)
    holder_sets = {tuple(n) for n in holders.values()}
    if len(holders) == len(rows) and all(_tiles([placed[n][1] for n in numbers], width) for numbers in holder_sets):
        return
    per_document = np.zeros(width, dtype=np.int64)       # how many of the queries score each document
    complete = len(holders) == len(rows)
    for numbers in holder_sets:
        times = np.zeros(width, dtype=np.int64)
        for number in numbers:
            times[placed[number][1]] += 1
        queries = sum(1 for n in holders.values() if tuple(n) == numbers)
        per_document += times * queries
        complete = complete and bool((times == 1).all())
    if not complete:
        column = int(np.argmax(per_document != len(rows)))
        raise not_full(run, int(doc_ids[column]), int(per_document[column]), len(rows))


def _tiles(columns: list, width: int) -> bool:
    """Do these column ranges (`slice`s, as `_place` gives consecutive columns) cover 0..width once each?
    False also when one is not a range: then the caller counts every column."""
    if not all(isinstance(c, slice) for c in columns):
        return False
    spans = sorted((c.start, c.stop) for c in columns)
    return (spans[0][0] == 0 and spans[-1][1] == width
            and all(before[1] == after[0] for before, after in zip(spans, spans[1:])))


def document_blocks(catalog: Catalog, run: RunRecord, query_ids: list[str], doc_ids: np.ndarray,
                    parts: list[PartSummary] | None = None, memory: SliceMemory | None = None,
                    readers: Executor | None = None):
    """Queries × documents blocks, every query's scores of the same consecutive documents, for the
    correlations when the queries do not fit in one slice, each in `memory` (valid until the next is asked
    for), read on `readers` when given. A block is a doc-id range, which Parquet row-group statistics let
    DuckDB find without reading the rest when the parts are written by document chunk (as `curator
    score` writes them)."""
    dtype = score_dtype(catalog)
    memory = memory or SliceMemory()
    rows = {q: i for i, q in enumerate(query_ids)}
    size = _block_size(len(query_ids), dtype)
    if parts is not None and readers is not None:
        yield from _document_blocks_read_ahead(run, parts, rows, doc_ids, dtype, memory, readers, size)
        return
    query = ("SELECT q.i, s.doc_id, s.score FROM scores s JOIN audit_queries q USING (query_id) "
             "WHERE s.doc_id BETWEEN ? AND ?")
    for start in range(0, len(doc_ids), size):
        ids = doc_ids[start:start + size]
        if parts is not None:
            yield _fill_from_parts(run, parts, rows, doc_ids, start, start + len(ids), dtype, memory)
            continue
        yield _fill(catalog, run, query, [int(ids[0]), int(ids[-1])], (len(query_ids), len(ids)), dtype, 0,
                    doc_ids, start, memory)


def _block_size(n_queries: int, dtype) -> int:
    """Documents per document block: half a slice, so that one is read while the one before is used (and
    every way of reading a run cuts it into the same blocks: the correlations' sums come out the same)."""
    return max(1, SLICE_BYTES // 2 // (np.dtype(dtype).itemsize * n_queries))


def _document_blocks_read_ahead(run: RunRecord, parts: list[PartSummary], rows: dict[str, int],
                                doc_ids: np.ndarray, dtype, memory: SliceMemory, readers: Executor, size: int):
    """`document_blocks` from parts with summaries, each block (of `size` documents) read on `readers`
    while the caller works on the one before (the correlations' products, on one thread, left the second
    core idle), the two in the two halves of `memory`."""
    half = size * len(rows) * np.dtype(dtype).itemsize

    def start_block(number: int):
        start, stop = number * size, min(len(doc_ids), (number + 1) * size)
        placed = _place(run, parts, doc_ids, start, stop)
        _check_covered(run, placed, rows, stop - start, doc_ids[start:stop])
        matrix = memory.take((len(rows), stop - start), dtype, offset=(number % 2) * half)
        shares = [placed[i::READ_SHARES] for i in range(READ_SHARES)]      # parts hold disjoint cells
        return matrix, [readers.submit(_read_into, matrix, share, rows) for share in shares if share]

    blocks = -(-len(doc_ids) // size)
    pending = start_block(0) if blocks else None
    try:
        for number in range(blocks):
            matrix, reads = pending
            pending = None
            try:
                for read in reads:
                    read.result()
            finally:
                _settle(reads)
            # The next block goes into the other half, which the caller finished with when it asked for this one.
            pending = start_block(number + 1) if number + 1 < blocks else None
            yield matrix
    finally:        # a caller that stops early (an error, a closed generator): no read left writing
        if pending is not None:
            _settle(pending[1])


def _settle(reads: list) -> None:
    """Cancel the reads not started and wait for the others to end, whatever their outcome."""
    for read in reads:
        read.cancel()
    for read in reads:
        if not read.cancelled():
            read.exception()


def query_groups(catalog: Catalog, run: RunRecord, query_ids: list[str], doc_ids: np.ndarray,
                 parts: list[PartSummary] | None = None, readers: Executor | None = None,
                 memory: SliceMemory | None = None):
    """(query ids, their scores × all documents in doc-id order, the positions of the rows that are
    complete: an iterator of lists), a group of queries at a time: all of them at once when they fit in
    SLICE_BYTES; each group in `memory`, valid until the next is asked for. With `readers` (parts with
    summaries) a group's parts are read on those threads, the slice fills as they run and its rows come
    complete a query batch at a time; otherwise the slice is whole when it is yielded."""
    dtype = score_dtype(catalog)
    memory = memory or SliceMemory()
    # Mapped at once for every slice of the run to come (the document blocks too): all its scores, up to
    # SLICE_BYTES; a lazy mapping, so what no slice touches costs nothing.
    memory.reserve = max(memory.reserve, min(SLICE_BYTES, len(query_ids) * len(doc_ids) * np.dtype(dtype).itemsize))
    size = max(1, SLICE_BYTES // (np.dtype(dtype).itemsize * len(doc_ids)))
    for start in range(0, len(query_ids), size):
        group = query_ids[start:start + size]
        whole = [list(range(len(group)))]
        if parts is not None:
            rows = {q: i for i, q in enumerate(group)}
            if readers is not None:
                yield group, *_fill_from_parts_by_batch(run, parts, rows, doc_ids, dtype, readers, memory)
                continue
            yield group, _fill_from_parts(run, parts, rows, doc_ids, 0, len(doc_ids), dtype, memory), iter(whole)
            continue
        if len(group) == len(query_ids):
            query, params = "SELECT q.i, s.doc_id, s.score FROM scores s JOIN audit_queries q USING (query_id)", []
        else:
            query = ("SELECT q.i, s.doc_id, s.score FROM scores s JOIN audit_queries q USING (query_id) "
                     "WHERE q.i BETWEEN ? AND ?")
            params = [start, start + len(group) - 1]
        yield group, _fill(catalog, run, query, params, (len(group), len(doc_ids)), dtype, start, doc_ids,
                           memory=memory), iter(whole)


def queries_of(catalog: Catalog, run: RunRecord, parts: list[PartSummary] | None,
                view: str = "scores") -> tuple[list[str], tuple[int, int] | None]:
    """The run's queries in id order (also as the temporary table audit_queries: query_id, i), from the
    parts' summaries or else one counting scan of `view` (its scores), and the doc-id range (low, high)
    when every query has one score per id of it (as `curator score` writes a catalog's consecutive ids;
    a pair scored twice is caught when the slices are filled); None otherwise."""
    if parts is not None:
        counted: dict[str, int] = {}
        for part in parts:
            for query_id in part.queries:
                counted[query_id] = counted.get(query_id, 0) + part.documents
        rows = sorted(counted.items())
    else:
        rows = catalog.sql(f"SELECT query_id, count(*) FROM {view} GROUP BY query_id ORDER BY query_id")
    if not rows:
        raise CuratorError(f"the scores of run {run.id} ({run.out_path}) are empty")
    query_ids = [r[0] for r in rows]
    catalog.sql("CREATE OR REPLACE TEMP TABLE audit_queries AS "
                "SELECT query_id, (row_number() OVER (ORDER BY query_id) - 1)::INTEGER AS i "
                "FROM (SELECT unnest(?::VARCHAR[]) AS query_id)", [query_ids])
    low, high = doc_id_bounds(catalog, run, view)
    dense = all(r[1] == high - low + 1 for r in rows)
    return query_ids, (low, high) if dense else None


def doc_id_bounds(catalog: Catalog, run: RunRecord, view: str = "scores") -> tuple[int, int]:
    """The smallest and largest doc id, from the Parquet row groups' statistics (no scan) where every row
    group has them."""
    low, high, missing = catalog.one(
        "SELECT min(stats_min_value::BIGINT), max(stats_max_value::BIGINT), "
        "count(*) FILTER (WHERE stats_min_value IS NULL OR stats_max_value IS NULL) "
        f"FROM parquet_metadata({sql_files(score_files(run.out_path))}) WHERE path_in_schema = 'doc_id'")
    if missing or low is None:
        low, high = catalog.one(f"SELECT min(doc_id), max(doc_id) FROM {view}")
    return int(low), int(high)
