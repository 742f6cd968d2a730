"""What every stage shares about its outputs: identities, atomic writes, settings.

- An artifact's id is a short hash of everything that determines its content
  (``content_id``). Settings models mark the fields that do not change the
  result (device, batch sizes, memory budgets) with ``NOT_IDENTITY``; they are
  left out, so a rerun with another batch size finds the same artifact.
- Files and folders are written under ``NAME.part`` and renamed when complete
  (``atomic_file``, ``atomic_dir``), so nothing half-written ever carries a
  final name, and a failed write removes its ``.part``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

PART = ".part"

# Marks a settings field that changes how a result is computed, never what it is.
NOT_IDENTITY = {"identity": False}


class Settings(BaseModel):
    """A settings model whose identity leaves out the fields marked NOT_IDENTITY."""

    def identity(self) -> dict:
        skipped = {name for name, field in type(self).model_fields.items()
                   if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("identity") is False}
        return self.model_dump(mode="json", exclude=skipped)


def content_id(prefix: str, *parts) -> str:
    """`PREFIX-` and 12 hex digits of a hash of the JSON form of `parts`."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return f"{prefix}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def part_path(path: Path) -> Path:
    return path.with_name(path.name + PART)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield `PATH.part` to write; rename it to PATH when the block succeeds, remove it when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(path)
    _remove(part)
    try:
        yield part
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """A leftover at a `.part` name: a file, or (scores before chunks had their own folder) a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as part:
        part.write_text(text, encoding="utf-8")


def write_numpy_atomic(path: Path, array) -> None:
    import numpy as np

    with atomic_file(path) as part, open(part, "wb") as handle:
        np.save(handle, array)


def replace_dir(part: Path, target: Path) -> None:
    """Move a finished `part` folder to `target`, replacing what is there without a moment in which
    neither copy exists: the old folder is first renamed aside (`TARGET.old`), then removed."""
    recover_dir(target)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    part.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo an interrupted `replace_dir`: an `.old` copy with no new folder is put back."""
    old = target.with_name(target.name + ".old")
    if old.exists() and not target.exists():
        old.rename(target)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def reading(path: Path, what: str, rebuild: str) -> Iterator[None]:
    """Turn a missing or damaged artifact into one error naming the file and the command that rebuilds it.

    Readers (safetensors, numpy, pyarrow, FAISS, JSON, pydantic) each fail in their own way on a
    truncated or overwritten file; every such failure inside the block becomes an ArtifactError.
    """
    from curator.errors import ArtifactError

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"the {what} {path} is missing; rebuild it with `{rebuild}`")
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:
        # Each reader fails its own way on a truncated or overwritten file: OSError, ValueError
        # (json, pydantic, numpy), RuntimeError (FAISS), or its library's own errors.
        readers = ("safetensors", "polars", "pyarrow")
        if not isinstance(exc, (OSError, ValueError, RuntimeError, KeyError, EOFError, TypeError)) and \
                not type(exc).__module__.split(".")[0] in readers:
            raise
        raise ArtifactError(f"the {what} {path} is damaged or unreadable ({_first_line(exc)}); rebuild it with "
                            f"`{rebuild}`") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)
