"""Writing a benchmark's results into docs/benchmarks.md: one marked section, replaced on each run."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def record_section(path: Path, name: str, heading: str, script: str, lines: list[str]) -> None:
    """Replace the section between `<!-- name:begin -->` and `<!-- name:end -->` (or append it under
    `heading`), stamped with the date and the command line that produced it (without --record)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    command = " ".join([f"python benchmarks/{script}", *sys.argv[1:]]).replace(f" --record {path}", "")
    section = "\n".join([begin, f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.", "", *lines, end])
    text = path.read_text() if path.is_file() else ""
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)
