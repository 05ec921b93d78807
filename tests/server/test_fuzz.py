"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): bodies that fit the schema
and bodies that break it, for every operation. No reply may be a 5xx or hang, every error
is in OpenAI's shape, and the server still answers afterwards."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.server.conftest import API_KEY, ServerProcess

CASES = 25  # per operation and mode


@pytest.fixture(scope="module")
def fuzzed_server():
    # short contexts and a short timeout: a valid body asking for many tokens ends in a
    # 408 within seconds instead of generating for minutes on this CPU
    srv = ServerProcess("--api-key", API_KEY, "--max-model-len", "48", "--request-timeout",
                        "3", "--quantization", "int4")
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_errors_in_openai_shape(fuzzed_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    for operation in operations:
        fuzz(operation, mode, fuzzed_server)
    assert httpx.get(f"{fuzzed_server.url}/health").status_code == 200


def fuzz(operation, mode: GenerationMode, server: ServerProcess) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case) -> None:
        response = case.call(base_url=server.url, timeout=30,
                             headers={"Authorization": f"Bearer {API_KEY}"})
        where = f"{case.method} {case.path} {case.body!r:.300}"
        assert response.status_code < 500, f"{where}: {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"], f"{where}: {response.text[:300]}"
        assert server.proc.poll() is None, where

    try:
        one()
    except Unsatisfiable:  # an operation that takes no input has no invalid input
        assert mode is GenerationMode.NEGATIVE
