"""Jobs: queues by lane, one worker process per lane at a time, progress in memory, state in the catalog.

Lanes: a model or index job waits for its device ('cpu', 'cuda'); ingest, rank, mix, export and audit
share the catalog lane. So a mixture is built while a GPU scores, and a CPU machine runs one model job
and one catalog job side by side. Jobs of different lanes take turns at the catalog: a model pass opens
it for each chunk of documents (Catalog.open(hold=False)), an ingest for each chunk it writes, and the
final records are one short write each; every worker waits its turn (CURATOR_LOCK_WAIT).

Persistence. A job's row is written at each change of state (never for progress). While a worker
holds the catalog (its pass reads it from start to end) the server cannot write, so every row is
first written to a journal file WS/server/jobs/ID.json (atomic, no lock needed) and then flushed into
the catalog's `jobs` table as soon as the catalog is free. On start the journal is read over the
table, so a server killed at any moment finds every job it accepted.
"""

from __future__ import annotations

import json
import multiprocessing
import secrets
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from curator.artifacts import write_text_atomic
from curator.service.db import ServerCatalog
from curator.service.errors import ApiError
from curator.service.models import FINAL_STATES, RESUMABLE, JobRecord, Progress, lane_of

CANCEL_GRACE_S = 5.0
LOG_TAIL_BYTES = 64 << 10


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class JobManager:
    def __init__(self, catalog: ServerCatalog):
        self.catalog = catalog
        self.ws = catalog.ws
        self.folder = self.ws.root / "server" / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, JobRecord] = {}
        self.versions: dict[str, int] = {}          # bumped at every change; the SSE stream watches it
        self.queues: dict[str, deque[str]] = {}        # lane → queued job ids, in order
        self.dirty: set[str] = set()
        self.cond = threading.Condition()
        self.running: dict[str, tuple[str, multiprocessing.Process]] = {}     # lane → (job id, worker)
        self.cancelling: set[str] = set()
        self.stopping = False
        self.threads: list[threading.Thread] = []
        catalog.busy_reason = self.busy_reason

    # -- starting and stopping -------------------------------------------------------------
    def start(self) -> list[str]:
        """Load jobs (catalog, then journal), mark the ones a dead server left running as interrupted and
        queue those that can resume; returns what was done, for the server's log."""
        notes = []
        rows = self.catalog.read(lambda c: c.sql(
            "SELECT id, kind, state, params, device, attempts, progress, result, error, submitted_at, started_at, "
            "finished_at, coalesce(after_jobs, '[]') FROM jobs ORDER BY submitted_at"))
        names = ("id", "kind", "state", "params", "device", "attempts", "progress", "result", "error",
                 "submitted_at", "started_at", "finished_at", "after")
        for row in rows:
            record = dict(zip(names, row, strict=True))
            for key in ("params", "progress", "result", "after"):
                record[key] = json.loads(record[key]) if record[key] is not None else None
            self.jobs[record["id"]] = JobRecord(**record)
        for path in sorted(self.folder.glob("*.json")):
            job = JobRecord.model_validate_json(path.read_text())
            if self.jobs.get(job.id) != job:
                self.jobs[job.id] = job
                self.dirty.add(job.id)
        with self.cond:         # lane runners start as their first job is queued
            for job in sorted(self.jobs.values(), key=lambda j: j.submitted_at):
                if job.state == "running":
                    self._update(job, state="interrupted", finished_at=_now(),
                                 error="the server stopped while this job ran")
                    notes.append(f"job {job.id} ({job.kind}) was interrupted")
                    if job.kind in RESUMABLE:
                        self._update(job, state="queued", error=None, finished_at=None)
                        self._log(job.id, "interrupted: the server stopped while this job ran; resuming")
                        self._enqueue(job)
                        notes.append(f"job {job.id} ({job.kind}) resumes where it stopped")
                elif job.state == "queued":
                    self._enqueue(job)
        self.flush()
        thread = threading.Thread(target=self._flush_loop, daemon=True)
        thread.start()
        self.threads.append(thread)
        return notes

    def stop(self) -> None:
        """On a clean shutdown the running job's worker is stopped and the job left as a killed server
        leaves it: the next start marks it interrupted and resumes it if its stage can."""
        with self.cond:
            self.stopping = True
            running = [process for _, process in self.running.values()]
            self.cond.notify_all()
        for process in running:
            process.terminate()
        for process in running:
            process.join(CANCEL_GRACE_S)
            if process.is_alive():
                process.kill()
        for thread in list(self.threads):
            thread.join(timeout=CANCEL_GRACE_S + 5)
        self.flush()

    # -- the API's operations --------------------------------------------------------------
    def submit(self, kind: str, params: dict, device: str, after: list[str] | None = None) -> JobRecord:
        """Queue a job behind `after` (default: every job that has not ended). The same job (kind and
        parameters, whatever the device) while one is queued or running is refused: both would write
        the same artifact."""
        with self.cond:
            unfinished = [j for j in sorted(self.jobs.values(), key=lambda j: j.submitted_at)
                          if j.state not in FINAL_STATES]
            for other in unfinished:
                if other.kind == kind and _same_work(other.params, params):
                    raise ApiError(409, "body", f"the same {kind} job is already {other.state}: {other.id}")
            if after is None:
                after = [j.id for j in unfinished]
            for number, job_id in enumerate(after):
                if job_id not in self.jobs:
                    raise ApiError(422, f"body.after.{number}", f"no job {job_id!r} to wait for")
            job = JobRecord(id=f"job-{time.strftime('%Y%m%d')}-{secrets.token_hex(4)}", kind=kind, state="queued",
                            params=params, device=device, after=list(dict.fromkeys(after)), submitted_at=_now())
            self.jobs[job.id] = job
            self._save(job)
            self._enqueue(job)
        return job

    def _enqueue(self, job: JobRecord) -> None:
        """Queue a job in its lane, starting the lane's runner the first time (call under self.cond,
        or before the manager runs)."""
        lane = lane_of(job.kind, job.device)
        if lane not in self.queues:
            self.queues[lane] = deque()
            thread = threading.Thread(target=self._run_loop, args=(lane,), name=f"curator-jobs-{lane}", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.queues[lane].append(job.id)
        self.cond.notify_all()

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "job_id", f"no job {job_id!r}")
        return job

    def snapshot(self, job_id: str) -> tuple[JobRecord, int]:
        with self.cond:
            return self.get(job_id), self.versions.get(job_id, 0)

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> JobRecord:
        with self.cond:
            job = self.get(job_id)
            if job.state in FINAL_STATES:
                raise ApiError(409, "job_id", f"job {job_id} has already ended ({job.state})")
            if job.state == "queued":
                self.queues[lane_of(job.kind, job.device)].remove(job_id)
                self._update(job, state="cancelled", finished_at=_now(), error=reason)
                return self.jobs[job_id]
            self.cancelling.add(job_id)
            process = next((p for running, p in self.running.values() if running == job_id), None)
        if process is not None:
            # SIGTERM ends the library call at once; every stage leaves only *.part files and
            # uncommitted batches behind, which the next run cleans up.
            process.terminate()
            process.join(CANCEL_GRACE_S)
            if process.is_alive():
                process.kill()
        self._log(job_id, f"cancelled: {reason}")
        return self.jobs[job_id]

    def log_path(self, job_id: str) -> Path:
        return self.ws.root / "server" / "logs" / f"{job_id}.log"

    def log_tail(self, job_id: str) -> str:
        self.get(job_id)
        path = self.log_path(job_id)
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")

    def busy_reason(self) -> str:
        running = sorted(job_id for job_id, _ in self.running.values())
        return f"job {', '.join(running)} is writing it" if running else "another process is writing it"

    # -- the runner ------------------------------------------------------------------------
    def _ready(self, job_id: str) -> bool:
        """Whether every job this one follows has ended (a job unknown here, e.g. dropped, does not hold it)."""
        return all(self.jobs[other].state in FINAL_STATES for other in self.jobs[job_id].after if other in self.jobs)

    def _run_loop(self, lane: str) -> None:
        queue = self.queues[lane]
        while True:
            with self.cond:
                # The lane's first job whose predecessors have all ended (one waiting for a job of
                # another lane lets a later, independent one go first).
                while not self.stopping and (job_id := next((j for j in queue if self._ready(j)), None)) is None:
                    self.cond.wait()
                if self.stopping:
                    return
                queue.remove(job_id)
                job = self.jobs[job_id]
                self._update(job, state="running", started_at=_now(), attempts=job.attempts + 1,
                             progress=Progress(stage="starting"), error=None)
            self.flush()            # the row says "running" before the worker can take the catalog
            self._run(job_id, lane)
            self.flush()

    def _run(self, job_id: str, lane: str) -> None:
        from curator.service import worker

        job = self.jobs[job_id]
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        log = self.log_path(job_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        process = context.Process(target=worker.main, name=f"curator-{job_id}", daemon=True,
                                  args=(str(self.ws.root), job.kind, job.params, send, str(log), job.attempts))
        with self.cond:
            if job_id in self.cancelling:
                self._finish(job_id, "cancelled", error="cancelled by request")
                return
            process.start()
            self.running[lane] = (job_id, process)
        send.close()
        outcome: tuple[str, object] | None = None
        while True:
            try:
                if receive.poll(0.2):
                    message = receive.recv()
                    if message[0] == "progress":
                        with self.cond:
                            self._update(self.jobs[job_id], persist=False, progress=Progress(**message[1]))
                    else:
                        outcome = message
                elif not process.is_alive():
                    break
            except (EOFError, OSError):
                break
        process.join()
        with self.cond:
            del self.running[lane]
            if self.stopping and job_id not in self.cancelling:
                return      # left "running": the next start resumes it, as after a kill
            if job_id in self.cancelling:
                self.cancelling.discard(job_id)
                self._finish(job_id, "cancelled", error="cancelled by request")
            elif outcome and outcome[0] == "result":
                self._finish(job_id, "done", result=json.loads(json.dumps(outcome[1], default=str)))
            elif outcome:
                self._finish(job_id, "failed", error=str(outcome[1]))
            else:
                self._finish(job_id, "failed", error=f"the worker process died (exit code {process.exitcode}); "
                                                     f"see the job's log")

    def _finish(self, job_id: str, state: str, **changes) -> None:
        self._update(self.jobs[job_id], state=state, finished_at=_now(), **changes)

    # -- records ---------------------------------------------------------------------------
    def _update(self, job: JobRecord, persist: bool = True, **changes) -> None:
        """Change a job's record (under self.cond); an ending wakes the lanes whose jobs may wait for it."""
        job = job.model_copy(update=changes)
        self.jobs[job.id] = job
        self.versions[job.id] = self.versions.get(job.id, 0) + 1
        if persist:
            self._save(job)
        if job.state in FINAL_STATES:
            self.cond.notify_all()

    def _save(self, job: JobRecord) -> None:
        write_text_atomic(self.folder / f"{job.id}.json", job.model_dump_json())
        self.dirty.add(job.id)
        self.versions[job.id] = self.versions.get(job.id, 0) + 1

    def _log(self, job_id: str, line: str) -> None:
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")

    def flush(self) -> bool:
        """Write journaled rows into the catalog if it is free now; True when nothing is left."""
        with self.cond:
            rows = [self.jobs[i] for i in self.dirty]
        if not rows:
            return True

        def upsert(catalog) -> None:
            catalog.sql("BEGIN")
            for job in rows:
                catalog.sql(
                    "INSERT OR REPLACE INTO jobs (id, kind, state, params, device, attempts, progress, result, "
                    "error, submitted_at, started_at, finished_at, after_jobs) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [job.id, job.kind, job.state, json.dumps(job.params),
                     job.device, job.attempts, job.progress.model_dump_json() if job.progress else None,
                     json.dumps(job.result) if job.result is not None else None, job.error, job.submitted_at,
                     job.started_at, job.finished_at, json.dumps(job.after)])
            catalog.sql("COMMIT")

        done, _ = self.catalog.try_write(upsert)
        if done:
            with self.cond:
                for job in rows:
                    if self.jobs[job.id] == job:
                        self.dirty.discard(job.id)
        return done and not self.dirty

    def _flush_loop(self) -> None:
        while not self.stopping:
            time.sleep(1.0)
            if self.dirty:
                self.flush()


def _same_work(a: dict, b: dict) -> bool:
    """Whether two jobs' parameters describe the same work: equal but for the device they run on."""
    def without_device(params: dict) -> dict:
        config = params.get("config")
        if isinstance(config, dict):
            return {**params, "config": {k: v for k, v in config.items() if k != "device"}}
        return params
    return without_device(a) == without_device(b)
