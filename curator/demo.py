"""The demo corpus and settings: real text that is available offline, in four kinds.

- ``stdlib`` (code): top-level functions and classes of the Python standard
  library, written as a folder of ``.py`` files (the directory connector);
- ``package-docs`` (markdown): sections of installed packages' Markdown
  descriptions, as JSONL;
- ``trivia`` (trivia): question/answer cards from the ``red-trivia`` package's
  lists, as JSONL; the factual queries are drawn from the cards in the corpus,
  so their answers are there to be found;
- ``mpmath-docs`` (math): mpmath's function documentation (definitions,
  formulas, worked numeric examples), as Parquet.

Everything is seeded: the same settings give the same files, and files are only
rewritten when their content changes, so a second run ingests nothing new.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, Field

from curator.artifacts import atomic_file, write_text_atomic
from curator.errors import CuratorError

# Parts of the stdlib folder that are not the library's own modules, or are test
# data with deliberately broken files.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib-dynload",
                "__pycache__", "lib2to3", "encodings"}
# Trivia lists of general knowledge (capitals, elements, literature, myth, …) rather than games and shows.
TRIVIA_LISTS = ("worldcapitals", "uscapitals", "elements", "general", "artandliterature", "greekmyth",
                "computers", "sports")
CARD_PAIRS = 6
MIN_CHARS = 200


class DemoSettings(BaseModel):
    """The sizes of one demo run; printed at the start, recorded with its timings."""

    model: str = Field("smollm2-135m", description="model name, .gguf file or save_pretrained folder")
    docs_per_source: int = Field(48, ge=2, description="documents drawn from each of the four sources")
    max_chars: int = Field(600, ge=MIN_CHARS, description="longest document, in characters")
    max_seq_len: int = Field(128, ge=8, description="tokens per window")
    layers: str = Field("last:3", description="transformer blocks whose MLPs are tracked")
    fit_docs: int = Field(96, ge=1, description="documents in the EK-FAC fitting sample")
    queries_per_task: int = Field(4, ge=1, description="scored queries per reasoning task and control")
    suite_per_task: int = Field(6, ge=1, description="queries per task that span the sketch bases")
    factual_queries: int = Field(6, ge=1, description="factual queries drawn from the trivia in the corpus")
    sketch_rank: int = Field(16, ge=1, description="k per layer: a k × k sketch per tracked layer")
    device: str = "cpu"
    batch_tokens: int = Field(2048, ge=8)
    query_memory_mb: int = Field(2048, ge=1, description="memory for preconditioned queries per scoring pass")
    seed: int = 0


CPU_DEMO = DemoSettings()
# The same pipeline at a size a GPU makes affordable: longer documents and windows,
# every block tracked, more queries and a larger sketch.
GPU_DEMO = DemoSettings(docs_per_source=2000, max_chars=6000, max_seq_len=512, layers="all", fit_docs=2000,
                        queries_per_task=20, suite_per_task=16, factual_queries=40, sketch_rank=32,
                        device="cuda", batch_tokens=16384,
                        # Every block's dense P_q is ~320 MB per query: keep the suite in one pass.
                        query_memory_mb=32768)


@dataclass(frozen=True)
class DemoSource:
    name: str
    kind: str
    paths: list[str]
    glob: str | None = None


@dataclass(frozen=True)
class DemoCorpus:
    sources: list[DemoSource]
    factual_queries: Path


# ---- the four sources -------------------------------------------------------

def _sample(rows: list[dict], n: int, seed: int, what: str) -> list[dict]:
    """n rows drawn with the seed (all of them when there are fewer), in id order."""
    if not rows:
        raise CuratorError(f"no {what} found on this machine")
    return sorted(random.Random(seed).sample(rows, min(n, len(rows))), key=lambda r: r["id"])


def stdlib_paths() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.iterdir()
        if p.name not in _STDLIB_SKIP and not p.name.startswith(("config-", "."))
        and (p.is_dir() or p.suffix == ".py")
    )


def _stdlib_files() -> list[Path]:
    files = []
    for path in map(Path, stdlib_paths()):
        candidates = [path] if path.is_file() else sorted(path.rglob("*.py"))
        files.extend(p for p in candidates if not _STDLIB_SKIP & set(p.parts))
    return files


def code_snippets(n: int, max_chars: int, seed: int) -> list[dict]:
    """Whole top-level functions and classes of the standard library, MIN_CHARS..max_chars long.

    Drawn round-robin over modules in a seeded order (one from every module before a
    second from any), so that a small sample spans the library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    per_module = []
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        lines = source.splitlines(keepends=True)
        # Top-level definitions start at column 0: their lines are their source.
        eligible = [{"id": f"{module}.{node.name}", "text": text, "module": module}
                    for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)
                    and MIN_CHARS <= len(text := "".join(lines[node.lineno - 1:node.end_lineno])) <= max_chars]
        if eligible:
            rng.shuffle(eligible)
            per_module.append(eligible)
    rng.shuffle(per_module)
    snippets = [module[i] for i in range(max(map(len, per_module), default=0))
                for module in per_module if i < len(module)]
    if not snippets:
        raise CuratorError(f"no standard-library functions of {MIN_CHARS}..{max_chars} characters found")
    return sorted(snippets[:n], key=lambda r: r["id"])


def package_descriptions() -> list[dict]:
    """Installed packages' Markdown long descriptions, one row per package, sorted by name."""
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
        rows.append({"id": name, "text": text, "version": meta["Version"]})
    return sorted(rows, key=lambda r: r["id"].lower())


def excerpt(text: str, max_chars: int) -> str:
    """The text up to max_chars, cut at the last paragraph (or line) break that fits."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = head.rfind("\n\n")
    if cut < max_chars // 2:
        cut = head.rfind("\n")
    return head[:cut if cut > 0 else max_chars].rstrip()


def _mostly_prose(text: str) -> bool:
    # Badge rows, link lists and tables are Markdown, but not what a reader calls text.
    letters = sum(c.isalpha() for c in text)
    links = len(re.findall(r"\]\(|https?://", text))
    return letters > 0.55 * len(text) and links < 6


def markdown_sections(n: int, max_chars: int, seed: int) -> list[dict]:
    """Sections (split at headings) of installed packages' Markdown descriptions."""
    sections = []
    for row in package_descriptions():
        parts = re.split(r"\n(?=#{1,3} )", "\n" + row["text"])
        for k, part in enumerate(parts):
            text = excerpt(part, max_chars)
            if len(text) >= MIN_CHARS and _mostly_prose(text):
                sections.append({"id": f"{row['id']}#{k}", "text": text + "\n", "package": row["id"],
                                 "version": row["version"]})
    return _sample(sections, n, seed, "Markdown sections of installed packages")


def trivia_folder() -> Path:
    spec = importlib.util.find_spec("redbot.ext.trivia") if importlib.util.find_spec("redbot") else None
    if spec is None or not spec.submodule_search_locations:
        raise CuratorError("the demo's trivia source needs the red-trivia package: pip install red-trivia "
                           "(make demo installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "lists"


def trivia_cards(n: int, seed: int) -> list[dict]:
    """Cards of CARD_PAIRS question/answer pairs from general-knowledge trivia lists."""
    import yaml

    folder = trivia_folder()
    cards = []
    for name in TRIVIA_LISTS:
        path = folder / f"{name}.yaml"
        if not path.is_file():
            continue
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        pairs = [(str(q).strip(), str(a[0]).strip()) for q, a in entries.items()
                 if q not in ("AUTHOR", "CONFIG") and isinstance(a, list) and a and str(a[0]).strip()]
        for start in range(0, len(pairs) - CARD_PAIRS + 1, CARD_PAIRS):
            chunk = pairs[start:start + CARD_PAIRS]
            text = "\n".join(f"Q: {q}\nA: {a}" for q, a in chunk)
            cards.append({"id": f"{name}-{start // CARD_PAIRS:03d}", "text": text + "\n", "list": name,
                          "pairs": [{"question": q, "answer": a} for q, a in chunk]})
    return _sample(cards, n, seed, f"trivia cards in {folder}")


def factual_queries(cards: list[dict], n: int, seed: int) -> list[dict]:
    """Questions from cards in the corpus, with answers a string search can find (letters, 4+ chars)."""
    pairs = [(card["id"], p) for card in cards for p in card["pairs"]
             if len(p["answer"]) >= 4 and any(c.isalpha() for c in p["answer"])]
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [{"id": f"trivia-{k:03d}", "task": "factual", "prompt": p["question"],
             "completion": f"The answer is {p['answer']}.", "answer": p["answer"],
             "metadata": {"card": card}}
            for k, (card, p) in enumerate(sorted(chosen, key=lambda c: (c[0], c[1]["question"])))]


def math_docstrings(n: int, max_chars: int, seed: int) -> list[dict]:
    """mpmath's function documentation: definitions, formulas and worked numeric examples."""
    spec = importlib.util.find_spec("mpmath")
    if spec is None or spec.origin is None:
        raise CuratorError("the demo's math source needs mpmath (installed with torch's sympy): pip install mpmath")
    path = Path(spec.origin).parent / "function_docs.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            name = node.targets[0].id
            heading = f"mpmath.{name}\n\n"
            text = excerpt(node.value.value, max_chars - len(heading))
            if len(text) >= MIN_CHARS:
                docs.append({"id": f"mpmath.{name}", "text": heading + text + "\n", "function": name})
    return _sample(docs, n, seed, "mpmath docstrings")


# ---- writing the corpus -----------------------------------------------------

def _write_if_changed(path: Path, content: bytes) -> None:
    # Rewriting identical content would change the file's mtime, and a second
    # demo run would then read it again instead of recognising it as unchanged.
    if path.is_file() and path.read_bytes() == content:
        return
    with atomic_file(path) as part:
        part.write_bytes(content)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, compression="zstd")
    return buffer.getvalue()


def build_demo_corpus(directory: Path, settings: DemoSettings) -> DemoCorpus:
    """Write the four sources and the factual queries under directory; return what to ingest."""
    n, size, seed = settings.docs_per_source, settings.max_chars, settings.seed
    code_dir = directory / "stdlib"
    snippets = code_snippets(n, size, seed)
    wanted = {f"{s['id']}.py" for s in snippets}
    if code_dir.is_dir():
        for stale in code_dir.glob("*.py"):          # from an earlier run with other settings
            if stale.name not in wanted:
                stale.unlink()
    for snippet in snippets:
        _write_if_changed(code_dir / f"{snippet['id']}.py", snippet["text"].encode())
    _write_if_changed(directory / "package-docs.jsonl", _jsonl(markdown_sections(n, size, seed)))
    cards = trivia_cards(n, seed)
    _write_if_changed(directory / "trivia.jsonl.gz",
                      gzip.compress(_jsonl([{k: v for k, v in c.items() if k != "pairs"} for c in cards]), mtime=0))
    _write_if_changed(directory / "mpmath-docs.parquet", _parquet(math_docstrings(n, size, seed)))
    queries = directory / "factual-queries.jsonl"
    _write_if_changed(queries, _jsonl(factual_queries(cards, settings.factual_queries, seed)))
    return DemoCorpus(
        sources=[DemoSource("stdlib", "code", [str(code_dir)], glob="*.py"),
                 DemoSource("package-docs", "markdown", [str(directory / "package-docs.jsonl")]),
                 DemoSource("trivia", "trivia", [str(directory / "trivia.jsonl.gz")]),
                 DemoSource("mpmath-docs", "math", [str(directory / "mpmath-docs.parquet")])],
        factual_queries=queries)


def mixture_budget(root: Path, share: float = 0.4) -> int:
    """The demo mixture's token budget: 40% of the corpus's tokens (counted by the scoring run's tokenizer)."""
    from curator.catalog.composition import corpus_composition
    from curator.catalog.workspace import Workspace

    tokens = corpus_composition(Workspace.locate(root))["tokens"].sum()
    return max(1, int(share * tokens))


def machine_description(device: str) -> str:
    import os
    import platform

    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
            f"threads, device {device}, torch {torch.__version__}")


BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"


def record_timings(path: Path, settings: DemoSettings, timings: list[tuple[str, float]], total: float) -> None:
    """Write the settings and stage timings into a Markdown file, between the demo's markers."""
    import time

    lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')} with `curator demo"
             f"{' --gpu' if settings.device != 'cpu' else ''}` (settings below; the defaults of that mode).", "",
             "| setting | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in settings.model_dump().items()), "",
             "| stage | seconds |", "|---|---|", *(f"| {n} | {s:,.1f} |" for n, s in timings),
             f"| **total** | **{total:,.1f}** |", "",
             f"Machine: {machine_description(settings.device)}.", END]
    text = path.read_text() if path.is_file() else ""
    section = "\n".join(lines)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## End-to-end demo: `make demo`\n\n" + section + "\n"
    write_text_atomic(path, text)
