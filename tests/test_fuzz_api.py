"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): valid and invalid bodies for every endpoint. No
request gets a 5xx, every error is OpenAI's shape, and the server still answers a plain request afterwards."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from test_serve import make_bank

from softprompt.serve.app import create_app
from softprompt.serve.engine import Engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = Engine(make_bank(tmp_path_factory.mktemp("api")), max_batch=8, window_ms=1,
                    max_tokens_limit=64).start()
    yield create_app(engine)
    engine.stop()


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_asgi("/openapi.json", served)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case):
    if case.path.startswith("/admin"):  # the fuzzer must not delete the tasks the others use
        case.path_parameters = {k: "no-such-task" for k in (case.path_parameters or {})}
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text[:300]
        assert "\n" not in err["message"]


def test_the_server_still_answers_after_the_fuzzing(served):
    from fastapi.testclient import TestClient

    client = TestClient(served)
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "the movie", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert client.get("/health").status_code == 200
