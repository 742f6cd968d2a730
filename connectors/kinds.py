"""Which kind of source a file is, from its extension (for directories of files)."""

from __future__ import annotations

from pathlib import Path

CODE_EXTENSIONS = frozenset(
    ".py .pyi .c .h .cc .cpp .cxx .hpp .hh .cu .java .kt .scala .js .mjs .ts .tsx .jsx .go .rs "
    ".rb .php .cs .swift .m .mm .r .jl .lua .pl .pm .hs .ml .mli .ex .exs .erl .clj .sh .bash "
    ".zsh .ps1 .sql .f90 .f .for .asm .s .v .sv .vhd .zig .nim .dart .ipynb".split()
)

_BY_EXTENSION = {
    **{ext: "code" for ext in CODE_EXTENSIONS},
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "markdown",
    ".tex": "arxiv",
    ".txt": "web",
    ".html": "web",
    ".htm": "web",
}


def kind_from_extension(path: Path) -> str:
    return _BY_EXTENSION.get(path.suffix.lower(), "other")
