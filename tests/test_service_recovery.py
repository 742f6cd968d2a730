"""kill -9 of the server mid-job, then a restart: the job is marked interrupted and resumes from the
parts on disk; the catalog is as the last complete batch left it."""

from __future__ import annotations

import json
import time

from helpers import curator, write_jsonl
from service_helpers import Server, submit_and_wait, wait_job
from tinylm import TRAINING_TEXT, save_tiny


def test_a_killed_server_resumes_its_job_on_restart(tmp_path):
    ws, root = tmp_path / "ws", tmp_path / "root"
    curator("init", ws)
    write_jsonl(root / "docs.jsonl", [{"text": f"{t} {i}"} for i in range(40) for t in TRAINING_TEXT[:3]])
    save_tiny(root / "tiny", seed=1)
    curator("queries", "generate", "--task", "arithmetic", "--n", "2", "-w", ws)
    token = curator("token", "create", "--scope", "write", "-w", ws).stdout.strip()
    server = Server(ws, [root]).start()
    try:
        with server.client(token) as api:
            submit_and_wait(api, {"kind": "ingest", "paths": ["docs.jsonl"], "options": {"source": "s"}})
            submit_and_wait(api, {"kind": "fit", "config": {"model": "tiny", "layers": "last:1", "max_seq_len": 16,
                                                            "max_docs": 20}})
            # Many one-document chunks, each a resumable part.
            job = api.post("/jobs", json={"kind": "score", "config": {"chunk_docs": 1, "batch_tokens": 16}}).json()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                progress = api.get(f"/jobs/{job['id']}").json()["progress"] or {}
                if progress.get("stage", "").startswith("scor") or progress.get("done", 0) >= 10:
                    if progress.get("done", 0) >= 10:
                        break
                time.sleep(0.05)
            assert 0 < progress["done"] < progress["total"], progress
        server.kill()
        journal = json.loads((ws / "server" / "jobs" / f"{job['id']}.json").read_text())
        assert journal["state"] == "running"
        assert (ws / "scores").exists()

        server = Server(ws, [root]).start()
        with server.client(token) as api:
            final = wait_job(api, job["id"])
            assert final["state"] == "done" and final["attempts"] == 2, final
            assert "interrupted" in api.get(f"/jobs/{job['id']}/log").text
            stats = final["result"]["stats"]
            assert stats["documents"] == 120
    finally:
        server.stop()
    runs = json.loads(curator("runs", "-o", "json", "-w", ws).stdout)
    assert len(runs) == 1 and runs[0]["documents"] == 120
    sources = json.loads(curator("sources", "-o", "json", "-w", ws).stdout)
    assert sources[0]["documents"] == 120
