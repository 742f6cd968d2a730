"""A scoring run's output on disk: a Parquet dataset that grows by parts.

    <out>/manifest.json           run id, query batches, per-nat losses, the parts, documents scored
    <out>/documents-<hash>.npy    ids of the documents the published parts hold (int64)
    <out>/b003-<hash>.parquet     one part per (query batch, chunk of documents), or a join of such
                                  parts (`b003-joined-<hash>`): query_id, doc_id,
                                  score, score_per_nat, query-major (every document of the chunk
                                  for the first query, then the next), with a summary in its
                                  Parquet metadata (`write_part`, `PartSummary`)
    <out>/pending/                parts of the run in progress, moved up when it completes

curator's readers take the parts the manifest lists (curator.catalog.records.score_files); the
manifest is replaced atomically, so they only ever see a complete run: parts are listed when every
rank has finished. (A glob of `<out>/*.parquet` sees the same files, but for the instant a publish
or a join moves them.) When a query batch ends with COMPACT_MIN_PARTS parts or more, the run joins
them into larger parts before it is recorded (`ScoreDataset.compact`). A part is named by the
queries and documents it holds, so a rerun (on any number of ranks) keeps exactly the
pending parts it would write again and deletes the others; an incremental run (new documents
since the last) writes parts for the new documents only and publishes them beside the old.

Each part carries its own summary (key `curator.part` of its Parquet metadata): its queries in
order, its documents (consecutive ids are given as a first id, others are the doc_id column's
first rows), and per query the count, sum and sum of squares of `score` and `score_per_nat`.
It is written in the same file as the rows it summarises, so it is appended, published and
resumed with them on any number of ranks. Readers after the model use it to skip a statistics
scan and to read the score column alone (curator/curate/scores.py); a part without it (older
runs, sketch scores, files written by other tools) is read through DuckDB as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from curator.arrays import arrow_of, numpy_of
from curator.artifacts import atomic_file, content_id, reading, write_numpy_atomic, write_text_atomic
from curator.errors import ArtifactError, CuratorError

DATASET_VERSION = 1
SUMMARY_KEY = b"curator.part"
SUMMARY_VERSION = 1
SUMMARY_COLUMNS = ("score", "score_per_nat")
ROW_GROUP_ROWS = 2**20          # about this many rows per row group, always whole queries
COMPACT_DOCUMENTS = 2**18       # documents per part once a run's small parts are joined (`compact`),
COMPACT_VALUES = 2**23          # and at most this many scores per column (a wide batch joins fewer documents)
COMPACT_MIN_PARTS = 64          # a query batch with fewer parts is left as it is: opening 64 files costs little


class DatasetManifest(BaseModel):
    run_id: str
    version: int = DATASET_VERSION
    query_batches: list[list[str]]           # fixed by the first run, so appended parts line up
    query_losses: dict[str, float] = Field(default_factory=dict)
    parts: list[str] = Field(default_factory=list)
    documents: int = 0
    documents_file: str | None = None        # named by its content: the manifest is the one commit point


def part_name(batch_number: int, query_ids: list[str], doc_ids: list[int]) -> str:
    return f"b{batch_number:03d}-{content_id('part', query_ids, doc_ids)}.parquet"


class ScoreDataset:
    """The folder of one run; rank 0 opens, plans and publishes it, every rank writes pending parts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.pending = self.root / "pending"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> DatasetManifest | None:
        if not self.manifest_path.is_file():
            return None
        with reading(self.manifest_path, "score dataset manifest", "curator score ... --force"):
            data = json.loads(self.manifest_path.read_text())
        try:
            return DatasetManifest.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(f"the score dataset manifest {self.manifest_path} is damaged "
                                f"({exc.errors()[0]['msg']}); score again with --force") from None

    def open(self, run_id: str, query_batches: list[list[str]], force: bool = False) -> DatasetManifest:
        """This run's manifest, starting the folder if it is new. A folder of another run (or a
        forced rerun) is replaced; a folder that is not a score dataset is never touched."""
        manifest = self.read_manifest()
        if manifest is not None and (manifest.run_id != run_id or force):
            shutil.rmtree(self.root)
            manifest = None
        if manifest is None:
            if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
                raise CuratorError(f"{self.root} exists and is not a curator score dataset; choose another --out "
                                   f"or remove it")
            manifest = DatasetManifest(run_id=run_id, query_batches=query_batches)
            self.root.mkdir(parents=True, exist_ok=True)
            self.write_manifest(manifest)
        self._finish_publishing(manifest)
        return manifest

    def _finish_publishing(self, manifest: DatasetManifest) -> None:
        """Complete a publish (or a compaction) that was killed after its manifest was written: move up
        the parts it lists, remove the parts and document lists it no longer does (curator reads the
        manifest's parts, but a user's glob of the folder would take every file)."""
        for name in manifest.parts:
            if not (self.root / name).is_file() and (self.pending / name).is_file():
                os.replace(self.pending / name, self.root / name)
        listed = set(manifest.parts)
        for path in self.root.glob("*.parquet"):
            if path.name not in listed:
                path.unlink()
        for path in self.root.glob("documents-*.npy"):
            if path.name != manifest.documents_file:
                path.unlink()

    def write_manifest(self, manifest: DatasetManifest) -> None:
        write_text_atomic(self.manifest_path, manifest.model_dump_json(indent=1))

    def scored_documents(self, manifest: DatasetManifest) -> np.ndarray:
        if manifest.documents_file is None:
            return np.zeros(0, dtype=np.int64)
        path = self.root / manifest.documents_file
        with reading(path, "score dataset's document list", "curator score ... --force"):
            return np.load(path)

    def keep_pending(self, planned: set[str]) -> None:
        """Remove pending parts this plan will not write (from a run over other documents)."""
        if not self.pending.is_dir():
            return
        for path in self.pending.iterdir():
            if path.name not in planned:
                path.unlink()

    def publish(self, manifest: DatasetManifest, parts: list[str], doc_ids: np.ndarray,
                losses: dict[str, float]) -> DatasetManifest:
        """Move the finished pending parts up beside the published ones and record them.

        The new manifest is written first: once it is on disk the parts belong to the run,
        and `open` finishes moving them if this is killed halfway.
        """
        # Listing the folder (rather than a stat per name) also refreshes a network filesystem's
        # view of files other nodes have just renamed into it.
        present = set(os.listdir(self.pending)) if self.pending.is_dir() else set()
        missing = [name for name in parts if name not in present]
        if missing:
            raise CuratorError(f"{len(missing)} parts of the run are missing from {self.pending} (a rank stopped "
                               f"early?); run the same command again to finish them")
        documents = np.union1d(self.scored_documents(manifest), np.asarray(doc_ids, dtype=np.int64))
        documents_file = f"documents-{hashlib.blake2b(documents.tobytes(), digest_size=6).hexdigest()}.npy"
        write_numpy_atomic(self.root / documents_file, documents)
        manifest = manifest.model_copy(update={
            "parts": sorted({*manifest.parts, *parts}), "documents": int(documents.size),
            "documents_file": documents_file, "query_losses": {**manifest.query_losses, **losses}})
        self.write_manifest(manifest)
        self._finish_publishing(manifest)
        shutil.rmtree(self.pending, ignore_errors=True)
        return manifest

    def compact(self, manifest: DatasetManifest, documents_per_part: int = COMPACT_DOCUMENTS,
                min_parts: int = COMPACT_MIN_PARTS) -> DatasetManifest:
        """Join the small parts (a document chunk each: 512 documents by default) of each query batch that
        has at least `min_parts` parts into parts of up to `documents_per_part` documents (and
        COMPACT_VALUES scores), in document order, and return the manifest that lists them. A 2M-document
        run leaves ~4,000 chunks per query batch; the stages after the model open every part and read its
        footer, which made ranking 2M documents × 100 queries take 75 s from 15,628 parts against 3.5 s
        from 32 (docs/results/out_of_core.md). The joined parts are written as pending, and the new
        manifest is the commit point, as in `publish`."""
        summaries = part_summaries([self.root / name for name in manifest.parts])
        if not summaries:
            return manifest                  # parts without a summary (another version): left as they are
        by_batch: dict[tuple[str, ...], list[PartSummary]] = {}
        for part in summaries:
            by_batch.setdefault(tuple(part.queries), []).append(part)
        groups: list[list[PartSummary]] = []
        documents: dict[Path, np.ndarray] = {}              # each part's ids, read once: sorted, then joined
        for queries, parts in by_batch.items():
            if len(parts) < min_parts:
                continue
            documents.update((part.path, part.doc_ids()) for part in parts)
            # A joined part is built whole in memory: its scores, per-nat scores and query ids.
            most = max(1, min(documents_per_part, COMPACT_VALUES // max(1, len(queries))))
            current: list[PartSummary] = []
            held = 0
            for part in sorted(parts, key=lambda p: int(documents[p.path][0]) if p.documents else -1):
                if current and held + part.documents > most:
                    groups.append(current)
                    current, held = [], 0
                current.append(part)
                held += part.documents
            groups.append(current)
        groups = [group for group in groups if len(group) > 1]
        if not groups:
            return manifest
        self.pending.mkdir(parents=True, exist_ok=True)
        joined, replaced = [], set()
        for group in groups:
            queries = group[0].queries
            batch = manifest.query_batches.index(queries) if queries in manifest.query_batches else 0
            name = f"b{batch:03d}-{content_id('joined', sorted(p.path.name for p in group))}.parquet"
            read = [p.blocks("score", "score_per_nat") for p in group]
            with atomic_file(self.pending / name) as path:
                write_part(path, queries, np.concatenate([documents[p.path] for p in group]),
                           np.concatenate([score for score, _ in read], axis=1),
                           np.concatenate([per_nat for _, per_nat in read], axis=1))
            del read
            joined.append(name)
            replaced.update(p.path.name for p in group)
        manifest = manifest.model_copy(update={"parts": sorted((set(manifest.parts) - replaced) | set(joined))})
        self.write_manifest(manifest)
        self._finish_publishing(manifest)
        shutil.rmtree(self.pending, ignore_errors=True)
        return manifest


# -- one part: query-major rows and their summary ------------------------------------------------

def _part_schema():
    import pyarrow as pa

    return pa.schema([pa.field("query_id", pa.string(), nullable=False), pa.field("doc_id", pa.int64(), nullable=False),
                      pa.field("score", pa.float32(), nullable=False),
                      pa.field("score_per_nat", pa.float32(), nullable=False)])


def write_part(path: Path, query_ids: list[str], doc_ids: np.ndarray, score: np.ndarray,
               score_per_nat: np.ndarray) -> None:
    """Write one part: `score` and `score_per_nat` are queries × documents float32 arrays, stored
    query-major, with the part's summary in its Parquet metadata. Row groups hold whole queries,
    so a reader of some queries decodes only their row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    n_docs, n_queries = len(doc_ids), len(query_ids)
    values = {"score": np.asarray(score, dtype=np.float32), "score_per_nat": np.asarray(score_per_nat, dtype=np.float32)}
    for name, array in values.items():
        if array.shape != (n_queries, n_docs):
            raise ValueError(f"{name}: shape {array.shape}, expected {(n_queries, n_docs)}")
    consecutive = n_docs > 0 and int(doc_ids[-1]) - int(doc_ids[0]) == n_docs - 1 and bool(
        (np.diff(doc_ids) == 1).all())
    summary = {"version": SUMMARY_VERSION, "queries": list(query_ids), "documents": n_docs,
               "first_doc": int(doc_ids[0]) if consecutive else None,
               "sums": {name: [[n_docs, float(row.sum(dtype=np.float64)), float(np.square(row, dtype=np.float64).sum())]
                               for row in array] for name, array in values.items()}}
    # Each query id repeated over the part's documents, built as a dictionary (one int32 per row) and
    # decoded by Arrow: 12× faster than an array of Python strings (0.05 s against 0.57 s for 5M rows).
    repeated = pa.DictionaryArray.from_arrays(arrow_of(np.repeat(np.arange(n_queries, dtype=np.int32), n_docs),
                                                       "int32"), pa.array(list(query_ids), pa.string()))
    # Every column is required (a part has no missing cells): Parquet then stores no definition levels,
    # and pyarrow reads a float column 2.3× as fast (a copy of its pages, no validity to rebuild).
    table = pa.table({
        "query_id": repeated.cast(pa.string()),
        "doc_id": arrow_of(np.tile(doc_ids, n_queries), "int64"),
        "score": arrow_of(values["score"].reshape(-1), "float"),
        "score_per_nat": arrow_of(values["score_per_nat"].reshape(-1), "float"),
    }, schema=_part_schema())
    table = table.replace_schema_metadata({SUMMARY_KEY: json.dumps(summary)})
    # Only query ids repeat: a dictionary of float scores (or of a part's doc ids) overflows pyarrow's
    # 1 MB dictionary page a quarter of the way into each row group and falls back to plain, after
    # encoding that quarter the slow way; snappy finds nothing to compress in float32 noise. Without
    # them a part is written 2.5× and its scores read 1.5× as fast (a part of 25 queries × 250,000
    # documents: 1.16 → 0.45 s to write, 38 → 25 ms to read the score column; docs/results/out_of_core.md).
    pq.write_table(table, path, row_group_size=max(1, n_docs) * max(1, ROW_GROUP_ROWS // max(1, n_docs)),
                   use_dictionary=["query_id"],
                   compression={"query_id": "snappy", "doc_id": "snappy", "score": "none", "score_per_nat": "none"})


@dataclass
class PartSummary:
    """What a part's metadata says about it: where it is, its queries in row order, its documents."""

    path: Path
    queries: list[str]
    documents: int
    first_doc: int | None            # consecutive doc ids from this one; None: read them from the part
    sums: dict[str, np.ndarray]      # column → queries × (count, sum, sum of squares)

    def doc_ids(self) -> np.ndarray:
        """The part's documents in row order (the same for each of its queries)."""
        if self.first_doc is not None:
            return np.arange(self.first_doc, self.first_doc + self.documents, dtype=np.int64)
        if self.documents == 0:        # an empty part has no batch to read
            return np.zeros(0, dtype=np.int64)
        import pyarrow.parquet as pq

        with reading(self.path, "score dataset part", "curator score ... --force"):
            first = pq.ParquetFile(self.path).iter_batches(batch_size=max(1, self.documents), columns=["doc_id"])
            return numpy_of(next(first).column(0))

    def blocks(self, *columns: str) -> list[np.ndarray]:
        """`block` of several columns, every query, from one read of the part (joining parts reads both
        score columns of thousands of small parts: opening each once, not once per column)."""
        import pyarrow.parquet as pq

        shape = (len(self.queries), self.documents)
        if 0 in shape:
            return [np.zeros(shape, dtype=np.float32) for _ in columns]
        with reading(self.path, "score dataset part", "curator score ... --force"):
            table = pq.ParquetFile(self.path, memory_map=True).read(columns=list(columns))
            return [numpy_of(table.column(column)).reshape(shape) for column in columns]

    def block(self, column: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Queries start … stop (positions in `queries`) × documents of `column`, as stored (float32);
        only the row groups holding those queries are read."""
        pieces = [values for _, values in self.pieces(column, start, stop)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def pieces(self, column: str, start: int = 0, stop: int | None = None):
        """`block` as the row groups hold it: (position of the first query, those queries × documents),
        in order, each a view of what Parquet decoded. A caller that copies the values somewhere anyway
        (the audit's slice) saves joining them into one block first: a pass over every value."""
        import pyarrow.parquet as pq

        stop = len(self.queries) if stop is None else stop
        n = self.documents
        if stop <= start or n == 0:
            yield start, np.zeros((max(0, stop - start), n), dtype=np.float32)
            return
        with reading(self.path, "score dataset part", "curator score ... --force"):
            # Mapped rather than read: the float pages are decoded straight from the page cache, without
            # the kernel copying them into a read buffer first (less system time, and steadier).
            handle = pq.ParquetFile(self.path, memory_map=True)
            bounds = np.cumsum([0] + [handle.metadata.row_group(g).num_rows
                                      for g in range(handle.metadata.num_row_groups)])
            groups = [g for g in range(len(bounds) - 1) if bounds[g] < stop * n and bounds[g + 1] > start * n]
            if not groups:
                yield start, np.zeros((stop - start, n), dtype=np.float32)
                return
            whole_queries = all(bounds[g] % n == 0 and bounds[g + 1] % n == 0 for g in groups)
            if not whole_queries:           # not as write_part writes them: one read, cut to the queries
                values = numpy_of(handle.read_row_groups(groups, columns=[column]).column(0))
                offset = start * n - bounds[groups[0]]
                yield start, values[offset:offset + (stop - start) * n].reshape(stop - start, n)
                return
            for g in groups:
                values = numpy_of(handle.read_row_group(g, columns=[column]).column(0))
                held = int(bounds[g]) // n
                low, high = max(held, start), min(int(bounds[g + 1]) // n, stop)
                yield low, values[(low - held) * n:(high - held) * n].reshape(high - low, n)


def part_summaries(files: list[Path]) -> list[PartSummary] | None:
    """The summaries of these parts (footers only), or None when one has none (or another version):
    then the caller reads the dataset through DuckDB."""
    import pyarrow.parquet as pq

    summaries = []
    for path in files:
        with reading(path, "score dataset part", "curator score ... --force"):
            metadata = pq.read_schema(path).metadata or {}
        if SUMMARY_KEY not in metadata:
            return None
        data = json.loads(metadata[SUMMARY_KEY])
        if data.get("version") != SUMMARY_VERSION:
            return None
        summaries.append(PartSummary(path=path, queries=data["queries"], documents=data["documents"],
                                     first_doc=data["first_doc"],
                                     sums={k: np.asarray(v, dtype=np.float64).reshape(-1, 3)
                                           for k, v in data["sums"].items()}))
    return summaries
