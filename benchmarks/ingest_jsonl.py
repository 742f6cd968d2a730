"""Ingest throughput and memory on a generated 1M-line JSONL corpus.

    python benchmarks/ingest_jsonl.py [--lines 1000000] [--record docs/benchmarks.md]

Baseline, measured in the same run on the same file: reading the lines and
parsing each with json.loads, the least any JSONL ingest must do. The ratio says
what cataloguing (hashing, deduplication, DuckDB inserts) costs on top. Each
measurement runs in a fresh process so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not "
         "function return value matrix gradient theorem proof lemma integer slope equation solve compute "
         "def class import self print list dict string number step answer therefore hence sum product").split()


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """Documents of 20-200 words; 1% exact duplicates and 0.1% malformed lines, as in real dumps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(lines):
            r = rng.random()
            if r < 0.001:
                f.write('{"text": "broken\n')
            elif r < 0.011 and i:
                f.write(json.dumps({"id": f"d{i}", "text": "a repeated boilerplate page"}) + "\n")
            else:
                text = " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))
                f.write(json.dumps({"id": f"d{i}", "text": text, "url": f"https://example.org/{i}"}) + "\n")


def in_child(code: str) -> dict:
    """Run code in a fresh interpreter; it prints a JSON dict, to which peak RSS is added."""
    wrapped = code + "\nimport resource, json as _j\nprint(_j.dumps({**RESULT, 'peak_rss_mb': " \
                     "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--record", type=Path, help="Markdown file whose ingest section to rewrite")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        t = time.perf_counter()
        generate(data, args.lines)
        size_mb = data.stat().st_size / 1e6
        print(f"generated {args.lines:,} lines, {size_mb:,.0f} MB in {time.perf_counter() - t:.0f} s")

        baseline = in_child(textwrap.dedent(f"""
            import json, time
            t = time.perf_counter(); n = 0
            with open({str(data)!r}, 'rb') as f:
                for line in f:
                    try:
                        json.loads(line); n += 1
                    except ValueError:
                        pass
            RESULT = {{'seconds': time.perf_counter() - t, 'records': n}}
        """))
        ingest = in_child(textwrap.dedent(f"""
            import time
            from curator.catalog.ingest import IngestOptions, ingest
            from curator.catalog.workspace import Workspace
            from curator.catalog.database import create_workspace
            ws, _ = create_workspace({str(Path(tmp) / 'ws')!r})
            t = time.perf_counter()
            s = ingest(ws, [{str(data)!r}], IngestOptions(source='bench', kind='web'))
            RESULT = {{'seconds': time.perf_counter() - t, 'records': s.records_read, 'inserted': s.inserted,
                       'duplicates': s.duplicates, 'skipped': s.skipped,
                       'db_mb': ws.catalog_path.stat().st_size / 1e6}}
        """))

    docs_s = args.lines / ingest["seconds"]
    base_s = args.lines / baseline["seconds"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    rows = [
        ("input", f"{args.lines:,} JSONL lines, {size_mb:,.0f} MB"),
        ("ingest", f"{ingest['seconds']:.1f} s, {docs_s:,.0f} docs/s, peak RSS {ingest['peak_rss_mb']:,.0f} MB"),
        ("baseline (read + json.loads)", f"{baseline['seconds']:.1f} s, {base_s:,.0f} lines/s, "
                                         f"peak RSS {baseline['peak_rss_mb']:,.0f} MB"),
        ("ingest / baseline time", f"{ingest['seconds'] / baseline['seconds']:.2f}×"),
        ("result", f"{ingest['inserted']:,} documents, {ingest['duplicates']:,} duplicates, "
                   f"{ingest['skipped']:,} malformed lines skipped; catalog {ingest['db_mb']:,.0f} MB"),
        ("machine", machine),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.record:
        record(args.record, rows)


def record(path: Path, rows: list[tuple[str, str]]) -> None:
    begin, end = "<!-- ingest_jsonl:begin -->", "<!-- ingest_jsonl:end -->"
    section = "\n".join([begin, f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/ingest_jsonl.py`.",
                         "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Ingest: 1M-line JSONL\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
