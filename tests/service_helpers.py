"""A real `curator serve` in a subprocess on a free loopback port, and an httpx client for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ws: Path, roots: list[Path], port: int | None = None):
        self.ws, self.roots, self.port = ws, roots, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = ws.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 60.0) -> "Server":
        args = [sys.executable, "-m", "curator", "serve", "-w", str(self.ws), "--port", str(self.port)]
        for root in self.roots:
            args += ["--root", str(root)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CURATOR_SERVER", None)
        self.process = subprocess.Popen(args, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not come up: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.url}/v1", headers=headers, timeout=120)


def wait_job(api: httpx.Client, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled", "interrupted"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {api.get(f'/jobs/{job_id}').json()}")


def submit_and_wait(api: httpx.Client, request: dict, timeout: float = 180.0) -> dict:
    response = api.post("/jobs", json=request)
    assert response.status_code == 202, response.text
    job = wait_job(api, response.json()["id"], timeout)
    assert job["state"] == "done", (job, api.get(f"/jobs/{job['id']}/log").text)
    return job
