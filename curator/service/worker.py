"""A job's worker process: runs one library call and reports over a pipe.

Started with multiprocessing's spawn method, so it shares nothing with the server but the pipe: a crash
(a CUDA fault, an out-of-memory kill) ends the job, not the server. It dies with the server too
(PR_SET_PDEATHSIG, and a watchdog where that is missing), so a restarted server never finds an old
worker still holding the catalog. Its stdout and stderr go to the job's log file.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path

from curator.catalog.database import LOCK_WAIT_ENV
from curator.service.models import report_paths

SEND_EVERY_S = 0.25
# A worker waits as long as it takes for the catalog: a job in another lane may read it for minutes
# (an audit, an export), and failing a finished pass at its final write would throw the pass away.
# A wait that lasts is said in the job's log, and the job can be cancelled.
WORKER_LOCK_WAIT_S = str(24 * 3600)


class PipeProgress:
    """curator.model.document_pass.PassProgress (documents) and the ingest and export progress
    callbacks (bytes, documents), sent to the server at most every SEND_EVERY_S seconds."""

    def __init__(self, conn):
        self.conn = conn
        self.last_sent = 0.0
        self.state = {"stage": "", "unit": "documents", "done": 0, "total": None, "rate": 0.0,
                      "tokens_per_second": None}
        self.started = time.perf_counter()
        self.tokens = 0

    def _send(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last_sent >= SEND_EVERY_S:
            elapsed = max(now - self.started, 1e-9)
            self.state["rate"] = self.state["done"] / elapsed
            if self.tokens:
                self.state["tokens_per_second"] = self.tokens / elapsed
            self.conn.send(("progress", dict(self.state)))
            self.last_sent = now

    def flush(self) -> None:
        self._send(force=True)

    def begin(self, stage: str, total: int | None, unit: str) -> None:
        self.state.update(stage=stage, unit=unit, done=0, total=total, rate=0.0, tokens_per_second=None)
        self.started, self.tokens = time.perf_counter(), 0
        self._send(force=True)

    # PassProgress
    def stage(self, description: str, total_docs: int) -> None:
        self.begin(description, total_docs, "documents")

    def advance(self, docs: int, tokens: int) -> None:
        self.state["done"] += docs
        self.tokens += tokens
        self._send()

    # curator.catalog.ingest.IngestProgress
    def start(self, total_bytes: int, files: int) -> None:
        self.begin(f"reading {files} file{'s' * (files != 1)}", total_bytes, "bytes")

    def update(self, records: int, bytes_done: int) -> None:
        self.state["done"] = bytes_done
        self._send()

    # export's progress(done, total)
    def __call__(self, done: int, total: int) -> None:
        if self.state["stage"] != "exporting":
            self.begin("exporting", total, "documents")
        self.state.update(done=done, total=total)
        self._send()


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(root: str, kind: str, params: dict, conn, log_path: str, attempt: int = 1) -> None:
    """The process's entry point: run the job and send ("result", dict) or ("error", message)."""
    _die_with_parent()
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ[LOCK_WAIT_ENV] = WORKER_LOCK_WAIT_S
    print(f"[{time.strftime('%H:%M:%S')}] {kind} started in worker pid {os.getpid()}", flush=True)
    try:
        from curator.catalog.workspace import Workspace
        from curator.errors import CuratorError

        progress = PipeProgress(conn)
        try:
            ws = Workspace(Path(root))
            if attempt > 1 and _left_by_earlier_attempt(ws, kind, params):
                # The interrupted attempt wrote this very result before the server died: running it
                # again replaces it with the same thing instead of refusing an existing name.
                print(f"attempt {attempt}: an earlier attempt of this job finished its write; redoing it",
                      flush=True)
                params = {**params, "replace": True, "force": True}
            result = run(ws, kind, params, progress)
        except CuratorError as exc:
            print(f"error: {exc}", flush=True)
            conn.send(("error", str(exc)))
            return
        print(f"[{time.strftime('%H:%M:%S')}] {kind} done", flush=True)
        progress.flush()        # the last advance may have been held back by the rate limit
        conn.send(("result", result))
    except BaseException as exc:    # a bug: the traceback goes to the log, a one-line error to the client
        traceback.print_exc()
        conn.send(("error", f"internal error ({type(exc).__name__}: {exc}); see the job's log"))
    finally:
        log.flush()


def _left_by_earlier_attempt(ws, kind: str, params: dict) -> bool:
    """Whether the catalog or the export folder already holds what this rank, mix or export job makes,
    with the same recipe (only an earlier attempt of it, or an identical job, could have put it there)."""
    import json

    from curator.catalog.database import Catalog

    if kind == "rank":
        from curator.curate.rank import RankConfig

        config = RankConfig(**params["config"])
        with Catalog.open(ws) as catalog:
            row = catalog.one("SELECT run_id, tasks, aggregate, normalize FROM rankings WHERE name = ?", [config.name])
        return row is not None and (config.run is None or row[0].startswith(config.run)) and (
            json.loads(row[1]), row[2], row[3]) == (config.tasks, config.aggregate, config.normalize)
    if kind == "mix":
        from curator.curate.mix import MixSpec

        spec = MixSpec(**params["spec"])
        with Catalog.open(ws) as catalog:
            row = catalog.one("SELECT spec FROM mixtures WHERE name = ?", [spec.name])
        return row is not None and MixSpec.model_validate_json(row[0]) == spec
    if kind == "export":
        from curator.curate.export import MANIFEST, not_an_export

        out = Path(params["out"]).expanduser().resolve()
        if not out.is_dir() or not_an_export(out):
            return False
        manifest = json.loads((out / MANIFEST).read_text())
        return (manifest["mixture"].get("name"), manifest["format"]) == (params["mixture"],
                                                                         params.get("format", "parquet"))
    return False


def run(ws, kind: str, params: dict, progress: PipeProgress):
    """Call the library function the CLI calls for this kind; return its result as JSON data."""
    if kind == "ingest":
        from curator.catalog.ingest import IngestOptions, ingest

        return ingest(ws, params["paths"], IngestOptions(**params["options"]), progress).model_dump(mode="json")
    if kind == "fit":
        from curator.influence.fit import FitConfig, fit

        return fit(ws, FitConfig(**params["config"]), progress=progress,
                   force=params.get("force", False)).model_dump(mode="json")
    if kind == "score":
        from curator.influence.score import ScoreConfig, score
        from curator.sketch.scoring import sketch_score

        config = ScoreConfig(**params["config"])
        scorer = sketch_score if config.method == "sketch" else score
        return scorer(ws, config, progress=progress, force=params.get("force", False)).model_dump(mode="json")
    if kind == "sketch":
        from curator.sketch.fidelity import sketch_and_measure
        from curator.sketch.store import SketchConfig

        store, fidelity = sketch_and_measure(ws, SketchConfig(**params["config"]), holdout=params.get("holdout"),
                                             sample=params.get("fidelity_sample", 200), progress=progress,
                                             force=params.get("force", False))
        return {"store": store.model_dump(mode="json"), "fidelity": fidelity}
    if kind == "index":
        from curator.sketch.index import build_index

        progress.begin("building the index", None, "documents")
        return build_index(ws, params.get("store"), params.get("factory", "auto"), params.get("name"),
                           rescore=params.get("rescore"), nprobe=params.get("nprobe"),
                           ef_search=params.get("ef_search"), retrain=params.get("retrain", False))
    if kind == "rank":
        from curator.curate.rank import RankConfig, rank

        progress.begin("ranking", None, "documents")
        return rank(ws, RankConfig(**params["config"]), replace=params.get("replace", False)).model_dump(mode="json")
    if kind == "mix":
        from curator.curate.mix import MixSpec, mix

        progress.begin("mixing", None, "documents")
        return mix(ws, MixSpec(**params["spec"]), replace=params.get("replace", False)).model_dump(mode="json")
    if kind == "export":
        from curator.curate.export import ExportSpec, export

        spec = ExportSpec(mixture=params["mixture"], format=params.get("format", "parquet"), out=Path(params["out"]),
                          shard_tokens=params.get("shard_tokens"), shard_bytes=params.get("shard_bytes"),
                          tokenizer=params.get("tokenizer"))
        return export(ws, spec, force=params.get("force", False), progress=progress).model_dump(mode="json")
    if kind == "audit":
        from curator.audit.audit import audit
        from curator.audit.report import write_report

        progress.begin("auditing", None, "documents")
        data = audit(ws, params.get("run"))
        html, data_json = report_paths(ws.root)
        write_report(data, html, data_json)
        return {"report": str(html), "json": str(data_json), "run": (data.get("run") or {}).get("id")}
    raise ValueError(f"unknown job kind {kind!r}")
