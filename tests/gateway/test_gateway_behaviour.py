"""Gateway behaviour the model does not affect, in process with the fake engine: request
timeouts, client disconnects, engine death, backpressure, auth before the body. No test
here depends on machine speed: the fake engine makes progress only when a test opens its
gate, and waits are on conditions with generous deadlines."""

import asyncio
import json
import logging
import time

import pytest

from mdlserve.server.engine import Completion, Step
from mdlserve.server.errors import EngineAborted
from mdlserve.server.settings import Settings

from .fake_engine import FakeEngine
from .inprocess import chat_body, raw_chat, running_gateway, spawn, until

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
        if not stream:
            assert exchange.status == 499
        assert gw.engine.gate.is_set() is False  # the engine never finished it: it was aborted


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


async def test_heaviest_accepted_request_does_not_stall_the_liveness_probe():
    """The largest body the default limits accept (a prompt filling --max-upload-bytes, 25
    MiB, encoded before the measurement) while /health/live is probed: every probe answers
    within 250 ms until the request reaches the engine. Measured as the process's CPU time
    while the probe waits (time.process_time: the loop's thread and any worker that may hold
    the GIL), which bounds what work holding the loop costs it, and not the wall time, which
    on a busy machine also counts other processes' turns on the CPU."""
    limit = Settings().max_upload_bytes
    heavy_text = "word " * ((limit - 200) // 5)
    body = json.dumps(chat_body(heavy_text, max_tokens=4)).encode()
    assert limit - 1024 < len(body) <= limit
    del heavy_text
    async with running_gateway(held_engine(), max_model_len=1 << 26) as gw:
        heavy = spawn(
            gw.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        )
        probes = []
        while not gw.engine.running and not heavy.done():
            started = time.process_time()
            assert (await gw.client.get("/health/live")).status_code == 200
            probes.append(time.process_time() - started)
            await asyncio.sleep(0.01)
        gw.engine.gate.set()
        assert (await heavy).status_code == 200
        assert len(probes) >= 3, "the request went through before it could be probed"
        assert max(probes) < 0.25, f"slowest probe {max(probes):.3f} s of loop CPU time"


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
