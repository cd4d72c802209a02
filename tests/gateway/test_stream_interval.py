"""`--stream-interval N`: a streamed answer carries the tokens of up to N engine steps per
event (vLLM's output processor holds them back), with the same text and logprobs as the
whole answer. Its own server: the shared gateway streams every token."""

import json
import math

import httpx
import pytest

from .helpers import ServerProcess, audio_file, audio_part, chat_body

INTERVAL = 4
TOKENS = 14


@pytest.fixture(scope="module")
def coalescing(tiny_checkpoint, tmp_path_factory):
    server = ServerProcess(tiny_checkpoint, ["--stream-interval", str(INTERVAL)], tmp_path_factory.mktemp("logs"),
                           name="stream-interval")  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


def test_a_stream_carries_up_to_n_tokens_per_event_and_the_whole_answer(coalescing):
    body = chat_body(audio_part(audio_file()), max_tokens=TOKENS, ignore_eos=True, logprobs=True)
    with httpx.Client(base_url=coalescing.url, timeout=120) as client:
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [c for e in events[:-1] for c in json.loads(e)["choices"]]
    per_event = [len(c["logprobs"]["content"]) for c in choices if c.get("logprobs")]
    # The first token goes at once, then every INTERVAL tokens, then the rest: at most
    # 1 + ceil((TOKENS - 1) / INTERVAL) events (fewer when the gateway reads two at once).
    assert sum(per_event) == TOKENS
    assert len(per_event) <= 1 + math.ceil((TOKENS - 1) / INTERVAL) < TOKENS
    answer = whole.json()["choices"][0]
    assert "".join(c["delta"].get("content") or "" for c in choices) == answer["message"]["content"]
    assert [t for c in choices if c.get("logprobs") for t in c["logprobs"]["content"]] == answer["logprobs"]["content"]
    assert choices[-1]["finish_reason"] == answer["finish_reason"] == "length"
