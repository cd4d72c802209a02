"""Every endpoint and content-part kind against a real server (tiny checkpoint), with audio
files written here in several formats, sample rates and channel counts; plus the official
`openai` client."""

import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile

from .conftest import API_KEYS, AUTH
from .helpers import MODEL, audio_file, audio_part, b64, chat_body, metric

FORMATS = [  # (format, rate, channels)
    ("wav", 8000, 1),
    ("wav", 48000, 2),
    ("flac", 22050, 2),
    ("flac", 44100, 1),
    ("ogg", 44100, 2),
    ("ogg", 22050, 1),
    ("mp3", 48000, 2),
    ("mp3", 44100, 1),
]


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=120, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEYS[1], max_retries=0, timeout=120)


def test_models_lists_served_name(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["max_model_len"] == 4096


def test_not_ready_while_the_engine_loads(servers, gateway):
    """Observed right after the server started listening, before its engine was up."""
    ready = servers.while_loading["ready"]
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert servers.while_loading["live"].status_code == 200
    chat = servers.while_loading["chat"]
    assert chat.status_code == 503 and "still loading" in chat.json()["error"]["message"]
    assert chat.headers["retry-after"] == "5"


def test_health_endpoints(client):
    assert client.get("/health/live").json() == {"status": "alive", "detail": None}
    assert client.get("/health/ready").json()["status"] == "ready"


@pytest.mark.parametrize(("fmt", "rate", "channels"), FORMATS)
def test_chat_input_audio_formats(client, fmt, rate, channels):
    data = audio_file(fmt, rate, channels, seconds=2.0)
    r = client.post("/v1/chat/completions", json=chat_body(audio_part(data, fmt), max_tokens=3))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    # 2 s of audio is 10 audio tokens (whatever the rate or container: decoded to 16 kHz mono).
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3


def test_16_bit_wav_answers_as_its_float_samples(client):
    """A 16-bit 16 kHz mono WAV reaches the model as int16 PCM, the same samples as float
    in a 32-bit float WAV: the same greedy answer and logprobs."""
    rng = np.random.default_rng(7)
    pcm = np.round(rng.uniform(-0.3, 0.3, 3 * 16000) * 32767).astype(np.int16)
    files = {}
    for subtype, samples in (("PCM_16", pcm), ("FLOAT", pcm * np.float32(2**-15))):
        buf = io.BytesIO()
        soundfile.write(buf, samples, 16000, format="WAV", subtype=subtype)
        files[subtype] = buf.getvalue()
    answers = [
        client.post("/v1/chat/completions", json=chat_body(audio_part(data), max_tokens=6, logprobs=True)).json()
        for data in files.values()
    ]
    pcm_choice, float_choice = (a["choices"][0] for a in answers)
    assert pcm_choice["message"]["content"] == float_choice["message"]["content"]
    assert pcm_choice["logprobs"] == float_choice["logprobs"]


def test_prompt_tokens_grow_with_audio_length(client):
    short = client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file(seconds=2)), max_tokens=1))
    long = client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file(seconds=6)), max_tokens=1))
    # 5 tokens per second of audio: 4 s more audio, 20 more prompt tokens.
    assert long.json()["usage"]["prompt_tokens"] - short.json()["usage"]["prompt_tokens"] == 20


def test_greedy_is_deterministic_and_system_prompt_matters(client):
    part = audio_part(audio_file())
    a = client.post("/v1/chat/completions", json=chat_body(part, max_tokens=6)).json()
    b = client.post("/v1/chat/completions", json=chat_body(part, max_tokens=6)).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    default_system = client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).json()
    explicit = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1, "messages": [
        {"role": "system", "content": "You are a helpful language and speech assistant."},
        {"role": "user", "content": "hi"}]}).json()  # fmt: skip
    # The default system prompt is the model README's: same prompt, same token count.
    assert default_system["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"]


def test_seeded_sampling_is_reproducible(client):
    body = chat_body(audio_part(audio_file()), max_tokens=6, temperature=1.0, top_p=0.9, seed=1234)
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_n_choices_and_stop(client):
    body = chat_body(audio_part(audio_file()), max_tokens=4, n=3, temperature=1.0, seed=7)
    r = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert r["usage"]["completion_tokens"] == 12
    greedy = client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file()), max_tokens=8)).json()
    text = greedy["choices"][0]["message"]["content"]
    stop = text[2:4]
    stopped = client.post("/v1/chat/completions",
                          json=chat_body(audio_part(audio_file()), max_tokens=8, stop=[stop])).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop not in stopped["choices"][0]["message"]["content"]


def test_several_clips_and_audio_url_kinds(client, media_dir):
    (media_dir / "clip.flac").write_bytes(audio_file("flac", 44100, 2))
    data_url = "data:audio/wav;base64," + b64(audio_file("wav", 8000, 1))
    body = chat_body(
        audio_part(audio_file("ogg", 48000, 2), "ogg"),
        {"type": "audio_url", "audio_url": {"url": data_url}},
        {"type": "audio_url", "audio_url": {"url": f"file://{media_dir}/clip.flac"}},
        max_tokens=2,
    )
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    one = client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file()), max_tokens=2)).json()
    # Three 2 s clips: two more clips of 10 tokens (plus their bos/eos markers) than one.
    assert r.json()["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"] == 2 * (10 + 2)


def test_text_only_chat(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_completion_tokens": 2, "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]}]})  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def _sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_streaming_with_usage(client):
    body = chat_body(audio_part(audio_file("flac", 44100, 2), "flac"), max_tokens=5, stream=True,
                     stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["length"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 5
    # Same text as the non-streaming answer.
    plain = client.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert text == plain["choices"][0]["message"]["content"]


def test_transcriptions_formats(client):
    files = {"file": ("clip.mp3", audio_file("mp3", 44100, 2), "audio/mpeg")}
    form = {"model": MODEL, "max_completion_tokens": "4", "temperature": "0"}
    as_json = client.post("/v1/audio/transcriptions", data=form, files=files)
    assert as_json.status_code == 200, as_json.text
    text = as_json.json()["text"]
    assert text and as_json.json()["usage"]["output_tokens"] == 4
    as_text = client.post("/v1/audio/transcriptions", data={**form, "response_format": "text"}, files=files)
    assert as_text.headers["content-type"].startswith("text/plain") and as_text.text == text
    verbose = client.post("/v1/audio/transcriptions", data={**form, "response_format": "verbose_json"},
                          files=files).json()
    assert verbose["text"] == text and verbose["duration"] == pytest.approx(2.0, abs=0.1)
    # `prompt` is context (a system message in place of the default one): a different token count.
    prompted = client.post("/v1/audio/transcriptions", data={**form, "prompt": "What is happening in this recording?"},
                           files=files).json()
    assert prompted["usage"]["input_tokens"] != as_json.json()["usage"]["input_tokens"]


def test_transcription_streaming(client):
    files = {"file": ("clip.wav", audio_file("wav", 22050, 2))}
    form = {"model": MODEL, "max_completion_tokens": "4", "temperature": "0"}
    with client.stream("POST", "/v1/audio/transcriptions", data={**form, "stream": "true"}, files=files) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    deltas = [e["delta"] for e in events[:-1] if e["type"] == "transcript.text.delta"]
    done = [e for e in events[:-1] if e["type"] == "transcript.text.done"]
    assert len(done) == 1 and "".join(deltas) == done[0]["text"]
    plain = client.post("/v1/audio/transcriptions", data=form, files=files).json()
    assert plain["text"] == done[0]["text"]


def test_audio_chat_prompt_messages_and_stream(client):
    files = {"file": ("clip.ogg", audio_file("ogg", 48000, 1))}
    by_prompt = client.post("/v1/audio/chat", data={"prompt": "What is happening in this recording?",
                                                    "max_tokens": "3", "temperature": "0"}, files=files)
    assert by_prompt.status_code == 200, by_prompt.text
    messages = [{"role": "system", "content": "You are a helpful language and speech assistant."},
                {"role": "user", "content": "What is happening in this recording?"}]
    by_messages = client.post("/v1/audio/chat", data={"messages": json.dumps(messages), "max_tokens": "3",
                                                      "temperature": "0", "model": MODEL}, files=files)
    assert by_messages.status_code == 200, by_messages.text
    # The uploaded clip leads the first user message either way: the same prompt and answer.
    assert by_prompt.json()["usage"] == by_messages.json()["usage"]
    assert by_prompt.json()["choices"][0]["message"] == by_messages.json()["choices"][0]["message"]
    with client.stream("POST", "/v1/audio/chat", data={"prompt": "Describe it.", "max_tokens": "3",
                                                        "stream": "true", "include_usage": "true"}, files=files) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 3


def test_whole_answer_equals_the_stream_and_keeps_its_ttft(client):
    """Without stream the engine sends only the finished answer (vLLM's FINAL_ONLY): the same
    greedy text, token count and logprobs as the streamed deltas, n choices included, and
    the request's TTFT still the first token's (vLLM's timing), not the answer's end."""
    tokens = 192
    body = chat_body(audio_part(audio_file()), max_tokens=tokens, ignore_eos=True, logprobs=True, top_logprobs=2)
    before = client.get("/metrics").text
    started = time.perf_counter()
    whole = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    after = client.get("/metrics").text
    assert whole.status_code == 200, whole.text
    assert metric(after, "mdl_ttft_seconds_count") - metric(before, "mdl_ttft_seconds_count") == 1
    ttft = metric(after, "mdl_ttft_seconds_sum") - metric(before, "mdl_ttft_seconds_sum")
    assert 0 < ttft < elapsed / 4, (ttft, elapsed)  # one prefill against 191 decode steps
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [e for e in _sse(r) if e != "[DONE]"]
    streamed = [e["choices"][0] for e in chunks if e["choices"]]
    answer = whole.json()["choices"][0]
    assert answer["message"]["content"] == "".join(c["delta"].get("content") or "" for c in streamed)
    assert answer["finish_reason"] == streamed[-1]["finish_reason"] == "length"
    assert whole.json()["usage"]["completion_tokens"] == tokens
    whole_logprobs = answer["logprobs"]["content"]
    assert len(whole_logprobs) == tokens
    assert whole_logprobs == [t for c in streamed if c.get("logprobs") for t in c["logprobs"]["content"]]
    sampled = client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file()), max_tokens=tokens,
                                                                  ignore_eos=True, n=2, temperature=1, seed=7))
    assert sampled.status_code == 200, sampled.text
    assert [c["index"] for c in sampled.json()["choices"]] == [0, 1]
    assert sampled.json()["usage"]["completion_tokens"] == 2 * tokens


def test_request_id_echoed_or_assigned(client):
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    for insane in ("bad id with spaces", "x" * 300, "<script>"):
        r = client.get("/v1/models", headers={"X-Request-ID": insane})
        assert r.headers["x-request-id"] != insane and len(r.headers["x-request-id"]) == 32


def test_metrics_exposes_contract(client):
    client.post("/v1/chat/completions", json=chat_body(audio_part(audio_file()), max_tokens=3))
    text = client.get("/metrics").text
    assert metric(text, "mdl_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(text, "mdl_request_duration_seconds_count", route="/v1/chat/completions") >= 1
    for histogram in ("mdl_ttft_seconds", "mdl_time_to_engine_seconds", "mdl_queue_wait_seconds", "mdl_decode_seconds",
                      "mdl_audio_decode_seconds"):
        assert metric(text, histogram + "_count") >= 1, histogram
    # every request with a first token was submitted to the engine first
    assert metric(text, "mdl_time_to_engine_seconds_count") >= metric(text, "mdl_ttft_seconds_count")
    assert metric(text, "mdl_audio_seconds_total") >= 2.0
    assert metric(text, "mdl_engine_up") == 1
    for gauge in ("mdl_clips_in_flight", "mdl_queue_length", "mdl_engine_running_requests",
                  "mdl_engine_waiting_requests", "mdl_engine_kv_cache_usage_ratio"):
        metric(text, gauge)
    for reason in ("queue_full", "unauthorized", "payload_too_large", "bad_request", "draining", "timeout"):
        metric(text, "mdl_rejections_total", reason=reason)
    assert "vllm:num_requests_running" in text  # vLLM's own metrics are served too


def test_openai_client_chat_input_audio(oai):
    data = audio_file("wav", 44100, 2)
    completion = oai.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}},
            {"type": "text", "text": "Caption the audio."}]}],
    )  # fmt: skip
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 4


def test_openai_client_streaming(oai):
    stream = oai.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": b64(audio_file("mp3", 48000, 2)), "format": "mp3"}}]}],
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 4


def test_openai_client_transcription_upload(oai, tmp_path):
    path = tmp_path / "clip.flac"
    path.write_bytes(audio_file("flac", 22050, 2))
    with path.open("rb") as f:
        result = oai.audio.transcriptions.create(model=MODEL, file=f, extra_body={"max_completion_tokens": 4})
    assert result.text
    with path.open("rb") as f:
        text = oai.audio.transcriptions.create(model=MODEL, file=f, response_format="text",
                                               extra_body={"max_completion_tokens": 4})
    assert isinstance(text, str) and text == result.text
    with path.open("rb") as f:
        events = list(oai.audio.transcriptions.create(model=MODEL, file=f, stream=True,
                                                      extra_body={"max_completion_tokens": 4}))
    assert events[-1].type == "transcript.text.done" and events[-1].text == result.text


@pytest.mark.parametrize("read_to_the_end", [True, False])
def test_a_stream_read_to_done_counts_as_200_not_as_the_client_closing_it(client, read_to_the_end):
    """uvicorn answers the disconnect listener as soon as the last body chunk is sent, so
    a stream that ended normally must not be taken for a client that left (499): on the
    H200 every completed stream was counted so, whether its client read to the end or
    closed at [DONE] (benchmarks/results/2026-12-02-h200-modes)."""

    def counts() -> tuple[float, float]:
        text = client.get("/metrics").text
        found = []
        for status in ("200", "499"):
            try:
                found.append(metric(text, "mdl_requests_total", route="/v1/chat/completions", status=status))
            except KeyError:
                found.append(0.0)
        return found[0], found[1]

    ok_before, closed_before = counts()
    body = chat_body(audio_part(audio_file()), max_tokens=3, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]" and not read_to_the_end:
                break  # the client closes its connection at [DONE], as bench serve does
    deadline = time.monotonic() + 60  # the count follows the response's last byte
    while sum(counts()) < ok_before + closed_before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    ok_after, closed_after = counts()
    assert (ok_after - ok_before, closed_after - closed_before) == (1, 0)
