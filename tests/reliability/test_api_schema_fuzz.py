"""Property-based fuzzing of the running server's own OpenAPI schema (schemathesis): whatever
request the schema allows or nearly allows, the gateway answers without a 5xx.

Schemathesis' pytest integration (`from_fixture`) does not work with pytest 9, so each
operation's hypothesis strategy is driven directly, one test per operation.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import API_KEY

OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/chat"),
    ("GET", "/v1/models"), ("GET", "/health/live"), ("GET", "/health/ready"), ("GET", "/metrics"),
]
EXAMPLES, HEAVY_EXAMPLES = 25, 250
# Generated bodies get a small output limit so that valid ones finish well inside
# --request-timeout (a 504 would be the timeout doing its job, not a crash).
FUZZ_MAX_TOKENS = 4


@pytest.fixture(scope="module")
def api_schema(guarded_server):
    return schemathesis.openapi.from_url(guarded_server.url + "/openapi.json")


def test_schema_lists_the_fuzzed_operations(api_schema):
    published = {(op.method.upper(), op.path) for op in (result.ok() for result in api_schema.get_all_operations())}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_no_server_error(api_schema, guarded_server, reliability_report, heavy, method, path):
    operation = api_schema[path][method]
    server_errors: list[str] = []
    tried = 0

    @given(case=operation.as_strategy())
    @settings(max_examples=HEAVY_EXAMPLES if heavy else EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        nonlocal tried
        if isinstance(case.body, dict):
            case.body["max_tokens"] = case.body["max_completion_tokens"] = FUZZ_MAX_TOKENS
        response = case.call(base_url=guarded_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=60)
        tried += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} for {str(case.body)[:200]}: {response.text[:200]}")
        assert response.status_code < 500, server_errors[-1]

    try:
        check()
    finally:
        reliability_report.add_fault(
            f"schemathesis {method} {path}", "no 5xx for generated requests",
            f"{tried} requests, {len(server_errors)} 5xx" + (f": {server_errors[0]}" if server_errors else ""),
            not server_errors,
        )  # fmt: skip
