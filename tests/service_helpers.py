"""A real `curator serve` in a subprocess on a free loopback port, and an httpx client for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
from helpers import write_jsonl
from tinylm import TRAINING_TEXT, save_tiny


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


def build_workspace(base: Path):
    """Two sources, then fit → score → sketch → index → rank → mix → export → audit on the tiny model."""
    from curator.catalog.database import create_workspace
    from curator.catalog.queries import add_queries
    from curator.catalog.querygen import generate
    from curator.service.worker import PipeProgress, run

    root = base / "root"
    ws, _ = create_workspace(base / "ws")
    write_jsonl(root / "corpus" / "docs.jsonl", [{"text": t * k} for t in TRAINING_TEXT for k in (1, 3)])
    write_jsonl(root / "code" / "docs.jsonl", [{"text": t * 2} for t in TRAINING_TEXT[:3]])
    save_tiny(root / "tiny", seed=2)
    add_queries(ws, generate("arithmetic", 3, 0, "paper"))
    add_queries(ws, generate("arithmetic", 2, 9, "paper"))
    progress = PipeProgress(types.SimpleNamespace(send=lambda message: None))      # progress goes nowhere
    for kind, params in [
        ("ingest", {"paths": [str(root / "corpus")], "options": {"source": "mixed"}}),
        ("ingest", {"paths": [str(root / "code")], "options": {"source": "code"}}),
        ("fit", {"config": {"model": str(root / "tiny"), "layers": "last:1", "max_seq_len": 32}}),
        ("score", {"config": {"queries": "arithmetic-s0"}}),
        ("sketch", {"config": {"suite": "arithmetic-s0", "rank": 4}, "holdout": "arithmetic-s9",
                    "fidelity_sample": 12}),
        ("index", {"factory": "Flat"}),
        ("rank", {"config": {"name": "reasoning", "tasks": ["arithmetic"]}}),
        ("mix", {"spec": {"name": "m1", "ranking": "reasoning", "budget_tokens": 200}}),
        ("export", {"mixture": "m1", "out": str(ws.root / "exports" / "m1")}),
        ("audit", {}),
    ]:
        run(ws, kind, params, progress)
    return ws, root
