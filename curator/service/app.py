"""The FastAPI app: error shape, body limit, bearer tokens, routers, and the server's life cycle."""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from curator.catalog.database import SERVER_FILE, SERVER_ID_ENV, SERVER_LOCK, FileLock
from curator.catalog.workspace import Workspace
from curator.errors import ArtifactError, CatalogLockedError, CuratorError, WorkspaceError
from curator.service.deps import Service, read_scope
from curator.service.errors import ApiError

log = logging.getLogger("curator.service")
MAX_BODY_BYTES = 1 << 20
STATIC_DIR = Path(__file__).parent / "static"      # the web page (a later milestone) goes here


# -- errors: one JSON shape, never a traceback -----------------------------------------------------

def _error(status: int, message: str, field_name: str | None = None, **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, "field": field_name, "status": status, **extra}, status_code=status,
                        headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "invalid")}
                    for e in exc.errors()]
        status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
        first = problems[0] if problems else {"field": None, "problem": "invalid request"}
        return _error(status, f"{first['field']}: {first['problem']}", first["field"], problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(CuratorError)
    async def curator_error(request: Request, exc: CuratorError):
        status = 503 if isinstance(exc, (CatalogLockedError, WorkspaceError)) else \
            409 if isinstance(exc, ArtifactError) else 400
        return _error(status, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the server's log has the details")


class BodyLimit:
    """413 for a request body over MAX_BODY_BYTES, declared or streamed (the body is read here, at most
    the limit plus one byte, and handed on)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"the request body is over {self.limit} bytes", "body")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# -- the app ---------------------------------------------------------------------------------------

def create_app(ws: Workspace, roots: list[Path], url: str) -> FastAPI:
    from curator import __version__
    from curator.service import routes_jobs, routes_read

    service = Service(ws, roots, url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _claim(service)
        try:
            notes = service.jobs.start()
            for note in notes:
                log.warning(note)
            if not service.tokens.any_tokens():
                print(f"No API tokens yet. Make one (the server stays up meanwhile):\n"
                      f"  curator token create --scope write --name me -w {ws.root}", flush=True)
            yield
        finally:
            service.jobs.stop()
            _release(service)

    app = FastAPI(title="curator", version=__version__, lifespan=lifespan,
                  description="Rank pretraining documents by their influence on a model's reasoning. "
                              "Every route but /v1/health needs a bearer token (docs/service.md).")
    app.state.service = service
    _install_handlers(app)
    app.include_router(routes_read.public, prefix="/v1")
    app.include_router(routes_read.router, prefix="/v1", dependencies=[Depends(read_scope)])
    app.include_router(routes_jobs.router, prefix="/v1")
    if (STATIC_DIR / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    app.add_middleware(BodyLimit)
    return app


def _claim(service: Service) -> None:
    """Take WS/server.lock (held while this process lives) and write WS/server.json: the server owns the
    workspace. Its workers carry the id written there."""
    import secrets

    from curator.artifacts import write_text_atomic

    lock = FileLock(service.ws.root / SERVER_LOCK)
    if not lock.acquire():
        try:
            other = json.loads((service.ws.root / SERVER_FILE).read_text())
        except (OSError, ValueError):
            other = {}
        raise WorkspaceError(f"another curator server (pid {other.get('pid', '?')}, {other.get('url', '?')}) serves "
                             f"{service.ws.root}")
    service.lock = lock
    server_id = secrets.token_hex(16)
    write_text_atomic(service.ws.root / SERVER_FILE, json.dumps({"pid": os.getpid(), "url": service.url,
                                                                "id": server_id}))
    os.environ[SERVER_ID_ENV] = server_id
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _release(service: Service) -> None:
    path = service.ws.root / SERVER_FILE
    try:
        if json.loads(path.read_text()).get("id") == os.environ.get(SERVER_ID_ENV):
            path.unlink()
    except (OSError, ValueError):
        pass
    if service.lock is not None:
        service.lock.release()
        service.lock = None


def serve(ws: Workspace, host: str, port: int, roots: list[Path]) -> None:
    """Run the server until it is stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    from curator.catalog.database import create_workspace

    create_workspace(ws.root)       # migrate before anything reads (the server's reads are read-only)
    display = f"[{host}]" if ":" in host else host
    app = create_app(ws, roots, f"http://{display}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
