"""The chat completions field catalogue (server/chat_fields.py) against the request model,
vLLM's own protocol model and docs/gateway.md's table; --accept-unknown-fields on a fake
engine (the flag is gateway behaviour the model does not affect)."""

import re
from pathlib import Path

import pytest
from gateway.inprocess import chat_body, running_gateway

from mdlserve.server.chat_fields import HONOURED, IGNORABLE, REFUSED
from mdlserve.server.schemas import ChatCompletionRequest

DOCS = Path(__file__).parents[2] / "docs" / "gateway.md"
ROW = re.compile(r"^\| `(\w+)` \| (honoured|refused) \| (.*) \|$")
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
