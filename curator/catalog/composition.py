"""Corpus composition: what the catalog holds, per source and kind."""

from __future__ import annotations

import polars as pl

from curator.catalog.database import Catalog
from curator.catalog.workspace import Workspace


def token_counts_available(catalog: Catalog) -> list[str]:
    """Tokenizers with cached counts, the most complete first."""
    rows = catalog.sql(
        "SELECT tokenizer FROM token_counts GROUP BY tokenizer ORDER BY count(*) DESC, tokenizer"
    )
    return [r[0] for r in rows]


def composition(catalog: Catalog, tokenizer: str | None = None) -> pl.DataFrame:
    """One row per (source, kind): documents, characters, bytes, tokens and shares.

    Tokens are those of `tokenizer` (default: the one with the most cached
    counts); a group whose documents are not all counted shows no tokens.
    Shares are of the whole corpus, by documents and by characters.
    """
    if tokenizer is None:
        known = token_counts_available(catalog)
        tokenizer = known[0] if known else None
    table = catalog.frame(
        """
        SELECT d.source, d.kind,
               count(*)          AS documents,
               sum(d.chars)      AS chars,
               sum(d.bytes)      AS bytes,
               CASE WHEN count(t.tokens) = count(*) THEN sum(t.tokens) END AS tokens
        FROM documents d
        LEFT JOIN token_counts t ON t.doc_id = d.id AND t.tokenizer = ?
        GROUP BY d.source, d.kind
        ORDER BY d.source, d.kind
        """,
        [tokenizer],
    ).with_columns(pl.col("documents", "chars", "bytes", "tokens").cast(pl.Int64))
    if table.is_empty():
        return table.with_columns(
            pl.lit(None, pl.Float64).alias("docs_share"), pl.lit(None, pl.Float64).alias("chars_share")
        )
    return table.with_columns(
        (pl.col("documents") / pl.col("documents").sum()).alias("docs_share"),
        (pl.col("chars") / pl.col("chars").sum()).alias("chars_share"),
    )


def corpus_composition(ws: Workspace, tokenizer: str | None = None) -> pl.DataFrame:
    """`composition` of a workspace's catalog, opened read-only."""
    with Catalog.open(ws) as catalog:
        return composition(catalog, tokenizer)
