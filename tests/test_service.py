"""`curator serve` as a client meets it: a real server on a loopback port, a real catalog, httpx.

One module-wide server runs the pipeline as jobs (ingest, fit, score, sketch, index, rank, mix,
export, audit); the tests then read every route, search, and try the server's defences.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from helpers import curator, write_jsonl
from service_helpers import Server, submit_and_wait, wait_job
from tinylm import TRAINING_TEXT, save_tiny


def _token(ws, scope: str) -> str:
    return curator("token", "create", "--scope", scope, "--name", f"test-{scope}", "-w", ws).stdout.strip()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("service")
    ws, root = base / "ws", base / "root"
    root.mkdir()
    curator("init", ws)
    write_jsonl(root / "corpus" / "docs.jsonl", [{"text": t * k} for t in TRAINING_TEXT for k in (1, 3)])
    save_tiny(root / "tiny", seed=2)
    curator("queries", "generate", "--task", "arithmetic", "--n", "3", "-w", ws)
    curator("queries", "generate", "--task", "arithmetic", "--n", "2", "--seed", "9", "-w", ws)
    server = Server(ws, [root]).start()
    tokens = {"write": _token(ws, "write"), "read": _token(ws, "read")}      # beside the running server
    try:
        yield server, tokens, base
    finally:
        server.stop()


@pytest.fixture(scope="module")
def built(served):
    """The pipeline, each stage a job."""
    server, tokens, base = served
    with server.client(tokens["write"]) as api:
        stages = [
            {"kind": "ingest", "paths": ["corpus"], "options": {"source": "mixed"}},
            {"kind": "fit", "config": {"model": "tiny", "layers": "last:1", "max_seq_len": 32}},
            {"kind": "score", "config": {"queries": "arithmetic-s0"}},
            {"kind": "sketch", "config": {"suite": "arithmetic-s0", "rank": 4}, "holdout": "arithmetic-s9",
             "fidelity_sample": 12},
            {"kind": "index", "factory": "Flat"},
            {"kind": "rank", "config": {"name": "reasoning", "tasks": ["arithmetic"]}},
            {"kind": "mix", "spec": {"name": "m1", "ranking": "reasoning", "budget_tokens": 200}},
            {"kind": "export", "mixture": "m1"},
            {"kind": "audit"},
        ]
        jobs = {stage["kind"]: submit_and_wait(api, stage) for stage in stages}
    return server, tokens, base, jobs


def test_health_needs_no_token_and_openapi_is_served(served):
    server, _, _ = served
    assert httpx.get(f"{server.url}/v1/health").json()["status"] == "ok"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/search" in spec["paths"] and "/v1/jobs/{job_id}/events" in spec["paths"]


def test_every_route_needs_a_valid_token_and_read_tokens_cannot_submit(served):
    server, tokens, _ = served
    for token, status in ((None, 401), ("cur_nope_nope", 401), ("garbage", 401), (tokens["read"], 200)):
        with server.client(token) as api:
            response = api.get("/sources")
            assert response.status_code == status, response.text
            if status == 401:
                assert response.json()["field"] == "Authorization" and "Bearer" in response.headers["www-authenticate"]
    wrong_secret = tokens["read"].rsplit("_", 1)[0] + "_wrong"
    with server.client(wrong_secret) as api:
        assert api.get("/runs").status_code == 401
    with server.client(tokens["read"]) as api:
        refused = api.post("/jobs", json={"kind": "audit"})
        assert refused.status_code == 403 and "read scope" in refused.json()["error"]
        assert api.post("/jobs/job-x/cancel").status_code == 403
    stored = curator("token", "list", "-o", "json", "-w", server.ws).stdout
    assert "test-read" in stored and tokens["read"] not in stored      # only salted hashes are kept


def test_pipeline_jobs_record_results_and_progress(built):
    server, tokens, _, jobs = built
    assert jobs["ingest"]["result"]["inserted"] == 12
    assert jobs["ingest"]["progress"]["unit"] == "bytes" and jobs["ingest"]["progress"]["done"] > 0
    assert jobs["fit"]["result"]["record"]["id"].startswith("fit-")
    assert jobs["fit"]["progress"]["total"] and jobs["fit"]["progress"]["done"] == jobs["fit"]["progress"]["total"]
    assert jobs["score"]["result"]["stats"]["documents"] == 12
    assert jobs["export"]["result"]["manifest"]["documents"] > 0
    with server.client(tokens["read"]) as api:
        listed = api.get("/jobs", params={"limit": 3}).json()
        assert listed["total"] == 9 and len(listed["items"]) == 3
        log = api.get(f"/jobs/{jobs['fit']['id']}/log").text
        assert "fit started" in log and "fit done" in log
    # The rows reach the catalog once it is free (journal first, then the table).
    rows = json.loads(curator("runs", "-o", "json", "-w", server.ws).stdout)
    assert len(rows) == 1


def test_read_routes(built):
    server, tokens, _, jobs = built
    with server.client(tokens["read"]) as api:
        sources = api.get("/sources").json()
        assert sources[0]["source"] == "mixed" and sources[0]["documents"] == 12
        page = api.get("/documents", params={"limit": 5, "offset": 2}).json()
        assert page["total"] == 12 and len(page["items"]) == 5 and page["offset"] == 2
        word = TRAINING_TEXT[0].split()[1]
        found = api.get("/documents", params={"q": word.upper()}).json()
        assert found["total"] >= 2 and all(word.lower() in d["snippet"].lower() or d["chars"] > 200
                                           for d in found["items"])
        doc_id = page["items"][0]["id"]
        assert api.get(f"/documents/{doc_id}").json()["text"]
        first = api.get("/documents/sample", params={"n": 4, "seed": 3}).json()
        assert [d["id"] for d in first] == [d["id"] for d in api.get("/documents/sample",
                                                                     params={"n": 4, "seed": 3}).json()]
        assert api.get("/queries", params={"selector": "arithmetic-s0"}).json()["total"] == 3
        fit = api.get("/fits").json()["items"][0]
        assert api.get(f"/fits/{fit['id'][:8]}").json()["id"] == fit["id"]
        run = api.get("/runs").json()["items"][0]
        assert api.get(f"/runs/{run['id']}").json()["query_ids"] == run["query_ids"]
        store = api.get("/stores").json()["items"][0]
        assert api.get(f"/stores/{store['id']}").json()["documents"] == 12
        index = api.get("/indexes").json()[0]
        assert api.get(f"/indexes/{index['name']}").json()["rows"] == 12
        assert api.get("/rankings").json()[0]["name"] == "reasoning"
        ranked = api.get("/rankings/reasoning", params={"limit": 3}).json()
        assert [d["rank"] for d in ranked["page"]["items"]] == [1, 2, 3]
        assert api.get("/mixtures").json()[0]["name"] == "m1"
        assert api.get("/mixtures/m1").json()["mixture"]["spec"]["budget_tokens"] == 200
        assert api.get("/exports").json()[0]["mixture"] == "m1"
        html = api.get("/audit/report")
        assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()
        assert "composition" in api.get("/audit/report.json").json()


def test_unknown_ids_are_404_naming_the_field(built):
    server, tokens, _, _ = built
    with server.client(tokens["read"]) as api:
        for path, field in (("/documents/999999", "doc_id"), ("/runs/nope", "run_id"), ("/fits/nope", "fit_id"),
                            ("/stores/nope", "store_id"), ("/indexes/nope", "name"), ("/rankings/nope", "name"),
                            ("/mixtures/nope", "name"), ("/jobs/nope", "job_id")):
            response = api.get(path)
            assert response.status_code == 404 and response.json()["field"] == field, (path, response.text)
        assert api.get("/nowhere").status_code == 404


def test_search_new_prompt_and_stored_queries(built):
    server, tokens, _, _ = built
    with server.client(tokens["read"]) as api:
        body = {"prompt": "Calculate the answer: (3 + 4) * 2\n\nThink step-by-step.",
                "completion": "3 + 4 = 7. 7 * 2 = 14. The answer is 14.", "top": 3, "bottom": 2}
        hits = api.post("/search", json=body).json()
        assert len(hits) == 1 and len(hits[0]["top"]) == 3 and len(hits[0]["bottom"]) == 2
        top = hits[0]["top"]
        assert top[0]["source"] == "mixed" and top[0]["snippet"] and top[0]["score"] >= top[-1]["score"]
        again = api.post("/search", json=body).json()            # cached model and index: same answer
        assert [h["doc_id"] for h in again[0]["top"]] == [h["doc_id"] for h in top]
        stored = api.post("/search", json={"queries": "arithmetic-s9", "top": 2, "bottom": 0, "rerank": 4}).json()
        assert len(stored) == 2 and stored[0]["reranked"] == 4
        missing = api.post("/search", json={"top": 3})
        assert missing.status_code == 422 and missing.json()["field"] == "body.prompt"
        too_many = api.post("/search", json={**body, "top": 10**6})
        assert too_many.status_code == 422 and too_many.json()["field"] == "body.top"


def test_cli_reads_and_searches_through_the_server(built):
    server, tokens, _, _ = built
    env = {"CURATOR_SERVER": server.url, "CURATOR_TOKEN": tokens["read"], "CURATOR_WORKSPACE": "/nonexistent"}
    assert json.loads(curator("sources", "-o", "json", env=env).stdout)[0]["documents"] == 12
    assert len(json.loads(curator("runs", "-o", "json", env=env).stdout)) == 1
    with server.client(tokens["read"]) as api:
        mixtures = api.get("/mixtures").json()
    listed = json.loads(curator("mixes", "-o", "json", env=env).stdout)
    assert mixtures and [m["name"] for m in listed] == [m["name"] for m in mixtures]
    found = curator("search", "--prompt", "Calculate the answer: (1 + 2) * 3", "--completion", "The answer is 9.",
                    "--top", "2", env=env).stdout
    assert "ad-hoc" in found and "mixed" in found
    refused = curator("--server", server.url, "--token", "cur_bad_bad", "runs", check=False)
    assert refused.returncode == 1 and "401" in refused.stderr


def test_every_remote_read_prints_what_the_local_command_prints(built, tmp_path):
    server, tokens, _, _ = built
    env = {"CURATOR_SERVER": server.url, "CURATOR_TOKEN": tokens["read"], "CURATOR_WORKSPACE": "/nonexistent"}
    for command in (["stores"], ["index", "list"], ["rankings"], ["queries", "list"]):
        remote = json.loads(curator(*command, "-o", "json", env=env).stdout)
        local = json.loads(curator(*command, "-o", "json", "-w", server.ws).stdout)   # reading beside the server
        assert remote and remote == local, command
    for command in (["docs", "show", "3"], ["docs", "sample", "-n", "2", "--seed", "4"]):
        assert curator(*command, env=env).stdout == curator(*command, "-w", server.ws).stdout, command
    # audit: a write token runs it as a job; a read token downloads the server's latest report.
    fresh, latest = tmp_path / "fresh.html", tmp_path / "latest.html"
    ran = curator("audit", "--out", fresh, "--json", tmp_path / "fresh.json",
                  env={**env, "CURATOR_TOKEN": tokens["write"]}).stdout
    assert "Auditing on the server" in ran and json.loads((tmp_path / "fresh.json").read_text())["run"]
    read = curator("audit", "--out", latest, env=env).stdout
    assert "read token" in read and latest.read_bytes() == fresh.read_bytes()


def test_cli_writers_are_told_a_server_owns_the_catalog(served, tmp_path):
    server, _, _ = served
    write_jsonl(tmp_path / "more.jsonl", [{"text": "another document"}])
    refused = curator("ingest", tmp_path / "more.jsonl", "--source", "x", "-w", server.ws, check=False)
    assert refused.returncode == 1 and "curator server at" in refused.stderr and server.url in refused.stderr


def test_paths_are_confined_to_the_roots(served, tmp_path):
    server, tokens, base = served
    outside = tmp_path / "secret.jsonl"
    write_jsonl(outside, [{"text": "secret"}])
    (base / "root" / "escape").symlink_to(tmp_path)
    with server.client(tokens["write"]) as api:
        for path in ("../ws/curator.duckdb", "corpus/../../ws", str(outside), "escape/secret.jsonl", "/etc/passwd"):
            response = api.post("/jobs", json={"kind": "ingest", "paths": [path], "options": {"source": "x"}})
            assert response.status_code == 403 and response.json()["field"] == "body.paths.0", (path, response.text)
        model = api.post("/jobs", json={"kind": "fit", "config": {"model": "../root/tiny"}})
        assert model.status_code == 403 and model.json()["field"] == "body.config.model"
        out = api.post("/jobs", json={"kind": "export", "mixture": "m1", "out": str(tmp_path / "out")})
        assert out.status_code == 403 and out.json()["field"] == "body.out"


def test_bad_input_is_a_4xx_naming_the_field(served):
    server, tokens, _ = served
    with server.client(tokens["write"]) as api:
        malformed = api.post("/jobs", content=b'{"kind": "fit", ', headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]
        wrong = api.post("/jobs", json={"kind": "fit", "config": {"model": "tiny", "max_seq_len": "long"}})
        assert wrong.status_code == 422 and wrong.json()["field"] == "body.fit.config.max_seq_len"
        unknown = api.post("/jobs", json={"kind": "teleport"})
        assert unknown.status_code == 422 and "'kind'" in unknown.json()["error"]
        extra = api.post("/jobs", json={"kind": "audit", "surprise": 1})
        assert extra.status_code == 422 and "surprise" in extra.json()["field"]
        assert api.get("/documents", params={"limit": 10_000}).status_code == 422
        assert api.get("/documents", params={"offset": -1}).status_code == 422
        assert api.get("/documents/not-a-number").status_code == 422
        big = api.post("/jobs", content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["field"] == "body"

        def chunks():
            for _ in range(40):
                yield b" " * 65536
        streamed = api.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


def _events(api, job_id, on_record=None) -> tuple[list[dict], str]:
    """The job records a Server-Sent Events stream carries, and the state its `end` event names."""
    seen = []
    with api.stream("GET", f"/jobs/{job_id}/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "job":
                seen.append(json.loads(line[6:]))
                if on_record:
                    on_record(seen[-1])
            elif line.startswith("data: ") and event == "end":
                return seen, json.loads(line[6:])["state"]
    raise AssertionError("the stream ended without an end event")


def test_job_lifecycle_with_events_and_cancel(built):
    server, tokens, base, _ = built
    with server.client(tokens["write"]) as api:
        followed = api.post("/jobs", json={"kind": "score", "force": True,
                                           "config": {"queries": "arithmetic-s0", "chunk_docs": 2}}).json()
        seen, end = _events(api, followed["id"])
        assert end == "done" and seen[-1]["state"] == "done"
        # The stream samples the record, so it may skip from "running" to "done"; the last progress stays.
        assert any(r["state"] == "running" for r in seen)
        assert seen[-1]["progress"]["done"] == seen[-1]["progress"]["total"] == 12

        running = api.post("/jobs", json={"kind": "fit", "force": True,
                                          "config": {"model": "tiny", "layers": "last:1", "seed": 5}}).json()
        # A second model job on the same device waits in its lane; a catalog job does not wait for it.
        queued = api.post("/jobs", json={"kind": "fit", "force": True,
                                         "config": {"model": "tiny", "layers": "last:1", "seed": 6}}).json()
        beside = api.post("/jobs", json={"kind": "audit", "after": []}).json()
        assert api.post(f"/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"
        assert wait_job(api, beside["id"])["state"] == "done"
        again = api.post("/jobs", json={"kind": "fit", "force": True, "config": {"model": "tiny", "layers": "last:1",
                                                                                 "seed": 5, "device": "cuda"}})
        assert again.status_code == 409 and running["id"] in again.json()["error"]
        unknown = api.post("/jobs", json={"kind": "audit", "after": ["job-nope"]})
        assert unknown.status_code == 422 and unknown.json()["field"] == "body.after.0"

        def cancel_once_running(record):
            if record["state"] == "running" and not cancelled:
                cancelled.append(api.post(f"/jobs/{running['id']}/cancel").status_code)
        cancelled: list[int] = []
        _, end = _events(api, running["id"], cancel_once_running)
        assert cancelled == [200] and end == "cancelled"
        final = wait_job(api, running["id"])
        assert final["state"] == "cancelled" and final["finished_at"]
        assert api.post(f"/jobs/{running['id']}/cancel").status_code == 409
        # The server is still up and the catalog is usable after the kill.
        assert submit_and_wait(api, {"kind": "audit"})["state"] == "done"


def test_search_reuses_the_query_frame_until_its_files_change(built):
    """The server's searcher reads the store's factors and bases once; a rewritten factors file (a refit)
    is read again. Run in this process, with the server's own classes, on the served workspace."""
    from curator.catalog.workspace import Workspace
    from curator.service.db import ServerCatalog
    from curator.service.search import Searcher
    from curator.sketch.search import SearchRequest

    server, _, _, jobs = built
    ws = Workspace(server.ws)
    searcher = Searcher(ServerCatalog(ws))
    request = SearchRequest(prompt="Calculate the answer: (2 + 5) * 3", completion="2 + 5 = 7. 7 * 3 = 21.",
                            top=4, bottom=2)
    first = [hits.model_dump() for hits in searcher.search(request)]
    assert searcher.frames.loads == 1
    assert [hits.model_dump() for hits in searcher.search(request)] == first
    assert searcher.frames.loads == 1            # the second search read no factors or bases
    factors = ws.root / jobs["fit"]["result"]["record"]["path"]
    copy = factors.with_name(factors.name + ".copy")
    copy.write_bytes(factors.read_bytes())
    os.replace(copy, factors)                    # the same bytes, as a refit's rename leaves them
    assert [hits.model_dump() for hits in searcher.search(request)] == first
    assert searcher.frames.loads == 2


def test_tokens_are_revoked_beside_the_running_server(served):
    server, _, _ = served
    token = _token(server.ws, "read")
    token_id = token.split("_")[1]
    curator("token", "revoke", token_id, "-w", server.ws)
    assert token_id not in curator("token", "list", "-o", "json", "-w", server.ws).stdout
    with server.client(token) as api:
        assert api.get("/sources").status_code == 401
    unknown = curator("token", "revoke", "nobody", "-w", server.ws, check=False)
    assert unknown.returncode == 1 and "no token" in unknown.stderr
