"""The chat completions field catalogue (server/chat_fields.py) against the request model,
vLLM's own protocol model and docs/gateway.md's table; --accept-unknown-fields on a fake
engine (the flag is gateway behaviour the model does not affect)."""

import json
import re
from pathlib import Path

import pytest
from gateway.helpers import audio_file
from gateway.inprocess import MODEL, chat_body, running_gateway

from mdlserve.server.chat_fields import HONOURED, IGNORABLE, NESTED_IGNORABLE, NESTED_REFUSED, REFUSED
from mdlserve.server.schemas import ChatCompletionRequest

DOCS = Path(__file__).parents[2] / "docs" / "gateway.md"
ROW = re.compile(r"^\| `(\w+)` \| (honoured|refused) \| (.*) \|$")
NESTED_ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| (.*) \|$")
IGNORED_NOTE = " (ignored with `--accept-unknown-fields`)"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_honoured_fields_are_the_declared_ones():
    assert set(HONOURED) == set(ChatCompletionRequest.model_fields)
    assert not set(HONOURED) & set(REFUSED)
    assert set(REFUSED) >= IGNORABLE


def test_every_vllm_request_field_is_honoured_or_refused():
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest
    except ImportError:  # vLLM before the protocol split
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest as VllmRequest
    missing = set(VllmRequest.model_fields) - set(HONOURED) - set(REFUSED)
    assert missing == set(), f"vLLM fields neither honoured nor refused: {sorted(missing)}"


def test_docs_table_is_the_catalogue():
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    expected = {name: ("honoured", how) for name, how in HONOURED.items()}
    expected |= {name: ("refused", why + (IGNORED_NOTE if name in IGNORABLE else "")) for name, why in REFUSED.items()}
    assert rows == expected


def test_docs_nested_table_is_the_catalogue():
    rows = {(m.group(1), m.group(2)): m.group(3) for m in map(NESTED_ROW.match, DOCS.read_text().splitlines()) if m}
    expected = {
        (obj, name): why + (IGNORED_NOTE if (obj, name) in NESTED_IGNORABLE else "")
        for obj, fields in NESTED_REFUSED.items()
        for name, why in fields.items()
    }
    assert rows == expected


def _message(**extra: object) -> list[dict]:
    return [{"role": "user", "content": "hi", **extra}]


@pytest.mark.parametrize(
    ("accept", "body", "status", "param", "code"),
    [
        (False, {"messages": _message(name="bob")}, 400, "messages[0].name", "unsupported_field"),
        (True, {"messages": _message(name="bob")}, 200, None, None),
        (True, {"messages": _message(tool_calls=[])}, 400, "messages[0].tool_calls", "unsupported_field"),
        (False, {"messages": _message(cache_ttl=5)}, 400, "messages[0].cache_ttl", "unknown_field"),
        (True, {"messages": _message(cache_ttl=5)}, 200, None, None),
        (False, {"messages": _message(name=None)}, 200, None, None),
        (
            False,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
            400,
            "messages[0].content[0].cache_control",
            "unknown_field",
        ),
        (False, {"stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400, "stream_options.x", None),
        (True, {"stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
         "stream_options.continuous_usage_stats", "unsupported_field"),
        (False, {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "x": 1}}},
         400, "response_format.json_schema.x", "unknown_field"),
        (False, {"response_format": {"type": "json_object", "x": 1}}, 400, "response_format.x", "unknown_field"),
    ],
)
@pytest.mark.anyio
async def test_nested_fields_are_honoured_or_refused_by_path(accept, body, status, param, code):
    async with running_gateway(accept_unknown_fields=accept) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=2) | body)
    assert response.status_code == status, response.text
    if param:
        error = response.json()["error"]
        assert error["param"] == param
        assert param in error["message"]
        if code:
            assert error["code"] == code


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "boolean"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "boolean"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true"),
        ({"stream": False, "stream_options": {}}, "stream_options", "only allowed with stream: true"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}},
         "response_format.json_schema.strict", "boolean"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
         "string"),
    ],
)
@pytest.mark.anyio
async def test_nested_values_are_strict(body, param, words):
    async with running_gateway() as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=2) | body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize(
    ("accept", "fields", "status", "param"),
    [
        (False, {"messages": json.dumps(_message(name="bob"))}, 400, "messages[0].name"),
        (True, {"messages": json.dumps(_message(name="bob"))}, 200, None),
        (False, {"messages": json.dumps(_message(speaker=1))}, 400, "messages[0].speaker"),
        (False, {"prompt": "hi", "include_usage": "true"}, 400, "include_usage"),
        (False, {"prompt": "hi", "include_usage": "true", "stream": "true"}, 200, None),
    ],
)
@pytest.mark.anyio
async def test_audio_analysis_form_follows_the_chat_rules(accept, fields, status, param):
    async with running_gateway(accept_unknown_fields=accept) as gw:
        response = await gw.client.post(
            "/v1/audio/analysis", data={"max_tokens": "2", **fields}, files={"file": ("a.wav", audio_file())}
        )
    assert response.status_code == status, response.text
    if param:
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("accept", "path", "fields", "status"),
    [
        (False, "/v1/audio/transcriptions", {"chunking_strategy": "auto"}, 400),
        (True, "/v1/audio/transcriptions", {"chunking_strategy": "auto"}, 200),
        (False, "/v1/audio/translations", {"include[]": "logprobs"}, 400),
        (True, "/v1/audio/translations", {"include[]": "logprobs"}, 200),
        (False, "/v1/audio/analysis", {"prompt": "hi", "chunking_strategy": "auto"}, 400),
        (True, "/v1/audio/analysis", {"prompt": "hi", "chunking_strategy": "auto"}, 200),
    ],
)
@pytest.mark.anyio
async def test_unknown_form_fields_are_refused_as_in_json(accept, path, fields, status):
    """An unknown form field is the same 400 unknown_field as an unknown JSON field, and
    --accept-unknown-fields ignores it on the form routes too."""
    async with running_gateway(accept_unknown_fields=accept) as gw:
        response = await gw.client.post(
            path, data={"model": MODEL, "max_completion_tokens": "2", **fields}, files={"file": ("a.wav", audio_file())}
        )
    assert response.status_code == status, response.text
    if status == 400:
        name = next(iter(fields.keys() - {"prompt"}))
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (name, "unknown_field")
        assert error["message"].startswith(f"unknown field {name!r}")


@pytest.mark.parametrize(
    ("accept", "extra", "status", "param"),
    [
        (False, {"x_trace": 1}, 400, "x_trace"),
        (True, {"x_trace": 1}, 200, None),
        (False, {"store": False}, 400, "store"),
        (True, {"store": False, "metadata": {"a": "b"}}, 200, None),
        (True, {"tools": []}, 400, "tools"),
        (True, {"use_beam_search": True}, 400, "use_beam_search"),
    ],
)
@pytest.mark.anyio
async def test_accept_unknown_fields_flag(accept, extra, status, param):
    async with running_gateway(accept_unknown_fields=accept) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body(max_tokens=2, **extra))
    assert response.status_code == status, response.text
    if param:
        assert response.json()["error"]["param"] == param
    else:
        assert response.json()["choices"][0]["message"]["content"]
