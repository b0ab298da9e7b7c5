"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): valid and invalid bodies for every endpoint. No
request gets a 5xx, every error is OpenAI's shape, and the server still answers a plain request afterwards."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_serve import make_bank

from softprompt.serve.app import create_app
from softprompt.serve.engine import Engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = Engine(make_bank(tmp_path_factory.mktemp("api")), max_batch=8, window_ms=1,
                    max_tokens_limit=64).start()
    yield create_app(engine)
    engine.stop()


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_request_gets_a_server_error(served):
    """Each operation of the schema, valid and invalid bodies generated from it (schemathesis' strategies, driven by
    hypothesis directly: its pytest plugin does not support this pytest)."""
    operations = _operations(served)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                            "/v1/classify", "/v1/detect"}
    tried = 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def run(case):
                nonlocal tried
                if case.path.startswith("/admin"):  # the fuzzer must not delete the tasks the others use
                    case.path_parameters = {k: "no-such-task" for k in (case.path_parameters or {})}
                response = case.call()
                tried += 1
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                if response.status_code >= 400:
                    err = response.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and err["message"], response.text[:300]
                    assert "\n" not in err["message"]

            try:
                run()
            except Unsatisfiable:  # no invalid input exists for this operation (no body, no parameters)
                assert mode == GenerationMode.NEGATIVE
    assert tried >= 100


def test_the_server_still_answers_after_the_fuzzing(served):
    from fastapi.testclient import TestClient

    client = TestClient(served)
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "the movie", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert client.get("/health").status_code == 200
