"""Bearer tokens: `cur_<id>_<secret>`, stored as a salted SHA-256 of the secret.

The id is public (it names the row); the secret is 32 random bytes, so one salted SHA-256 is enough
(a slow hash protects guessable passwords, not random keys). A token is checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from typing import Literal

from pydantic import BaseModel

from curator.catalog.database import SERVER_FILE, SERVER_ID_ENV, Catalog
from curator.catalog.workspace import Workspace
from curator.errors import CuratorError

Scope = Literal["read", "write"]
PREFIX = "cur_"
CACHE_S = 30.0          # a verified token is trusted this long without a catalog read


class TokenInfo(BaseModel):
    id: str
    name: str
    scope: Scope


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def create_token(ws: Workspace, scope: Scope, name: str | None = None) -> tuple[TokenInfo, str]:
    """A new token: its record and the token itself, shown once and never stored."""
    if scope not in ("read", "write"):
        raise CuratorError(f"scope must be read or write, not {scope!r}")
    token_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    info = TokenInfo(id=token_id, name=name or f"{scope}-{token_id}", scope=scope)
    with _beside_server(ws) as catalog:
        catalog.sql("INSERT INTO api_tokens (id, name, scope, salt, digest) VALUES (?, ?, ?, ?, ?)",
                    [info.id, info.name, info.scope, salt, _digest(salt, secret)])
    return info, f"{PREFIX}{token_id}_{secret}"


def revoke_token(ws: Workspace, which: str) -> TokenInfo:
    """Delete the token whose id or name is `which`. A running server stops accepting it within CACHE_S
    seconds (it remembers a verified token that long)."""
    with _beside_server(ws) as catalog:
        rows = catalog.sql("SELECT id, name, scope FROM api_tokens WHERE id = ? OR name = ?", [which, which])
        if len(rows) != 1:
            known = ", ".join(f"{t.id} ({t.name})" for t in list_tokens(catalog)) or "none"
            raise CuratorError(f"{'no' if not rows else 'more than one'} token has the id or name {which!r}; "
                               f"tokens: {known}" + ("; give the id" if rows else ""))
        catalog.sql("DELETE FROM api_tokens WHERE id = ?", [rows[0][0]])
    return TokenInfo(id=rows[0][0], name=rows[0][1], scope=rows[0][2])


def _beside_server(ws: Workspace) -> Catalog:
    """A write connection allowed beside a running server: a token change is one short statement, and the
    server reads tokens from the catalog (its server.json ownership check would otherwise refuse it)."""
    server = _server_id(ws)
    if server is not None:
        os.environ[SERVER_ID_ENV] = server
    return Catalog.open(ws, write=True)


def list_tokens(catalog: Catalog) -> list[TokenInfo]:
    return [TokenInfo(id=r[0], name=r[1], scope=r[2])
            for r in catalog.sql("SELECT id, name, scope FROM api_tokens ORDER BY created_at")]


def _server_id(ws: Workspace) -> str | None:
    try:
        return str(json.loads((ws.root / SERVER_FILE).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TokenChecker:
    """Verifies presented tokens against the catalog, remembering good ones for CACHE_S seconds."""

    def __init__(self, read):
        self._read = read                       # ServerCatalog.read
        self._cache: dict[str, tuple[float, TokenInfo]] = {}
        self._lock = threading.Lock()

    def check(self, token: str) -> TokenInfo | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        parts = token.split("_", 2)
        if len(parts) != 3 or f"{parts[0]}_" != PREFIX or not parts[1] or not parts[2]:
            return None
        row = self._read(lambda c: c.one("SELECT id, name, scope, salt, digest FROM api_tokens WHERE id = ?",
                                         [parts[1]]))
        if row is None or not hmac.compare_digest(_digest(row[3], parts[2]), row[4]):
            return None
        info = TokenInfo(id=row[0], name=row[1], scope=row[2])
        with self._lock:
            self._cache[key] = (time.monotonic(), info)
        return info

    def any_tokens(self) -> bool:
        return bool(self._read(lambda c: c.one("SELECT count(*) FROM api_tokens")[0]))


def tokens_table(ws: Workspace) -> list[TokenInfo]:
    with Catalog.open(ws) as catalog:
        return list_tokens(catalog)
