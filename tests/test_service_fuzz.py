"""The OpenAPI contract, fuzzed with schemathesis: no input makes the server answer 5xx, and no job it
accepts ends in an internal error.

The workspace is the web test's: two sources, a tiny model fitted, scored, sketched and indexed, a
ranking, a mixture, an export and an audit, so searches run the model and index and every read route
has records to find. Reads are fuzzed with a read token; job submission and cancellation with a write
token, so bodies that pass validation become real jobs in the worker.
"""

from __future__ import annotations

import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from service_helpers import Server, build_workspace

EXAMPLES = 12
JOB_WAIT_S = 240


def test_no_input_makes_a_5xx_or_an_internal_error(tmp_path):
    from curator.service.auth import create_token

    ws, root = build_workspace(tmp_path)
    tokens = {scope: create_token(ws, scope, f"fuzz-{scope}")[1] for scope in ("read", "write")}
    server = Server(ws.root, [root]).start()
    try:
        schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
        failures = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 25
        for operation in operations:
            if operation.path.endswith("/events"):
                continue        # a stream that lasts as long as its job; tested in test_service.py
            writes = operation.method.upper() == "POST" and operation.path.startswith("/v1/jobs")
            token = tokens["write" if writes else "read"]

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def fuzz(case):
                response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}: "
                                    f"{response.status_code} {response.text[:200]}")
            fuzz()
        assert not failures, "\n".join(failures[:10])

        # Every job the fuzzer got accepted ends, and none of them in a bug (an "internal error").
        with server.client(tokens["read"]) as api:
            deadline = time.monotonic() + JOB_WAIT_S
            while True:
                jobs = api.get("/jobs", params={"limit": 500}).json()["items"]
                if all(j["state"] not in ("queued", "running") for j in jobs) or time.monotonic() > deadline:
                    break
                time.sleep(1)
        accepted = [j for j in jobs if j["id"]]
        assert accepted, "the fuzzer got no job accepted: the job routes were not exercised"
        bugs = [f"{j['kind']} {j['params']}: {j['error']}" for j in jobs
                if (j["error"] or "").startswith("internal error") or "worker process died" in (j["error"] or "")]
        assert not bugs, "\n".join(bugs[:10])
    finally:
        server.stop()
