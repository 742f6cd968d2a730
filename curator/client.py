"""A small client for `curator serve`, so scripts need no hand-written HTTP.

    from curator.client import Client
    with Client("http://127.0.0.1:8000", token) as api:
        api.sources()
        job = api.submit({"kind": "fit", "config": {"model": "models/tiny", "layers": "last:1"}})
        for record in api.follow(job["id"]):
            print(record["state"], record["progress"])
        api.search(prompt="Calculate ...", completion="...", top=10)

Errors come back as ServerError with the server's message, field and status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from curator.errors import CuratorError


class ServerError(CuratorError):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"the server said {status}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.field, self.message = status, field, message


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, raw: bool = False, **kwargs) -> Any:
        """The response's JSON, its text, or (`raw`) its bytes; a ServerError for a 4xx or 5xx."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CuratorError(f"cannot reach the server at {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ServerError(response.status_code, body.get("error", response.text), body.get("field"))
            except ValueError:
                raise ServerError(response.status_code, response.text) from None
        if raw:
            return response.content
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    @staticmethod
    def _params(**params) -> dict:
        return {k: v for k, v in params.items() if v is not None}

    # -- reads -------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._call("GET", "/health")

    def sources(self, tokenizer: str | None = None) -> list[dict]:
        return self._call("GET", "/sources", params=self._params(tokenizer=tokenizer))

    def documents(self, q: str | None = None, source: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/documents", params=self._params(q=q, source=source, limit=limit, offset=offset))

    def document(self, doc_id: int) -> dict:
        return self._call("GET", f"/documents/{doc_id}")

    def sample(self, n: int = 10, seed: int = 0, source: str | None = None) -> list[dict]:
        return self._call("GET", "/documents/sample", params=self._params(n=n, seed=seed, source=source))

    def queries(self, selector: str = "all", limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/queries", params={"selector": selector, "limit": limit, "offset": offset})

    def fits(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/fits", params={"limit": limit, "offset": offset})

    def runs(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/runs", params={"limit": limit, "offset": offset})

    def run(self, run_id: str) -> dict:
        return self._call("GET", f"/runs/{run_id}")

    def stores(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/stores", params={"limit": limit, "offset": offset})

    def indexes(self) -> list[dict]:
        return self._call("GET", "/indexes")

    def rankings(self) -> list[dict]:
        return self._call("GET", "/rankings")

    def mixtures(self) -> list[dict]:
        return self._call("GET", "/mixtures")

    def exports(self) -> list[dict]:
        return self._call("GET", "/exports")

    def audit_report(self) -> bytes:
        """The latest audit report (HTML) the server has."""
        return self._call("GET", "/audit/report", raw=True)

    def audit_data(self) -> dict:
        return self._call("GET", "/audit/report.json")

    def search(self, prompt: str | None = None, completion: str | None = None, queries: str | None = None,
               **options) -> list[dict]:
        body = self._params(prompt=prompt, completion=completion, queries=queries, **options)
        return self._call("POST", "/search", json=body)

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, request: dict) -> dict:
        return self._call("POST", "/jobs", json=request)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/jobs", params={"limit": limit, "offset": offset})

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def log(self, job_id: str) -> str:
        return self._call("GET", f"/jobs/{job_id}/log")

    def follow(self, job_id: str) -> Iterator[dict]:
        """The job's record at every change, from its Server-Sent Events, until it ends."""
        with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                body = response.json()
                raise ServerError(response.status_code, body.get("error", ""), body.get("field"))
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "job":
                    yield json.loads(line[6:])
                elif line.startswith("data: ") and event == "end":
                    return

    def wait(self, job_id: str) -> dict:
        """Follow a job to its end; its final record."""
        last = self.job(job_id)
        for last in self.follow(job_id):
            pass
        return self.job(job_id) if last is None else last
