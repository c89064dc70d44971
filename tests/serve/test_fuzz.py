"""Slow: schemathesis generates requests for every route of /openapi.json; none may get a 5xx."""

import pytest

from tests.serve.conftest import running_server

pytestmark = pytest.mark.slow


def test_no_generated_request_gets_a_5xx(llama_dir):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    with running_server(llama_dir, max_model_len=256) as server:
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
        failures = []
        checked = 0
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case):
                nonlocal checked
                response = case.call(base_url=server.base_url, timeout=120)
                checked += 1
                if response.status_code >= 500:
                    failures.append(f"{operation.method.upper()} {operation.path}: {response.status_code} "
                                    f"{response.text[:200]} for {case.body!r:.300}")

            call()
        assert checked > 100
        assert not failures, "\n".join(failures[:20])
        assert server.llm.is_healthy
