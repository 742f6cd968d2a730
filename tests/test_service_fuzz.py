"""The OpenAPI contract, fuzzed with schemathesis: no input makes the server answer 5xx.

A small workspace (documents, no model) keeps each case cheap; a read token lets every route run
(submissions then stop at 403, which is what a read token must get)."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from helpers import curator, write_jsonl
from service_helpers import Server

EXAMPLES = 12


def test_no_input_makes_a_5xx(tmp_path):
    ws, root = tmp_path / "ws", tmp_path / "root"
    curator("init", ws)
    write_jsonl(root / "docs.jsonl", [{"text": f"document number {i}"} for i in range(5)])
    curator("ingest", root / "docs.jsonl", "--source", "s", "-w", ws)
    curator("queries", "generate", "--task", "slope", "--n", "2", "-w", ws)
    token = curator("token", "create", "--scope", "read", "-w", ws).stdout.strip()
    server = Server(ws, [root]).start()
    try:
        schema = schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json").json())
        failures = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 25
        for operation in operations:
            if operation.path.endswith("/events"):
                continue        # a stream that lasts as long as its job; tested in test_service.py

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def fuzz(case):
                response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=30)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}: "
                                    f"{response.status_code} {response.text[:200]}")
            fuzz()
        assert not failures, "\n".join(failures[:10])
    finally:
        server.stop()
