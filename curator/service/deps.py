"""What routes share: the service object and the token checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from curator.catalog.workspace import Workspace
from curator.service.auth import TokenChecker, TokenInfo
from curator.service.db import ServerCatalog
from curator.service.errors import ApiError
from curator.catalog.database import FileLock
from curator.service.jobs import JobManager
from curator.service.search import Searcher


@dataclass
class Service:
    """What every request reaches through `request.app.state.service`."""

    ws: Workspace
    roots: list[Path]
    url: str
    catalog: ServerCatalog = field(init=False)
    jobs: JobManager = field(init=False)
    searcher: Searcher = field(init=False)
    tokens: TokenChecker = field(init=False)
    lock: FileLock | None = None            # WS/server.lock while the server runs (app._claim)

    def __post_init__(self) -> None:
        self.catalog = ServerCatalog(self.ws)
        self.jobs = JobManager(self.catalog)
        self.searcher = Searcher(self.catalog)
        self.tokens = TokenChecker(self.catalog.read)


def service_of(request: Request) -> Service:
    return request.app.state.service


# -- auth ------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="`curator token create --scope read|write`")


def _token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> TokenInfo:
    if credentials is None:
        raise ApiError(401, "Authorization", "send a bearer token: Authorization: Bearer cur_... "
                                             "(make one with `curator token create`)")
    info = service_of(request).tokens.check(credentials.credentials)
    if info is None:
        raise ApiError(401, "Authorization", "unknown or malformed token")
    return info


def read_scope(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> TokenInfo:
    return _token(request, credentials)


def write_scope(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> TokenInfo:
    info = _token(request, credentials)
    if info.scope != "write":
        raise ApiError(403, "Authorization", f"token {info.name} has the read scope; submitting or cancelling "
                                             f"jobs needs a write token")
    return info


