"""Long audio on the real tiny engine in process.

--max-audio-seconds is the real limit end to end (issue 10, section 4): a clip exactly at
the limit is answered although its tokens exceed the encoder budget vLLM picks by default
for an engine built as the gateway builds it (2048 tokens: 409 s); one just past the limit
is refused from its header, before anything is decoded.

Transcriptions cut long audio into 30 s windows, one engine request each: a request's
windows are admitted as a whole (400 when they could never fit, 429 when they do not fit
now, never a 429 after some of them went to the engine), and a streamed transcript starts
with the first window's text while later windows still wait. The engine's `generate` is
wrapped (`EngineLog`) to see which windows reached it and to hold the last one back.
"""

import asyncio
import io
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
import soundfile
from fastapi import FastAPI

from mdlserve.model_plugin.processing import SAMPLE_RATE, num_audio_tokens
from mdlserve.server import engine
from mdlserve.server.app import create_app
from mdlserve.server.engine import Step, engine_config
from mdlserve.server.errors import EngineAborted
from mdlserve.server.request import PreparedRequest
from mdlserve.server.settings import Settings
from mdlserve.server.transcripts import WINDOW_SECONDS

from .helpers import b64, metric
from .inprocess import DEADLINE_S, RawExchange, chat_body, raw_upload, spawn, until

pytestmark = pytest.mark.anyio
ENGINE_START_S = 900  # vLLM's start on a busy 2-core machine
LIMIT_S = 450  # 2250 audio tokens, more than vLLM's default budget of 2048


@pytest.fixture
def anyio_backend():
    return "asyncio"


def settings(checkpoint: str, **overrides) -> Settings:
    return Settings(
        model=checkpoint,
        enforce_eager=True,
        dtype="float32",
        max_model_len=4096,
        max_num_seqs=2,
        kv_cache_bytes=1 << 30,
        max_audio_seconds=LIMIT_S,
        max_upload_bytes=64 << 20,
        **overrides,
    )


def quiet_flac(seconds: float) -> bytes:
    """A low tone (compresses well, unlike noise) of exactly `seconds`."""
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.01 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def audio_request(seconds: float) -> dict:
    part = {"type": "input_audio", "input_audio": {"data": b64(quiet_flac(seconds)), "format": "flac"}}
    return chat_body([part, {"type": "text", "text": "Caption the audio."}], max_tokens=1, temperature=0)


@pytest.mark.slow
async def test_audio_at_the_limit_is_answered_and_past_it_refused_before_decoding(tiny_checkpoint):
    app = create_app(settings(tiny_checkpoint))
    async with app.router.lifespan_context(app):
        engine = app.state.gateway.engine
        await until(lambda: engine.up or engine.gone, "the engine started", deadline_s=ENGINE_START_S)
        assert app.state.gateway.engine.up
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://g", timeout=DEADLINE_S * 5) as client:
            at_limit = await client.post("/v1/chat/completions", json=audio_request(LIMIT_S))
            assert at_limit.status_code == 200, at_limit.text
            assert at_limit.json()["usage"]["prompt_tokens"] > num_audio_tokens(LIMIT_S * SAMPLE_RATE)
            decoded = metric((await client.get("/metrics")).text, "mdl_audio_seconds_total")
            assert decoded == pytest.approx(LIMIT_S)

            past = await client.post("/v1/chat/completions", json=audio_request(LIMIT_S + 0.5))
            assert past.status_code == 400, past.text
            error = past.json()["error"]
            assert error["code"] == "invalid_audio" and "longer than the limit of 450 s" in error["message"]
            # Refused from the header: not one more second was decoded.
            assert metric((await client.get("/metrics")).text, "mdl_audio_seconds_total") == decoded


def test_engine_step_budget_is_vllms_offline_default(tiny_checkpoint):
    """Not vLLM's 2048 for an engine built as the gateway builds it: `vllm.LLM`'s default for
    the hardware, 4096 for one CPU worker (16384 on an H200)."""
    assert engine_config(settings(tiny_checkpoint)).scheduler_config.max_num_batched_tokens == 4096
    given = settings(tiny_checkpoint, max_num_batched_tokens=3000)
    assert engine_config(given).scheduler_config.max_num_batched_tokens == 3000


def test_engine_budget_follows_the_audio_limit(tiny_checkpoint, monkeypatch):
    needed = num_audio_tokens(LIMIT_S * SAMPLE_RATE)
    monkeypatch.setattr(engine, "default_step_tokens", lambda args: 2048)  # below one clip at the limit
    assert engine_config(settings(tiny_checkpoint)).scheduler_config.max_num_batched_tokens == needed
    with pytest.raises(ValueError, match=f"--max-num-batched-tokens 1024 is below the {needed} tokens"):
        engine_config(settings(tiny_checkpoint, max_num_batched_tokens=1024))


# Transcription admission: 2 running (settings()) + 2 queued clip slots.
CAPACITY = dict(max_queue=2)
FITS_S = 100  # 4 windows: 30, 30, 30 and 10 s
TOO_LONG_S = 130  # 5 windows
TRANSCRIBE = "/v1/audio/transcriptions"


def stepped_flac(seconds: float) -> bytes:
    """A tone whose amplitude tells its 30 s window: 0.01 in the first, 0.02 in the second..."""
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    amplitude = 0.01 * (1 + np.floor(t / WINDOW_SECONDS))
    buffer = io.BytesIO()
    soundfile.write(buffer, (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def window_of(request: PreparedRequest) -> int:
    clip = request.clips[0]  # 16-bit FLAC at 16 kHz mono: int16 PCM
    return round(float(np.abs(clip.astype(np.float32) * 2**-15).max()) / 0.01) - 1


class EngineLog:
    """Wraps the real engine's `generate`: records the window of every engine request and the
    text it produced; a window in `held` is not submitted until `release` is set, and then
    fails with `fail_held` when that is given."""

    def __init__(self, app: FastAPI, held: frozenset[int] = frozenset(), fail_held: Exception | None = None):
        self.submitted: list[int] = []
        self.texts: dict[int, str] = {}
        self.held = held
        self.fail_held = fail_held
        self.release = asyncio.Event()
        vllm_engine = app.state.gateway.engine.engine
        self._generate = vllm_engine.generate
        vllm_engine.generate = self.generate

    async def generate(self, request: PreparedRequest, request_id: str, arrival_time: float) -> AsyncGenerator[Step]:
        window = window_of(request)
        if window in self.held:
            await self.release.wait()
            if self.fail_held is not None:
                raise self.fail_held
        self.submitted.append(window)
        stream = self._generate(request, request_id, arrival_time)
        try:
            async for step in stream:
                self.texts[window] = self.texts.get(window, "") + "".join(c.text for c in step.completions)
                yield step
        finally:
            await stream.aclose()


@asynccontextmanager
async def real_gateway(checkpoint: str, **overrides) -> AsyncIterator[FastAPI]:
    app = create_app(settings(checkpoint, **overrides))
    async with app.router.lifespan_context(app):
        engine = app.state.gateway.engine
        await until(lambda: engine.up or engine.gone, "the engine started", deadline_s=ENGINE_START_S)
        assert engine.up
        yield app


def transcription(app: FastAPI, seconds: float, body_ready: asyncio.Event | None = None, **fields: str) -> RawExchange:
    """For the raw ASGI caller, which can withhold the body and, unlike httpx's ASGITransport,
    hands over each SSE event as it is sent."""
    return raw_upload(app, TRANSCRIBE, stepped_flac(seconds), body_ready, max_completion_tokens="4", **fields)


def answer(exchange: RawExchange) -> dict:
    return json.loads(b"".join(exchange.chunks))


def sse_data(exchange: RawExchange) -> list[str]:
    return [e.removeprefix("data: ") for e in b"".join(exchange.chunks).decode().split("\n\n") if e]


async def test_transcription_that_could_never_fit_is_a_400_naming_the_numbers(tiny_checkpoint):
    """5 windows of 4 slots: before, windows were admitted one by one and the fifth got a 429
    ("4 of 4 clip slots in use") that no retry could ever pass, after four had gone to the engine."""
    async with real_gateway(tiny_checkpoint, **CAPACITY) as app:
        log = EngineLog(app)
        too_long = transcription(app, TOO_LONG_S)
        await too_long.run()
        assert too_long.status == 400, answer(too_long)
        error = answer(too_long)["error"]
        assert error["code"] == "request_too_large"
        assert error["message"] == (
            "the request needs 5 sequence slots (one per 30 s window of its 130.0 s of audio) "
            "but the server admits at most 4"
        )
        assert log.submitted == [] and app.state.gateway.admission.in_flight == 0

        fits = transcription(app, FITS_S, response_format="verbose_json")
        await fits.run()
        assert fits.status == 200, answer(fits)
        assert [s["start"] for s in answer(fits)["segments"]] == [0, 30, 60, 90]
        assert sorted(log.submitted) == [0, 1, 2, 3] and app.state.gateway.admission.in_flight == 0


async def test_concurrent_transcriptions_are_admitted_whole_or_refused_whole(tiny_checkpoint):
    """Three 4-window transcriptions, each of which fits 4 slots alone, all reserved (one slot
    each, as their headers arrive) before any is admitted. Before, each admitted its windows
    one by one and got a 429 after some had gone to the engine, all three refused. Now a
    request is admitted with all its windows or refused before any reaches the engine, and a
    refused request gives its reservation back at once, so the last to be admitted fits."""
    async with real_gateway(tiny_checkpoint, **CAPACITY) as app:
        log = EngineLog(app)
        admission = app.state.gateway.admission
        bodies = asyncio.Event()
        exchanges = [transcription(app, FITS_S, body_ready=bodies) for _ in range(3)]
        tasks = [spawn(exchange.run()) for exchange in exchanges]
        await until(lambda: admission.units.value == 3, "all three reserved a slot")
        bodies.set()
        await asyncio.gather(*tasks)

        served = [e for e in exchanges if e.status == 200]
        refused = [e for e in exchanges if e.status != 200]
        assert served, [answer(e) for e in exchanges]
        for exchange in refused:
            assert exchange.status == 429, answer(exchange)
            assert "this request needs 4" in answer(exchange)["error"]["message"]
        # Only the served requests' windows reached the engine, each window once.
        assert sorted(log.submitted) == sorted([0, 1, 2, 3] * len(served))
        assert admission.in_flight == 0

        # The refusals were honest: alone, the same request is served.
        for _ in refused:
            retry = transcription(app, FITS_S)
            await retry.run()
            assert retry.status == 200, answer(retry)


async def test_streamed_transcription_sends_the_first_window_while_the_last_is_held(tiny_checkpoint):
    """The last window is held out of the engine until the stream's first event has come;
    before, the response waited for every window's first token, so no event ever came.
    Afterwards the events carry the windows' texts in window order, and concatenate to the
    done event's text."""
    async with real_gateway(tiny_checkpoint, **CAPACITY) as app:
        log = EngineLog(app, held=frozenset({3}))
        exchange = transcription(app, FITS_S, stream="true")
        task = spawn(exchange.run())
        await until(lambda: exchange.chunks, "the first event", deadline_s=DEADLINE_S * 5)
        assert exchange.status == 200 and 3 not in log.submitted
        log.release.set()
        await task

        events = sse_data(exchange)
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e) for e in events[:-2]]
        done = json.loads(events[-2])
        assert {d["type"] for d in deltas} == {"transcript.text.delta"} and done["type"] == "transcript.text.done"
        texts = [log.texts.get(w, "").strip() for w in range(4)]
        assert "".join(d["delta"] for d in deltas) == done["text"] == " ".join(t for t in texts if t)
        assert app.state.gateway.admission.in_flight == 0


async def test_streamed_transcription_failing_after_it_started_ends_with_an_error_event(tiny_checkpoint):
    """Once the 200 has gone out, a later window's failure is the stream's last event (as in
    chat streams), and every window's engine request and slots are given back."""
    async with real_gateway(tiny_checkpoint, **CAPACITY) as app:
        log = EngineLog(app, held=frozenset({3}), fail_held=EngineAborted())
        exchange = transcription(app, FITS_S, stream="true")
        task = spawn(exchange.run())
        await until(lambda: exchange.chunks, "the first event", deadline_s=DEADLINE_S * 5)
        log.release.set()
        await task

        assert exchange.status == 200
        events = sse_data(exchange)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        assert not any(json.loads(e).get("type") == "transcript.text.done" for e in events[:-1])
        assert 3 not in log.submitted and app.state.gateway.admission.in_flight == 0
