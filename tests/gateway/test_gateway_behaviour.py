"""Gateway behaviour the model does not affect, in process with the fake engine: request
timeouts, client disconnects, engine death, backpressure, auth before the body. No test
here depends on machine speed: the fake engine makes progress only when a test opens its
gate, and waits are on conditions with generous deadlines."""

import asyncio
import base64
import io
import json
import logging
import time

import numpy as np
import pytest
import soundfile

from mdlserve.server.engine import Completion, Step
from mdlserve.server.errors import EngineAborted
from mdlserve.server.settings import Settings

from .fake_engine import FakeEngine
from .helpers import audio_file, metric
from .inprocess import chat_body, raw_chat, raw_upload, running_gateway, spawn, until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def held_engine(free_steps: int = 0) -> FakeEngine:
    engine = FakeEngine(tokens=4, free_steps=free_steps)
    engine.gate.clear()
    return engine


async def test_request_timeout_is_a_504_and_leaves_the_engine():
    async with running_gateway(held_engine(), request_timeout=0.2) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        assert "--request-timeout" in response.json()["error"]["message"]
        assert gw.engine.running == set() and len(gw.engine.aborted) == 1
        assert gw.state.admission.in_flight == 0
        assert 'mdl_rejections_total{reason="timeout"} 1.0' in (await gw.client.get("/metrics")).text


async def test_latency_counts_from_the_request_not_from_its_parsed_body():
    """TTFT and time-to-engine (and vLLM's arrival_time) start when the request arrives: a
    body still uploading is part of the wait its client sees. They used to start once the
    body was read and parsed, leaving upload and parsing out (6 ms of a 36 ms first token
    on the CPU VM)."""
    body = json.dumps(chat_body(stream=True)).encode()
    halfway: list[float] = []

    async def upload():
        yield body[: len(body) // 2]
        halfway.append(time.time())
        await asyncio.sleep(0.3)  # the rest of the body arrives later
        yield body[len(body) // 2 :]

    async with running_gateway(FakeEngine()) as gw:
        before = (await gw.client.get("/metrics")).text
        response = await gw.client.post(
            "/v1/chat/completions", content=upload(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        after = (await gw.client.get("/metrics")).text
    (arrival,) = gw.engine.arrival_times
    assert arrival < halfway[0]
    for histogram in ("mdl_time_to_engine_seconds_sum", "mdl_ttft_seconds_sum"):
        assert metric(after, histogram) - metric(before, histogram) >= 0.3, histogram


async def test_streaming_timeout_ends_the_stream_with_an_error_event():
    async with running_gateway(held_engine(free_steps=1), request_timeout=0.2) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "w0 "
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert gw.engine.running == set() and len(gw.engine.aborted) == 1
        assert gw.state.admission.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_engine_request(stream):
    async with running_gateway(held_engine(free_steps=1)) as gw:
        exchange = raw_chat(gw.app, stream=stream)
        task = spawn(exchange.run())
        await until(lambda: gw.engine.running, "the request reached the engine")
        if stream:
            await until(lambda: exchange.chunks, "the first SSE event was sent")
        exchange.disconnect()
        await task
        assert gw.engine.running == set() and len(gw.engine.aborted) == 1
        assert gw.state.admission.in_flight == 0
        assert exchange.status == (200 if stream else 499)  # a stream's 200 had gone out before
        assert gw.engine.gate.is_set() is False  # the engine never finished it: it was aborted
        # Either way it is counted (and logged) as the client closing the request.
        metrics = (await gw.client.get("/metrics")).text
        assert 'mdl_requests_total{route="/v1/chat/completions",status="499"} 1.0' in metrics
        assert 'mdl_requests_total{route="/v1/chat/completions",status="200"}' not in metrics


async def test_client_leaving_a_streamed_transcript_aborts_every_window():
    """Four windows, each held after its first token: the client leaves after the first event.
    The stream is closed from a cancelled scope; every window's engine request is aborted
    and its slot released all the same (not only the first window's)."""
    async with running_gateway(held_engine(free_steps=1)) as gw:
        exchange = raw_upload(gw.app, "/v1/audio/transcriptions", audio_file("flac", seconds=100), stream="true")
        task = spawn(exchange.run())
        await until(lambda: exchange.chunks, "the first SSE event was sent")
        assert len(gw.engine.running) == 4
        exchange.disconnect()
        await task
        assert gw.engine.running == set() and len(gw.engine.aborted) == 4
        assert gw.state.admission.in_flight == 0


@pytest.mark.parametrize("kind", ["chat", "chat stream", "transcript stream"])
async def test_a_request_frees_its_slots_before_its_client_sees_its_end(kind):
    """A closed-loop client sends its next request as soon as one ends. By then the slots of
    the one that ended are free: from the body chunk that carries the last finish (the
    chat's finish_reason, the transcript's done event; every window of a 100 s transcript)
    on, no unit is in use, so a full server does not refuse that next request and the
    in-flight gauge never shows more requests than clients have in flight."""
    async with running_gateway() as gw:
        if kind == "transcript stream":
            audio = audio_file("flac", seconds=100)
            exchange, last = raw_upload(gw.app, "/v1/audio/transcriptions", audio, stream="true"), b"transcript.text.done"
        else:
            exchange, last = raw_chat(gw.app, stream=kind == "chat stream", n=2), b'"finish_reason":"length"'
        in_use: list[tuple[bytes, int]] = []
        exchange.on_chunk = lambda chunk: in_use.append((chunk, gw.state.admission.units.value))
        await exchange.run()
        assert exchange.status == 200
        end = next(i for i, (chunk, _) in enumerate(in_use) if last in chunk)
        assert [units for _, units in in_use[end:]] == [0] * (len(in_use) - end)
        assert gw.state.admission.units.value == gw.state.admission.in_flight == 0


@pytest.mark.parametrize("kind", ["chat", "transcript"])
async def test_a_stream_whose_client_left_as_its_headers_went_out_is_aborted(kind):
    """The SSE body never starts (the client left first): every engine request is aborted
    and every slot released all the same (a 100 s transcript is 4 windows)."""
    async with running_gateway(held_engine(free_steps=1)) as gw:
        if kind == "chat":
            exchange, requests = raw_chat(gw.app, stream=True), 1
        else:
            audio = audio_file("flac", seconds=100)
            exchange, requests = raw_upload(gw.app, "/v1/audio/transcriptions", audio, stream="true"), 4
        exchange.leave_at_headers = True
        await exchange.run()
        assert exchange.status == 200 and exchange.chunks == []
        assert gw.engine.running == set() and len(gw.engine.aborted) == requests
        assert gw.state.admission.in_flight == 0


async def test_engine_death_fails_requests_fast_and_turns_probes_false():
    async with running_gateway(held_engine()) as gw:
        exits = []
        gw.state.request_exit = lambda: exits.append(True)
        in_flight = spawn(gw.client.post("/v1/chat/completions", json=chat_body()))
        await until(lambda: gw.engine.running, "the request reached the engine")
        gw.engine.kill()
        response = await in_flight
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert (await gw.client.get("/health/ready")).status_code == 503
        assert (await gw.client.get("/health/live")).json()["status"] == "dead"
        refused = await gw.client.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert gw.engine.submitted and len(gw.engine.submitted) == 1  # the new one never reached it
        assert exits == [True]
        assert "mdl_engine_up 0.0" in (await gw.client.get("/metrics")).text


async def test_engine_death_ends_requests_still_preparing_with_a_503_not_a_cancelled_500():
    """A request still being prepared (decoding, fetching) when the engine dies is answered
    503 at once: the server is about to exit, and its shutdown would cancel the request."""
    async with running_gateway(held_engine()) as gw:
        gw.state.request_exit = lambda: None
        preparing, never = asyncio.Event(), asyncio.Event()

        async def stuck_prepare(*args, **kwargs):
            preparing.set()
            await never.wait()

        gw.state.builder.prepare = stuck_prepare
        in_flight = spawn(gw.client.post("/v1/chat/completions", json=chat_body()))
        await until(preparing.is_set, "the request is being prepared")
        gw.engine.kill()
        await until(lambda: gw.state.engine.gone, "the health watch saw the engine die")
        response = await asyncio.wait_for(in_flight, 60)  # without the rule: never answered here
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert not gw.engine.submitted
        assert gw.state.admission.in_flight == 0


async def test_engine_death_mid_stream_is_an_error_event():
    async with running_gateway(held_engine(free_steps=1)) as gw:
        streaming = spawn(gw.client.post("/v1/chat/completions", json=chat_body(stream=True)))
        await until(lambda: gw.engine.running, "the request reached the engine")
        gw.engine.kill()
        response = await streaming
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        assert events[-1] == "[DONE]"
        assert gw.state.admission.in_flight == 0


async def test_engine_that_fails_to_start_is_not_ready_and_refuses_work():
    engine = FakeEngine()
    engine.fail_start = True
    import httpx

    from mdlserve.server.app import create_app
    from mdlserve.server.settings import Settings

    app = create_app(Settings(model="fake"), engine=engine)
    async with app.router.lifespan_context(app):
        await until(lambda: app.state.gateway.engine.gone, "the start failed")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
            assert (await client.get("/health/ready")).status_code == 503
            assert (await client.get("/health/live")).status_code == 503
            response = await client.post("/v1/chat/completions", json=chat_body())
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"


async def test_backpressure_admits_capacity_then_429_then_completes_all():
    async with running_gateway(held_engine(), max_num_seqs=1, max_queue=1) as gw:
        admitted = [spawn(gw.client.post("/v1/chat/completions", json=chat_body())) for _ in range(2)]
        await until(lambda: len(gw.engine.running) == 2, "two requests in the engine")
        refused = await gw.client.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        gw.engine.gate.set()
        answers = await asyncio.gather(*admitted)
        assert [r.status_code for r in answers] == [200, 200]
        assert [r.json()["choices"][0]["message"]["content"] for r in answers] == ["w0 w1 w2 w3 "] * 2
        assert gw.state.admission.in_flight == 0
        too_big = await gw.client.post("/v1/chat/completions", json=chat_body(n=3))
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_too_large"


async def test_401_comes_before_the_body_is_read():
    async with running_gateway(api_keys="secret-key") as gw:
        exchange = raw_chat(gw.app, headers=[(b"authorization", b"Bearer wrong-key")])
        await exchange.run()
        assert exchange.status == 401
        assert exchange.body_reads == 0
        assert json.loads(b"".join(exchange.chunks))["error"]["code"] == "invalid_api_key"
        ok = raw_chat(gw.app, headers=[(b"authorization", b"Bearer secret-key")])
        await ok.run()
        assert ok.status == 200 and ok.body_reads == 1


async def test_api_keys_never_reach_logs_or_metrics(caplog):
    caplog.set_level(logging.DEBUG, logger="mdlserve")
    async with running_gateway(api_keys="key-valid-1234,key-other-5678") as gw:
        tried = "key-tried-9999"
        for key in ("key-valid-1234", tried):
            await gw.client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {key}"})
        metrics = (await gw.client.get("/metrics")).text
        assert 'mdl_requests_total{route="/v1/chat/completions",status="401"} 1.0' in metrics
        assert 'mdl_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/v1/chat/completions" in logged  # the access log did record both requests
    for secret in ("key-valid-1234", "key-other-5678", tried):
        assert secret not in logged and secret not in metrics


def heaviest_accepted_body(settings: Settings) -> bytes:
    """A chat body at --max-upload-bytes whose base64 WAV (16 kHz, 16-bit) is as long as the
    body allows, under --max-audio-seconds: the most bytes to read and parse, base64 to
    decode and audio to decode that the default limits accept (about 614 s of audio)."""
    room = settings.max_upload_bytes - 1024  # the JSON around the audio
    frames = (room * 3 // 4 - 44) // 2
    assert frames / 16000 < settings.max_audio_seconds
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(frames, np.int16), 16000, format="WAV", subtype="PCM_16")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode()}}
    body = json.dumps(chat_body([part], max_tokens=4)).encode()
    assert settings.max_upload_bytes - 2048 < len(body) <= settings.max_upload_bytes
    return body


async def test_heaviest_accepted_request_does_not_stall_the_liveness_probe():
    """The heaviest request the default limits accept (heaviest_accepted_body) while
    /health/live is probed: every probe answers within 250 ms until the request reaches the
    engine. Measured as the event loop thread's CPU time while the probe waits
    (time.thread_time in this coroutine, which runs on the loop's thread): the work that
    held the loop meanwhile, whatever its kind, and not the wall time, which on a busy
    machine also counts other processes' turns on the CPU. (Work in the worker threads does
    not count: parsing, base64 and audio decoding there release the GIL or hold it briefly.)"""
    settings = Settings(model="fake")
    body = heaviest_accepted_body(settings)
    async with running_gateway(held_engine()) as gw:
        heavy = spawn(
            gw.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        )
        probes = []
        while not gw.engine.running and not heavy.done():
            started = time.thread_time()
            assert (await gw.client.get("/health/live")).status_code == 200
            probes.append(time.thread_time() - started)
            await asyncio.sleep(0.005)
        gw.engine.gate.set()
        response = await heavy
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 3000  # the audio did reach the engine
        assert len(probes) >= 2, "the request went through before it could be probed"
        assert max(probes) < 0.25, f"slowest probe {max(probes):.3f} s of event loop CPU time"


class StaggeredChoicesEngine(FakeEngine):
    """n choices that do not run in step: choice 1 ends in the first output, before the
    others have produced anything (as with n > 1 spread over data-parallel replicas)."""

    async def generate(self, request, request_id, arrival_time):
        n = request.sampling.n
        yield Step([Completion(1, "early", 1, "length")], request.prompt_tokens)
        yield Step([Completion(k, "late", 1, "length") for k in range(n) if k != 1], request.prompt_tokens)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_choice_is_answered_when_choices_end_out_of_step(stream):
    async with running_gateway(StaggeredChoicesEngine()) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body(n=3, temperature=1, stream=stream))
        assert response.status_code == 200
        if stream:
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            texts = {}
            for chunk in chunks:
                for choice in chunk["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
        else:
            texts = {c["index"]: c["message"]["content"] for c in response.json()["choices"]}
        assert texts == {0: "late", 1: "early", 2: "late"}


class AbortingEngine(FakeEngine):
    """The engine aborts the request itself after one token, as vLLM does for requests a
    dying data-parallel replica held (VllmEngine raises EngineAborted for that)."""

    async def generate(self, request, request_id, arrival_time):
        yield Step([Completion(0, "w0 ", 1, None)], request.prompt_tokens)
        raise EngineAborted()


async def test_a_request_the_engine_aborts_is_a_503_not_a_cut_off_answer():
    async with running_gateway(AbortingEngine()) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
        streamed = await gw.client.post("/v1/chat/completions", json=chat_body(stream=True))
        events = [line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        assert not any('"finish_reason":"abort"' in e for e in events)
        assert gw.state.admission.in_flight == 0


def far_deadline() -> float:
    return asyncio.get_running_loop().time() + 600


async def test_a_body_waits_for_the_body_budget_unread_then_passes():
    """While other requests hold the whole --max-body-bytes-in-flight, a request's body is
    not read; it proceeds, in order, once they give their bytes back."""
    async with running_gateway(max_body_bytes_in_flight=4096) as gw:
        budget = gw.app.state.body_budget
        others = await budget.take(4096, far_deadline())
        exchange = raw_chat(gw.app)
        task = spawn(exchange.run())
        await until(lambda: len(budget._waiting) == 1, "the request waits for the body budget")
        assert exchange.body_reads == 0 and exchange.status is None
        others.release()
        await task
        assert exchange.status == 200
        assert budget.used == 0


async def test_a_body_budget_full_until_the_body_deadline_is_a_429_before_the_body():
    async with running_gateway(max_body_bytes_in_flight=4096, request_timeout=0.2) as gw:
        budget = gw.app.state.body_budget
        others = await budget.take(4096, far_deadline())
        exchange = raw_chat(gw.app)
        await exchange.run()
        assert exchange.status == 429 and exchange.body_reads == 0
        error = json.loads(b"".join(exchange.chunks))["error"]
        assert error["code"] == "queue_full" and "--max-body-bytes-in-flight" in error["message"]
        assert budget.used == 4096 and not budget._waiting
        others.release()
        assert gw.state.admission.in_flight == 0
        assert (await gw.client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_a_request_gives_its_body_bytes_back_when_it_reaches_the_engine():
    """The budget bounds bodies being read and prepared; a request running in the engine
    (held there by the fake engine's gate) no longer counts against it."""
    async with running_gateway(held_engine(), max_body_bytes_in_flight=1 << 20) as gw:
        budget = gw.app.state.body_budget
        request = spawn(gw.client.post("/v1/chat/completions", json=chat_body()))
        await until(lambda: gw.engine.running, "the request reaches the engine")
        assert budget.used == 0
        gw.engine.gate.set()
        assert (await request).status_code == 200


async def test_the_body_budget_serves_in_order_and_survives_cancelled_waiters():
    from mdlserve.server.middleware import BodyBudget

    budget = BodyBudget(100)
    first = await budget.take(60, far_deadline())
    big = spawn(budget.take(80, far_deadline()))
    small = spawn(budget.take(10, far_deadline()))  # would fit now, but waits its turn
    gone = spawn(budget.take(50, far_deadline()))
    await until(lambda: len(budget._waiting) == 3, "three waiters")
    gone.cancel()
    await until(lambda: len(budget._waiting) == 2, "the cancelled waiter left the line")
    assert not small.done()
    first.release()
    granted_big, granted_small = await big, await small
    assert budget.used == 90
    granted_big.release()
    granted_small.release()
    granted_small.release()  # idempotent
    assert budget.used == 0
    assert (await budget.take(500, far_deadline())).size == 100  # larger than the budget: all of it
    loop = asyncio.get_running_loop()
    assert await budget.take(1, loop.time() + 0.01) is None  # full until its deadline
    assert budget.used == 100 and not budget._waiting
