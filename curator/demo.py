"""The demo corpus: real text that every machine with Python has, offline.

- ``stdlib``: the standard library's modules (code);
- ``package-docs``: the long descriptions of installed packages that declare
  Markdown (markdown), written to a JSONL file so that they go through the same
  JSONL connector a user's corpus would.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Parts of the stdlib folder that are not the library's own modules, or are test
# data with deliberately broken files.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "turtledemo", "lib-dynload", "__pycache__"}


@dataclass(frozen=True)
class DemoSource:
    name: str
    kind: str
    paths: list[str]
    glob: str | None = None


def stdlib_paths() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.iterdir()
        if p.name not in _STDLIB_SKIP and not p.name.startswith(("config-", "."))
        and (p.is_dir() or p.suffix == ".py")
    )


def write_package_descriptions(out: Path) -> int:
    """Installed packages' Markdown long descriptions as JSONL; returns how many."""
    seen: set[str] = set()
    rows = []
    for dist in metadata.distributions():
        meta = dist.metadata
        name = meta["Name"]
        if not name or name.lower() in seen:
            continue
        if "markdown" not in (meta.get("Description-Content-Type") or "").lower():
            continue
        text = meta.get_payload() or meta.get("Description") or ""
        if not text.strip():
            continue
        seen.add(name.lower())
        rows.append({"id": name, "text": text, "version": meta["Version"], "summary": meta.get("Summary")})
    content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sorted(rows, key=lambda r: r["id"].lower()))
    # Rewriting identical content would change the file's mtime, and a second
    # demo run would then read it again instead of recognising it as unchanged.
    if not out.is_file() or out.read_text(encoding="utf-8") != content:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(content, encoding="utf-8")
    return len(rows)


def build_demo_corpus(directory: Path) -> list[DemoSource]:
    descriptions = directory / "package-descriptions.jsonl"
    write_package_descriptions(descriptions)
    return [
        DemoSource("stdlib", "code", stdlib_paths(), glob="*.py"),
        DemoSource("package-docs", "markdown", [str(descriptions)]),
    ]
