"""Over real HTTP with the tiny engine: the 429 before the body at capacity, client
disconnects aborting the engine request (streaming and not), and API-key auth. The burst
at twice capacity and the request timeouts (504, stream error event) are tested in process
with the fake engine (test_gateway_behaviour.py): their socket versions depended on how
fast the machine decodes."""

import asyncio
import json
import time

import httpx
import pytest

from .conftest import API_KEYS, AUTH, MAX_NUM_SEQS, MAX_QUEUE, REQUEST_TIMEOUT_S
from .helpers import audio_file, audio_part, chat_body, metric, raw_exchange

CLIP = audio_part(audio_file(seconds=1.0))
# More tokens than the tiny engine makes in the request timeout on a CPU (min_tokens: no
# early end-of-sequence either), so only an abort ends such a request early.
# Outlives --request-timeout (10 s) even on an idle CPU: 4000 decode steps (context 4096).
LONG = 4000


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120, headers=AUTH) as c:
        yield c


def _metrics(client) -> str:
    return client.get("/metrics").text


def _wait_idle(client, timeout: float = 20) -> str:
    """Until no clip units are admitted and the engine runs/waits on nothing."""
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(client)
        idle = [metric(text, "mdl_clips_in_flight"), metric(text, "mdl_engine_running_requests"),
                metric(text, "mdl_engine_waiting_requests")]
        if idle == [0, 0, 0] or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def _generated(text: str) -> float:
    """Tokens the engine generated so far (vLLM's own counter)."""
    return metric(text, "vllm:generation_tokens_total")


def _assert_aborted(client, before: str, after: str) -> None:
    """The engine stopped generating for the request long before its LONG tokens, and
    generates nothing any more: the request was aborted, not left running or finished."""
    assert metric(after, "mdl_clips_in_flight") == 0
    assert metric(after, "mdl_engine_running_requests") == 0
    assert _generated(after) - _generated(before) < LONG
    time.sleep(1)
    assert _generated(_metrics(client)) == _generated(after)


def _chat_head(authorization: str, content_length: int) -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: {authorization}\r\nContent-Length: {content_length}\r\n\r\n")


def test_at_capacity_429_comes_before_the_body(gateway, client):
    """With every admission unit taken, an authenticated request is refused as soon as its
    headers arrive: the 429 comes although not one byte of its 1 MB body was sent. An
    unauthenticated one still gets its 401."""
    _wait_idle(client, timeout=120)
    body = json.dumps(chat_body(CLIP, max_tokens=LONG, min_tokens=LONG, stream=True))

    async def hold(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/chat/completions", content=body,
                               headers={"Content-Type": "application/json"}):
            await asyncio.sleep(3600)  # until cancelled: MAX_QUEUE of them never even start in the engine

    async def at_capacity() -> tuple[float, bytes, bytes]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60, headers=AUTH) as http:
            holders = [asyncio.create_task(hold(http)) for _ in range(MAX_NUM_SEQS + MAX_QUEUE)]
            try:
                deadline = time.monotonic() + REQUEST_TIMEOUT_S / 2
                while (in_flight := metric(await asyncio.to_thread(_metrics, client), "mdl_clips_in_flight")) \
                        < MAX_NUM_SEQS + MAX_QUEUE and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                # A 1 MiB body announced, not one byte of it sent.
                refused = await asyncio.to_thread(raw_exchange, gateway.url, _chat_head(AUTH["Authorization"], 1 << 20))
                stranger = await asyncio.to_thread(raw_exchange, gateway.url,
                                                   _chat_head("Bearer wrong", len(body.encode())), [body.encode()])
            finally:
                for holder in holders:
                    holder.cancel()
                await asyncio.gather(*holders, return_exceptions=True)
            return in_flight, refused, stranger

    before = metric(_metrics(client), "mdl_rejections_total", reason="queue_full")
    in_flight, refused, stranger = asyncio.run(at_capacity())
    assert in_flight == MAX_NUM_SEQS + MAX_QUEUE
    head, _, payload = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429"), refused[:300]
    assert b"retry-after: 1" in head.lower()
    assert json.loads(payload)["error"]["code"] == "queue_full"
    assert stranger.startswith(b"HTTP/1.1 401"), stranger[:300]
    text = _wait_idle(client)
    assert metric(text, "mdl_rejections_total", reason="queue_full") == before + 1
    assert metric(text, "mdl_clips_in_flight") == 0 and metric(text, "mdl_engine_running_requests") == 0


def test_streaming_client_disconnect_aborts_engine_request(gateway, client):
    before = _metrics(client)
    with httpx.Client(base_url=gateway.url, timeout=60, headers=AUTH) as http:
        with http.stream("POST", "/v1/chat/completions",
                         json=chat_body(CLIP, max_tokens=LONG, min_tokens=LONG, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in received)
            assert metric(_metrics(client), "mdl_clips_in_flight") == 1
        # leaving the block closes the connection mid-stream
    _assert_aborted(client, before, _wait_idle(client))


def test_non_streaming_client_disconnect_aborts_engine_request(gateway, client):
    before = _metrics(client)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(CLIP, max_tokens=LONG, min_tokens=LONG),
                   headers=AUTH, timeout=httpx.Timeout(30, read=2.5))
    text = _wait_idle(client)
    _assert_aborted(client, before, text)
    assert metric(text, "mdl_requests_total", route="/v1/chat/completions", status="499") >= 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LW9uZQ=="},
                                     {"Authorization": f"Bearer {API_KEYS[0]}x"}])
def test_requests_without_a_valid_key_get_401(gateway, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, gateway.url + path, headers=headers, json=chat_body(CLIP), timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert "API key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works_and_ops_endpoints_are_open(gateway):
    for key in API_KEYS:
        assert httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert httpx.get(gateway.url + path).status_code == 200
    text = httpx.get(gateway.url + "/metrics").text
    assert metric(text, "mdl_rejections_total", reason="unauthorized") >= 8
    assert "key-one" not in text
    assert not any(key in gateway.log_tail(10**7) for key in API_KEYS)  # keys never logged
