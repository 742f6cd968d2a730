"""Ingest rate against catalog size: one fixed batch of JSONL into catalogs already holding 100k and 5M documents.

    python benchmarks/ingest_scale.py [--batch 100000] [--sizes 100000 5000000] [--repeats 3]
                                      [--baseline-ref 80bd6a9] [--record docs/results/ingest_scale.md]

Pre-fill: for each size, documents generated like the batch's (20-200 words) are
written by direct Arrow inserts into a catalog of the *old* layout (schema 4),
with content hashes from curator's own `content_hash` and one complete ingest
batch, so the catalog is what ingest would have left. Parsing and hashing the
pre-fill is not what is measured; only the batch's ingest is.

Each measurement copies that catalog and ingests the same batch into the copy, in
a fresh process (so the page cache is warm for both, DuckDB's cache cold):
- new: this tree's ingest; the copy is migrated to the current schema first (the
  migration is timed apart, it runs once per catalog);
- old: the ingest at --baseline-ref (the hex-string anti-join), run from
  `git archive` of that commit on the old-layout copy.
The batch holds 1% copies of pre-filled documents, 1% repeats within itself and
0.1% malformed lines, so every duplicate path is exercised; both approaches
must count the same duplicates. Rounds interleave sizes and approaches, and the
best of --repeats rounds is reported: the machine is shared, and interference
only slows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recording import record_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not "
         "function return value matrix gradient theorem proof lemma integer slope equation solve compute "
         "def class import self print list dict string number step answer therefore hence sum product").split()
OLD_LAYOUT = 4  # the schema version the baseline ref writes


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))


def prefill(root: Path, documents: int, seed: int) -> None:
    """An old-layout catalog holding `documents` documents of one complete batch, written in Arrow chunks."""
    import pyarrow as pa

    from curator.catalog.database import Catalog
    from curator.catalog.ingest import content_hash
    from curator.catalog.schema import MIGRATIONS
    from curator.catalog.workspace import Workspace

    root.mkdir(parents=True)
    rng = random.Random(seed)
    with Catalog.open(Workspace(root), write=True, migrations=MIGRATIONS[:OLD_LAYOUT]) as catalog:
        catalog.sql("INSERT INTO ingest_batches (id, source, status, fingerprint, inputs, options, started_at, "
                    "finished_at, inserted) VALUES (1, 'prefill', 'complete', 'prefill', '[]', '{}', "
                    "current_timestamp, current_timestamp, ?)", [documents])
        catalog.sql("INSERT INTO sources (name, kind) VALUES ('prefill', 'web')")
        for start in range(0, documents, 250_000):
            ids = range(start + 1, min(start + 250_000, documents) + 1)
            texts = [random_text(rng) for _ in ids]
            sizes = [len(t) for t in texts]  # ASCII: characters are bytes
            catalog.insert_arrow("document_rows", pa.table({
                "id": pa.array(ids, pa.int64()), "source": ["prefill"] * len(ids), "kind": ["web"] * len(ids),
                "origin": [f"prefill.jsonl:{i}" for i in ids], "text": texts,
                "chars": sizes, "bytes": sizes, "content_hash": [content_hash(t) for t in texts],
                "batch_id": pa.array([1] * len(ids), pa.int32())}))


def write_batch(path: Path, lines: int, catalog_texts: list[str], seed: int) -> None:
    """New documents, with 1% copies of catalog documents, 1% repeats and 0.1% malformed lines."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(lines):
            r = rng.random()
            if r < 0.001:
                f.write('{"text": "broken\n')
            elif r < 0.011:
                f.write(json.dumps({"id": f"b{i}", "text": rng.choice(catalog_texts)}) + "\n")
            elif r < 0.021 and i:
                f.write(json.dumps({"id": f"b{i}", "text": "a repeated boilerplate page"}) + "\n")
            else:
                f.write(json.dumps({"id": f"b{i}", "text": random_text(rng), "url": f"https://example.org/{i}"}) + "\n")


def catalog_sample(root: Path, count: int) -> list[str]:
    import duckdb

    with duckdb.connect(str(root / "curator.duckdb"), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT text FROM document_rows ORDER BY id LIMIT ?", [count]).fetchall()]


def old_tree(ref: str, into: Path) -> Path:
    """The curator package as of `ref`, laid out as installed (connectors/ inside curator/)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "curator", "connectors"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "connectors").rename(into / "curator" / "connectors")
    return into


def in_child(code: str, old: Path | None = None) -> dict:
    """Run code in a fresh interpreter (importing the old tree's curator when `old` is given);
    it sets RESULT, a dict printed as JSON."""
    prelude = ""
    if old is not None:
        # The editable install's finder would answer `import curator` with this tree.
        prelude = textwrap.dedent(f"""
            import sys
            sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
            sys.path.insert(0, {str(old)!r})
            import curator
            assert curator.__file__.startswith({str(old)!r}), curator.__file__
        """)
    script = prelude + textwrap.dedent(code) + "\nimport json as _j\nprint(_j.dumps(RESULT))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def migrate(root: Path) -> float:
    return in_child(f"""
        import time
        from pathlib import Path
        from curator.catalog.database import Catalog
        from curator.catalog.workspace import Workspace
        t = time.perf_counter()
        Catalog.open(Workspace(Path({str(root)!r})), write=True).close()
        RESULT = {{'seconds': time.perf_counter() - t}}
    """)["seconds"]


def timed_ingest(root: Path, batch: Path, old: Path | None) -> dict:
    return in_child(f"""
        import time
        from pathlib import Path
        from curator.catalog.ingest import IngestOptions, ingest
        from curator.catalog.workspace import Workspace
        t = time.perf_counter()
        s = ingest(Workspace(Path({str(root)!r})), [{str(batch)!r}], IngestOptions(source='batch', kind='web'))
        RESULT = {{'seconds': time.perf_counter() - t, 'records': s.records_read, 'inserted': s.inserted,
                   'duplicates': s.duplicates, 'skipped': s.skipped}}
    """, old)


def measure_once(template: Path, work: Path, batch: Path, old: Path | None) -> dict:
    """Ingest the batch into a fresh copy of the template catalog (migrated first, and timed apart, for
    the new code)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    try:
        migration = migrate(work) if old is None else 0.0
        return {**timed_ingest(work, batch, old), "migration": migration}
    finally:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100_000, help="JSONL lines in the ingested batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 5_000_000],
                        help="documents already in the catalog")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-ref", default="80bd6a9", help="commit whose ingest is the old approach")
    parser.add_argument("--record", type=Path, help="Markdown file whose ingest_scale section to rewrite")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the temporary catalogs")
    args = parser.parse_args()

    runs: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        trees = {"new": None, "old": old_tree(args.baseline_ref, tmp / "old")}
        templates, batches = {}, {}
        for size in args.sizes:
            templates[size] = tmp / f"prefill-{size}"
            t = time.perf_counter()
            prefill(templates[size], size, seed=size)
            batches[size] = tmp / f"batch-{size}.jsonl"
            write_batch(batches[size], args.batch, catalog_sample(templates[size], 1000), seed=1)
            db_mb = (templates[size] / "curator.duckdb").stat().st_size / 1e6
            print(f"pre-filled {size:,} documents ({db_mb:,.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
        # Rounds interleave sizes and approaches, so that the load of the (shared) machine,
        # which drifts, weighs on all of them alike.
        for round_ in range(args.repeats):
            for size in args.sizes:
                for approach, tree in trees.items():
                    run = measure_once(templates[size], tmp / "run", batches[size], tree)
                    runs.setdefault((size, approach), []).append(run)
                    print(f"round {round_ + 1}, {size:,} documents, {approach}: "
                          f"{args.batch / run['seconds']:,.0f} docs/s", flush=True)

    counted = ("inserted", "duplicates", "skipped")
    for size in args.sizes:
        outcomes = {tuple(r[k] for k in counted) for approach in trees for r in runs[size, approach]}
        assert len(outcomes) == 1, f"approaches or repeats disagree on what is a duplicate: {outcomes}"
    results = [{"size": size, "approach": approach, **min(rs, key=lambda r: r["seconds"])}
               for (size, approach), rs in runs.items()]
    lines = table(results, args)
    print("\n".join(lines))
    if args.record:
        record_section(args.record, "ingest_scale", "Ingest rate against catalog size", "ingest_scale.py", lines)


def table(results: list[dict], args) -> list[str]:
    smallest = min(args.sizes)
    base = {r["approach"]: args.batch / r["seconds"] for r in results if r["size"] == smallest}
    rows = ["| documents in the catalog | approach | seconds | docs/s | share of its rate at "
            f"{smallest:,} | inserted | duplicates | malformed | schema migration |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rate = args.batch / r["seconds"]
        migration = f"{r['migration']:.1f} s" if r["approach"] == "new" else "–"
        rows.append(f"| {r['size']:,} | {r['approach']} | {r['seconds']:.2f} | {rate:,.0f} | "
                    f"{rate / base[r['approach']]:.0%} | {r['inserted']:,} | {r['duplicates']:,} | "
                    f"{r['skipped']:,} | {migration} |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [*rows, "",
            f"Batch: {args.batch:,} JSONL lines (1% copies of catalog documents, 1% repeats, 0.1% malformed); "
            f"best of {args.repeats}. new = this tree; old = `{args.baseline_ref}` (hex-string anti-join). "
            "Pre-fill: direct Arrow inserts into the old layout, hashes by `content_hash`; the new code "
            "migrates a copy first.",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other agents running their own "
            f"benchmarks, Python {platform.python_version()}; load average (1, 5, 15 min) at the end: {load}."]


if __name__ == "__main__":
    main()
