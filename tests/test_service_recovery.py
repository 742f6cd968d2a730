"""kill -9 of the server mid-job, then a restart: the job is marked interrupted and resumes from the
parts on disk; the catalog is as the last complete batch left it. Jobs of two lanes (a model pass and a
catalog job) run side by side, and reads go on while an ingest writes."""

from __future__ import annotations

import json
import time

import pytest

from helpers import curator, write_jsonl
from service_helpers import Server, submit_and_wait, wait_job
from tinylm import TRAINING_TEXT, save_tiny


def test_a_killed_server_resumes_its_job_on_restart(tmp_path):
    ws, root = tmp_path / "ws", tmp_path / "root"
    curator("init", ws)
    write_jsonl(root / "docs.jsonl", [{"text": f"{t} {i}"} for i in range(40) for t in TRAINING_TEXT[:3]])
    save_tiny(root / "tiny", seed=1)
    curator("queries", "generate", "--task", "arithmetic", "--n", "2", "-w", ws)
    curator("queries", "generate", "--task", "arithmetic", "--n", "2", "--seed", "5", "-w", ws)
    write_jsonl(root / "big.jsonl", [{"text": f"line {i} of a long file " * 10} for i in range(100_000)])
    token = curator("token", "create", "--scope", "write", "-w", ws).stdout.strip()
    server = Server(ws, [root]).start()
    try:
        with server.client(token) as api:
            submit_and_wait(api, {"kind": "ingest", "paths": ["docs.jsonl"], "options": {"source": "s"}})
            submit_and_wait(api, {"kind": "fit", "config": {"model": "tiny", "layers": "last:1", "max_seq_len": 16,
                                                            "max_docs": 20}})
            # Many one-document chunks, each a resumable part.
            job = api.post("/jobs", json={"kind": "score", "config": {"queries": "arithmetic-s0", "chunk_docs": 1,
                                                                      "batch_tokens": 16}}).json()
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
            run_id = final["result"]["run_id"]

            # A second, slow score (the cpu lane) while rank and mix (the catalog lane) run beside it.
            slow = api.post("/jobs", json={"kind": "score", "config": {"queries": "arithmetic-s5", "chunk_docs": 4,
                                                                       "batch_tokens": 16}}).json()
            wait_until(api, slow["id"], lambda j: j["state"] == "running" and (j["progress"] or {}).get("done", 0) > 0)
            follower = api.post("/jobs", json={"kind": "audit"}).json()     # by default it waits for the score
            assert follower["after"] == [slow["id"]]
            ranked = submit_and_wait(api, {"kind": "rank", "config": {"name": "r", "run": run_id}, "after": []})
            submit_and_wait(api, {"kind": "mix", "spec": {"name": "m", "ranking": "r", "budget_tokens": 100},
                                  "after": []})
            slow = wait_job(api, slow["id"])
            assert slow["state"] == "done", slow
            # Rank started while the score ran (in one queue it would have waited for the score to end),
            # ahead of the audit queued before it in its lane, which waited for the score.
            assert slow["started_at"] < ranked["started_at"] < slow["finished_at"], (slow, ranked)
            follower = wait_job(api, follower["id"])
            assert follower["state"] == "done" and follower["started_at"] >= slow["finished_at"], follower

            # An ingest killed mid-way with the server: reads answer while it writes, and it resumes.
            big = api.post("/jobs", json={"kind": "ingest", "paths": ["big.jsonl"],
                                          "options": {"source": "big", "chunk_docs": 5000}}).json()
            wait_until(api, big["id"], lambda j: j["state"] == "running")
            reads = []
            while (current := api.get(f"/jobs/{big['id']}").json())["state"] == "running":
                reads.append(api.get("/sources").status_code)
                if (current["progress"] or {}).get("done", 0) > 0 and len(reads) >= 3:
                    break
            assert current["state"] == "running" and set(reads) == {200}, (current, reads)
        server.kill()
        server = Server(ws, [root]).start()
        with server.client(token) as api:
            final = wait_job(api, big["id"])
            assert final["state"] == "done" and final["attempts"] == 2, final
            assert final["result"]["inserted"] == 100_000
    finally:
        server.stop()
    runs = json.loads(curator("runs", "-o", "json", "-w", ws).stdout)
    assert len(runs) == 2 and {r["documents"] for r in runs} == {120}
    sources = {s["source"]: s["documents"] for s in json.loads(curator("sources", "-o", "json", "-w", ws).stdout)}
    assert sources == {"s": 120, "big": 100_000}
    assert_equals_an_uninterrupted_run(ws, run_id, tmp_path / "uninterrupted")


def assert_equals_an_uninterrupted_run(ws_path, run_id: str, out) -> None:
    """The scores of the run that was killed and resumed equal one scoring of the same documents in one go
    (through the library, in this process; chunked differently, so equal to float tolerance)."""
    import polars as pl

    from curator.catalog.database import Catalog
    from curator.catalog.records import get_run, score_files
    from curator.catalog.workspace import Workspace
    from curator.influence.score import ScoreConfig, score

    ws = Workspace(ws_path)
    with Catalog.open(ws) as catalog:
        run = get_run(catalog, run_id)
        ids = [row[0] for row in catalog.sql("SELECT id FROM documents WHERE source = 's'")]
    score(ws, ScoreConfig(queries="arithmetic-s0", batch_tokens=16), out=out, doc_ids=ids, record=False)
    resumed, once = (pl.read_parquet(score_files(path)).sort("query_id", "doc_id") for path in (run.out_path, out))
    assert resumed.height == once.height == 2 * 120
    assert resumed["doc_id"].to_list() == once["doc_id"].to_list()
    assert resumed["score"].to_numpy() == pytest.approx(once["score"].to_numpy(), rel=1e-4, abs=1e-6)


def wait_until(api, job_id: str, condition, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if condition(job):
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never met the condition: {api.get(f'/jobs/{job_id}').json()}")
