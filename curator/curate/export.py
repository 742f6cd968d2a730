"""`curator export`: a mixture as training shards plus a manifest.

Formats:
  parquet    columns id, text, source, score, metadata (zstd-compressed)
  jsonl.zst  one JSON object per line with the same fields
  megatron   tokenized `.bin`/`.idx` pairs (curator/curate/megatron.py), EOS after each document
Shards roll over at --shard-tokens or --shard-bytes (of text). Everything is
written into `OUT.part/` and renamed to OUT when the manifest is written, so an
interrupted export never leaves a directory that looks complete.

`--force` replaces only a previous export: a folder whose manifest.json has
curator's keys and that holds nothing but the files the manifest lists. Any
other folder (or a file) at OUT is refused before anything is written. The old
export is renamed aside to `OUT.old` while the new one is renamed in
(`curator.artifacts.replace_dir`), so a crash leaves one complete copy, which
the next export puts back.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, Field

from curator import __version__
from curator.artifacts import recover_dir, replace_dir
from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace
from curator.curate.mix import get_mixture
from curator.curate.scores import arrow_batches, bounded
from curator.constants import ShardFormat
from curator.errors import CuratorError

FORMATS = get_args(ShardFormat)
DEFAULT_SHARD_TOKENS = 100_000_000
MANIFEST = "manifest.json"
# Keys every manifest that `export` writes has; a folder whose manifest lacks one is not a curator export.
MANIFEST_KEYS = ("curator_version", "format", "mixture", "documents", "tokens", "shards")
# Parquet shards are written a row group at a time, so a shard of any size needs one group in memory.
ROW_GROUP = 10_000


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("text", pa.string()), ("source", pa.string()),
                      ("score", pa.float64()), ("metadata", pa.string())])


class ExportSpec(BaseModel):
    mixture: str
    format: ShardFormat = "parquet"
    out: Path
    shard_tokens: int | None = Field(None, gt=0)
    shard_bytes: int | None = Field(None, gt=0)
    tokenizer: str | None = Field(None, description="model whose tokenizer writes megatron ids")


class ExportResult(BaseModel):
    out: str
    manifest: dict


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mixture_rows(catalog: Catalog, name: str, chunk: int = 10_000) -> Iterator[dict]:
    """The mixture's documents in selection order, with text, source, score and metadata: one ordered
    query read `chunk` rows at a time (DuckDB spills the sort; only a chunk is in Python)."""
    bounded(catalog)
    twice = catalog.one("SELECT doc_id FROM mixture_docs WHERE mixture = ? GROUP BY doc_id HAVING count(*) > 1 "
                        "LIMIT 1", [name])
    if twice:   # cannot happen (the catalog's key forbids it); checked, not assumed
        raise CuratorError(f"document {twice[0]} appears twice in mixture {name}")
    batches = arrow_batches(
        catalog, "SELECT m.doc_id AS id, d.text, d.source, m.score, d.metadata::VARCHAR AS metadata, m.tokens "
                 "FROM mixture_docs m JOIN documents d ON d.id = m.doc_id WHERE m.mixture = ? "
                 "ORDER BY m.position", [name], rows=chunk)
    for batch in batches:
        yield from batch.to_pylist()


class _ShardWriter:
    """One open shard of any format; `add` returns bytes written for the document."""

    def __init__(self, directory: Path, index: int, fmt: str, tokenizer=None):
        self.fmt, self.tokenizer = fmt, tokenizer
        stem = directory / f"part-{index:05d}"
        self.documents = self.tokens = self.bytes = 0
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self.files = [stem.with_suffix(".parquet")]
            self.rows: list[dict] = []
            self.parquet = pq.ParquetWriter(self.files[0], _parquet_schema(), compression="zstd")
        elif fmt == "jsonl.zst":
            import zstandard

            self.files = [Path(f"{stem}.jsonl.zst")]
            self.raw = open(self.files[0], "wb")
            self.stream = zstandard.ZstdCompressor(level=10).stream_writer(self.raw)
        else:
            from curator.curate.megatron import IndexedWriter, token_dtype

            self.files = [stem.with_suffix(".bin"), stem.with_suffix(".idx")]
            self.writer = IndexedWriter(stem, token_dtype(len(tokenizer)))

    def add(self, row: dict) -> None:
        self.documents += 1
        self.bytes += len(row["text"].encode("utf-8"))
        if self.fmt == "megatron":
            ids = self.tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            if self.tokenizer.eos_token_id is not None:
                ids = [*ids, self.tokenizer.eos_token_id]
            self.writer.add(ids)
            self.tokens += len(ids)
            return
        self.tokens += row["tokens"]
        record = {k: row[k] for k in ("id", "text", "source", "score")}
        record["metadata"] = row["metadata"] if isinstance(row["metadata"], str) or row["metadata"] is None \
            else json.dumps(row["metadata"])
        if self.fmt == "parquet":
            self.rows.append(record)
            if len(self.rows) >= ROW_GROUP:
                self._write_rows()
        else:
            self.stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def _write_rows(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=_parquet_schema()))
            self.rows = []

    def close(self) -> dict:
        if self.fmt == "parquet":
            self._write_rows()
            self.parquet.close()
        elif self.fmt == "jsonl.zst":
            self.stream.close()
            self.raw.close()
        else:
            self.writer.close()
        return {"files": [f.name for f in self.files], "documents": self.documents, "tokens": self.tokens,
                "text_bytes": self.bytes, "bytes": sum(f.stat().st_size for f in self.files),
                "sha256": {f.name: sha256(f) for f in self.files}}


def export(ws: Workspace, spec: ExportSpec, *, force: bool = False,
           progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the mixture's shards and manifest to `spec.out`; `progress(done, total)` after each document.

    With `force`, a previous export at `spec.out` is replaced (never any other folder)."""
    out = spec.out.expanduser().resolve()
    if spec.shard_tokens and spec.shard_bytes:
        raise CuratorError("give --shard-tokens or --shard-bytes, not both")
    _check_out(out, force)
    with Catalog.open(ws) as catalog:
        mixture = get_mixture(catalog, spec.mixture)
        tokenizer = tokenizer_name = None
        if spec.format == "megatron":
            from curator.model.loading import load_tokenizer

            tokenizer_name = spec.tokenizer or _ranking_model(catalog, mixture.spec.ranking)
            tokenizer = load_tokenizer(tokenizer_name)
        part = out.with_name(out.name + ".part")
        _clear_unfinished(part)
        part.mkdir(parents=True)
        shards, done = [], 0
        writer = None
        limit_tokens = spec.shard_tokens or (None if spec.shard_bytes else DEFAULT_SHARD_TOKENS)
        for row in mixture_rows(catalog, spec.mixture):
            done += 1
            if writer is None:
                writer = _ShardWriter(part, len(shards), spec.format, tokenizer)
            writer.add(row)
            if progress:
                progress(done, mixture.documents)
            full = (limit_tokens and writer.tokens >= limit_tokens) or (
                spec.shard_bytes and writer.bytes >= spec.shard_bytes)
            if full:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
    manifest = {
        "curator_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": spec.format, "mixture": mixture.spec.model_dump(), "mixture_per_source": mixture.per_source,
        "tokenizer": tokenizer_name,
        "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards), "shards": shards,
    }
    (part / MANIFEST).write_text(json.dumps(manifest, indent=2))
    replace_dir(part, out)
    with Catalog.open(ws, write=True) as catalog:
        catalog.sql("DELETE FROM exports WHERE path = ?", [str(out)])
        catalog.sql("INSERT INTO exports (path, mixture, format, manifest) VALUES (?, ?, ?, ?)",
                    [str(out), spec.mixture, spec.format, json.dumps(manifest)])
    return ExportResult(out=str(out), manifest=manifest)


# What an unfinished export leaves in OUT.part: shards (part-00000.parquet, .jsonl.zst, .bin/.idx)
# and, at the very end, its manifest.
_UNFINISHED = re.compile(r"^(part-\d{5}\.(parquet|jsonl\.zst|bin|idx)|manifest\.json)$")


def _clear_unfinished(part: Path) -> None:
    """Remove what an interrupted export left in OUT.part, and nothing else: a file there, or a folder
    holding anything an export does not write, is the user's."""
    if not part.exists():
        return
    if not part.is_dir():
        raise CuratorError(f"{part} is in the way: the export is written there before it takes its name; "
                           f"move it away")
    foreign = sorted(p.name for p in part.iterdir() if not (p.is_file() and _UNFINISHED.match(p.name)))
    if foreign:
        raise CuratorError(f"{part} is in the way and holds what an export does not write ({', '.join(foreign[:5])}); "
                           f"move it away")
    shutil.rmtree(part)


def not_an_export(folder: Path) -> str | None:
    """Why `folder` is not a previous `curator export` (the only kind of folder --force may replace),
    or None when it is one: its manifest.json has curator's keys, and the folder holds nothing but the
    manifest and the shard files it lists (files a user added would be lost)."""
    if not folder.is_dir():
        return "it is not a folder"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, ValueError) as exc:        # ValueError: not JSON, not UTF-8
        return f"its {MANIFEST} cannot be read ({exc})"
    if not isinstance(manifest, dict):
        return f"its {MANIFEST} is not a curator export manifest (not a JSON object)"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"its {MANIFEST} is not a curator export manifest (it lacks {', '.join(missing)})"
    shards = manifest["shards"]
    if manifest["format"] not in FORMATS or not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("files"), list) for s in shards):
        return f"its {MANIFEST} is not a curator export manifest (format or shard list unknown)"
    listed = {MANIFEST, *(str(name) for shard in shards for name in shard["files"])}
    try:
        unlisted = sorted(p.name for p in folder.iterdir() if p.name not in listed or not p.is_file())
    except OSError as exc:
        return f"it cannot be listed ({exc})"
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        return f"it holds what its {MANIFEST} does not list: {shown}"
    return None


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an OUT that is a file, or a folder that is not a previous export. An
    interrupted replacement (`OUT.old` left beside or instead of OUT) is completed first."""
    if out.exists() and not out.is_dir():
        raise CuratorError(f"--out {out} is a file; an export is a folder of shards (choose another --out)")
    old = out.with_name(out.name + ".old")
    if old.exists():
        why = not_an_export(old)
        if why:
            raise CuratorError(f"{old} is in the way: an export keeps the previous copy of {out.name} there "
                               f"while replacing it, and {why}; move it away")
        recover_dir(out)
    if not out.exists():
        return
    if not force:
        raise CuratorError(f"{out} exists; choose another --out or pass --force to replace it")
    why = not_an_export(out)
    if why:
        raise CuratorError(f"will not replace {out}: --force replaces only a previous curator export, and {why}")


def _ranking_model(catalog: Catalog, ranking: str) -> str:
    row = catalog.one("SELECT m.location FROM rankings r JOIN runs u ON u.id = r.run_id "
                      "JOIN models m ON m.id = u.model_id WHERE r.name = ?", [ranking])
    if row is None:
        raise CuratorError("cannot tell which tokenizer to use; pass --tokenizer MODEL")
    return row[0]
