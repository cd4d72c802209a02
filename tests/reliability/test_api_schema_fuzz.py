"""Property-based fuzzing of the running server's own OpenAPI schema (schemathesis): whatever
request the schema allows or nearly allows, the gateway answers without a 5xx, and every
answer matches the document: its status is listed, its content type is listed, and its
body validates against the listed schema (schemathesis' response checks).

Schemathesis' pytest integration (`from_fixture`) does not work with pytest 9, so each
operation's hypothesis strategy is driven directly, one test per operation.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)  # fmt: skip

from .conftest import API_KEY

OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"),
    ("POST", "/v1/audio/analysis"), ("POST", "/v1/audio/chat"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"), ("GET", "/version"), ("GET", "/health"), ("GET", "/health/live"),
    ("GET", "/health/ready"), ("GET", "/metrics"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Forms refuse fields they do not declare: the speech forms have no max_tokens.
OUTPUT_LIMITS = {"/v1/audio/transcriptions": ("max_completion_tokens",),
                 "/v1/audio/translations": ("max_completion_tokens",)}
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
    broken: list[str] = []
    tried = 0

    @given(case=operation.as_strategy())
    @settings(max_examples=HEAVY_EXAMPLES if heavy else EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        nonlocal tried
        if isinstance(case.body, dict):
            for key in OUTPUT_LIMITS.get(path, ("max_tokens", "max_completion_tokens")):
                case.body[key] = FUZZ_MAX_TOKENS
        response = case.call(base_url=guarded_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=60)
        tried += 1
        if response.status_code >= 500:
            server_errors.append(f"{response.status_code} for {str(case.body)[:200]}: {response.text[:200]}")
        assert response.status_code < 500, server_errors[-1]
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:  # schemathesis' Failure / FailureGroup
            broken.append(f"{response.status_code} for {str(case.body)[:200]}: {str(exc)[:300]}")
            raise

    try:
        check()
    finally:
        reliability_report.add_fault(
            f"schemathesis {method} {path}", "no 5xx for generated requests",
            f"{tried} requests, {len(server_errors)} 5xx, {len(broken)} off the schema"
            + "".join(f": {first[0]}" for first in (server_errors, broken) if first),
            not server_errors and not broken,
        )  # fmt: skip
