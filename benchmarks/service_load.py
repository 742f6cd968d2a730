"""`curator serve` under load: concurrent searches with SmolLM2-135M, with and without a scoring job.

    python benchmarks/service_load.py [--clients 16] [--duration 60] [--docs-per-source 24]
        [--record docs/benchmarks.md]
    python benchmarks/service_load.py --clients 4 --duration 10        # a quick run

A small real workspace is built first, through the library: the demo corpus (four sources), a fit of
the last two MLPs on a seeded sample, a rank-16 sketch store over every document and a Flat index.
Every request is a new query (a generated prompt + completion, none repeated within a phase), sent
by `--clients` threads, each with its own httpx client, for `--duration` seconds. Phases, in order:

- library: the same searches from the same number of threads, in this process, through the server's
  own `Searcher` (what the route calls: cached model, index and query frame); the baseline for the
  HTTP overhead, at the same concurrency, before the server starts;
- library, 1 client, and HTTP, 1 client: one request at a time, the overhead without queueing;
- HTTP: a real `curator serve` on a loopback port;
- HTTP + score: the same while a `score` job (submitted through the API, resubmitted with `force`
  whenever one ends) runs in the server's worker process.

Searches are serialised in the server (one shared model), so latency under load is mostly queueing:
p50 ≈ clients × service time. Reported per phase: requests, requests/s, p50/p95/p99 latency, errors
(any non-200 or transport failure), and the 1-minute load average before and after (the machine may be
shared).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recording import record_section  # noqa: E402

TASKS = ("arithmetic", "slope", "linear")
SUITE = "arithmetic-s0,slope-s0,linear-s0"


# -- the workspace ---------------------------------------------------------------------------------

def build_workspace(base: Path, args) -> Path:
    """Demo corpus → fit → sketch → index, in this process, with one loaded SmolLM2."""
    from curator.catalog.database import Catalog, create_workspace
    from curator.catalog.ingest import IngestOptions, ingest
    from curator.catalog.queries import store_queries
    from curator.catalog.querygen import generate
    from curator.demo import DemoSettings, build_demo_corpus
    from curator.influence.fit import FitConfig, fit
    from curator.model.loading import load_model
    from curator.sketch.build import sketch
    from curator.sketch.index import build_index
    from curator.sketch.store import SketchConfig

    ws, _ = create_workspace(base / "ws")
    corpus = build_demo_corpus(base / "corpus", DemoSettings(docs_per_source=args.docs_per_source,
                                                              max_chars=args.max_chars))
    for source in corpus.sources:
        ingest(ws, source.paths, IngestOptions(source=source.name, kind=source.kind, glob=source.glob))
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, [q for task in TASKS for q in generate(task, args.suite_per_task, seed=0)])
    lm = load_model(args.model)
    fit(ws, FitConfig(model=args.model, layers=args.layers, max_seq_len=args.max_seq_len, max_docs=args.fit_docs,
                      batch_tokens=2048), loaded=lm)
    sketch(ws, SketchConfig(suite=SUITE, rank=args.rank, batch_tokens=2048), loaded=lm)
    build_index(ws, factory="Flat")
    return ws.root


def query_pool(n: int) -> list[dict]:
    """n distinct prompt + completion pairs: the three tasks in every family of formats, new seeds."""
    from curator.catalog.querygen import FAMILIES, generate

    per = -(-n // (len(TASKS) * len(FAMILIES)))
    made = [q for task in TASKS for family in FAMILIES for q in generate(task, per, seed=1000, family=family)]
    unique = {(q.prompt, q.completion): q for q in made}
    return [{"prompt": p, "completion": c, "top": 10, "bottom": 5} for p, c in unique][:n]


# -- load ------------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    note: str = ""

    def row(self) -> list[str]:
        ms = np.percentile(np.asarray(self.latencies) * 1000, [50, 95, 99]) if self.latencies else [np.nan] * 3
        done = len(self.latencies) + len(self.errors)
        return [self.name, str(self.clients), f"{done:,}", f"{len(self.latencies) / self.seconds:.2f}",
                *(f"{v:,.0f}" for v in ms), str(len(self.errors)), f"{self.load[0]:.2f} → {self.load[1]:.2f}"]


HEADER = ["phase", "clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "load avg (1 min)"]


def run_phase(name: str, clients: int, duration: float, pool: list[dict], make_worker) -> Phase:
    """`clients` threads, each calling its `search(body)` (from make_worker()) on the next query of the
    pool until `duration` has passed. A search returns None, or an error message."""
    phase = Phase(name, clients)
    order = itertools.count()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def client() -> None:
        search, close = make_worker()
        try:
            while time.monotonic() < stop_at:
                with lock:
                    body = pool[next(order) % len(pool)]
                start = time.perf_counter()
                problem = search(body)
                took = time.perf_counter() - start
                with lock:
                    (phase.errors.append(problem) if problem else phase.latencies.append(took))
        finally:
            close()

    phase.load = (os.getloadavg()[0], 0.0)
    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.seconds = time.monotonic() - started
    phase.load = (phase.load[0], os.getloadavg()[0])
    if next(order) > len(pool):
        phase.note = f"the pool of {len(pool)} queries was reused"
    return phase


def library_worker(searcher):
    from curator.sketch.search import SearchRequest

    def search(body: dict) -> str | None:
        try:
            searcher.search(SearchRequest(**body))
        except Exception as exc:        # noqa: BLE001 - counted as an error, like a 500
            return f"{type(exc).__name__}: {exc}"
        return None
    return lambda: (search, lambda: None)


def http_worker(url: str, token: str):
    import httpx

    def make():
        http = httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120)

        def search(body: dict) -> str | None:
            try:
                response = http.post("/search", json=body)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            return None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
        return search, http.close
    return make


# -- the server and the scoring job ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "curator", "serve", "-w", str(ws), "--port", str(port)],
                               stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the server did not come up: {log.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ScoringJobs:
    """Keeps a `score` job running (a new one with `force` whenever the last ends) until stopped."""

    def __init__(self, url: str, token: str):
        import httpx

        self.http = httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.stop = threading.Event()
        self.jobs: list[dict] = []
        self.thread = threading.Thread(target=self._loop)

    def _loop(self) -> None:
        while not self.stop.is_set():
            response = self.http.post("/jobs", json={"kind": "score", "force": True,
                                                     "config": {"queries": SUITE, "batch_tokens": 2048}})
            if response.status_code != 202:
                raise RuntimeError(f"the score job was refused: {response.text}")
            job = response.json()
            self.jobs.append(job)
            while not self.stop.wait(0.5):
                job = self.http.get(f"/jobs/{job['id']}").json()
                if job["state"] not in ("queued", "running"):
                    self.jobs[-1] = job
                    break

    def __enter__(self) -> ScoringJobs:
        self.thread.start()
        # Measure only once the worker is scoring (not while it starts and loads the model).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.jobs and (self.http.get(f"/jobs/{self.jobs[-1]['id']}").json().get("progress") or {}).get("done"):
                return self
            time.sleep(0.5)
        raise RuntimeError("the score job did not start scoring within 2 minutes")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        last = self.jobs[-1]
        if self.http.get(f"/jobs/{last['id']}").json()["state"] in ("queued", "running"):
            self.http.post(f"/jobs/{last['id']}/cancel")
        self.http.close()

    def summary(self) -> str:
        states = [j.get("state", "?") for j in self.jobs]
        return f"{len(self.jobs)} score jobs ({', '.join(states)}; the last cancelled at the end if running)"


# -- main ------------------------------------------------------------------------------------------

def warm(search, pool: list[dict], n: int = 2) -> None:
    for body in pool[-n:]:
        problem = search(body)
        if problem:
            raise RuntimeError(f"the warm-up search failed: {problem}")


def library_phases(ws_root: Path, args, pool: list[dict]) -> list[Phase]:
    from curator.catalog.workspace import Workspace
    from curator.service.db import ServerCatalog
    from curator.service.search import Searcher

    searcher = Searcher(ServerCatalog(Workspace(ws_root)))
    make = library_worker(searcher)
    warm(make()[0], pool)
    return [run_phase("library", args.clients, args.duration, pool, make),
            run_phase("library", 1, args.single_duration, pool, make)]


def http_phases(ws_root: Path, args, pool: list[dict], log: Path) -> tuple[list[Phase], str]:
    from curator.catalog.workspace import Workspace
    from curator.service.auth import create_token

    _, token = create_token(Workspace(ws_root), "write", "load-benchmark")
    process, url = start_server(ws_root, log)
    try:
        make = http_worker(url, token)
        search, close = make()
        warm(search, pool)
        close()
        phases = [run_phase("HTTP", 1, args.single_duration, pool, make),
                  run_phase("HTTP", args.clients, args.duration, pool, make)]
        with ScoringJobs(url, token) as jobs:
            phases.append(run_phase("HTTP + score job", args.clients, args.duration, pool, make))
        return phases, jobs.summary()
    finally:
        stop_server(process)


def overhead(phases: list[Phase], clients: int) -> float:
    def p50(name):
        return float(np.median([p for ph in phases if ph.name == name and ph.clients == clients
                                for p in ph.latencies]))
    return p50("HTTP") / p50("library") - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per loaded phase")
    parser.add_argument("--single-duration", type=float, help="seconds per 1-client phase (default duration / 3)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs-per-source", type=int, default=24)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--fit-docs", type=int, default=48)
    parser.add_argument("--layers", default="last:2")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--suite-per-task", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workspace", type=Path, help="build the workspace here and keep it (reused when it "
                                                            "exists: a quicker rerun); default: a temporary one")
    parser.add_argument("--record", type=Path, help="write the results into this Markdown file (its own section)")
    args = parser.parse_args()
    args.single_duration = args.single_duration or max(5.0, args.duration / 3)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workspace or Path(tmp)
        ws_root = base / "ws" if (base / "ws" / "curator.duckdb").is_file() else build_workspace(base, args)
        built = time.monotonic() - began
        pool = query_pool(4000)
        phases = library_phases(ws_root, args, pool)
        http, jobs = http_phases(ws_root, args, pool, Path(tmp) / "serve.log")
        phases += http
    report(args, phases, jobs, built, time.monotonic() - began)


def report(args, phases: list[Phase], jobs: str, built: float, total: float) -> None:
    from curator.demo import machine_description

    rows = [HEADER, ["---"] * len(HEADER), *(phase.row() for phase in phases)]
    table = ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"HTTP overhead at p50: {overhead(phases, args.clients):+.1%} with {args.clients} clients, "
             f"{overhead(phases, 1):+.1%} with 1 (HTTP p50 / library p50 − 1; target under 10%).",
             f"During the last phase: {jobs}.",
             f"Workspace: {args.model}, demo corpus {args.docs_per_source} documents per source (≤ {args.max_chars} "
             f"chars), fit on {args.fit_docs} documents ({args.layers}, {args.max_seq_len} tokens), rank-{args.rank} "
             f"sketches, Flat index; built in {built:.0f} s. Whole run {total:.0f} s.",
             f"Machine: {machine_description('cpu')}; load average is the 1-minute figure before → after each "
             f"phase (other jobs may share the machine)."]
    notes += [f"{phase.name} ({phase.clients} clients): {phase.note}" for phase in phases if phase.note]
    errors = [f"{phase.name} ({phase.clients}): first error: {phase.errors[0]}" for phase in phases if phase.errors]
    print("\n".join(table + [""] + notes + errors))
    if args.record:
        record_section(args.record, "service-load", "Service under load", "service_load.py",
                       table + [""] + [f"- {line}" for line in notes + errors])


if __name__ == "__main__":
    main()
