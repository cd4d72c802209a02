"""Data parallel serving on CPU: one gateway, two tiny engine replicas (`--data-parallel-size
2`, vLLM's engine cores EngineCore_DP0 and EngineCore_DP1 behind a DP coordinator).

Admission doubles (the largest request admitted is 2 x (--max-num-seqs + --max-queue)),
concurrent requests land on both replicas (the per-replica finished counter), and the death
of one replica's engine core is engine death: in-flight requests fail fast, readiness turns
false and the process exits non-zero. One server for the module; its start is slow on a
busy CPU (several engine processes), so every wait has a generous deadline.
"""

import asyncio
import signal
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

from mdlserve.server.engine import engine_args
from mdlserve.server.metrics import GatewayMetrics, engine_stat_logger
from mdlserve.server.settings import Settings

from .helpers import ServerProcess, audio_file, audio_part, chat_body, descendants, metric, named

REPLICAS = 2
MAX_NUM_SEQS = 2
MAX_QUEUE = 1
CAPACITY = REPLICAS * (MAX_NUM_SEQS + MAX_QUEUE)
START_TIMEOUT_S = 900
DEATH_NOTICE_S = 60.0
EXIT_WAIT_S = 60.0


@pytest.fixture(scope="module")
def dp_server(tiny_checkpoint, tmp_path_factory):
    server = ServerProcess(tiny_checkpoint, [
        "--data-parallel-size", str(REPLICAS), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-bytes", str(256 << 20),
    ], tmp_path_factory.mktemp("dp-logs"), fast=False, name="data-parallel")  # fmt: skip
    try:
        server.wait_ready(timeout=START_TIMEOUT_S)
        yield server
    finally:
        server.terminate()


def replica_core(pid: int, replica: int) -> psutil.Process:
    """vLLM's engine core process of one replica (named EngineCore_DP<replica>)."""
    cores = named(descendants(pid), f"EngineCore_DP{replica}")
    if not cores:
        raise LookupError(f"no EngineCore_DP{replica} under pid {pid}")
    return cores[0]


def test_settings_scale_admission_and_reach_vllm():
    settings = Settings(data_parallel_size=3, max_num_seqs=4, max_queue=2)
    assert (settings.admitted_running, settings.admitted_queued) == (12, 6)
    assert engine_args(settings).data_parallel_size == 3


def test_stat_logger_labels_each_replica():
    """vLLM builds one stat logger per engine index: each one's series exist from the start,
    and a replica's stats land under its own label."""
    metrics = GatewayMetrics()
    bridge = engine_stat_logger(metrics)
    loggers = [bridge(None, engine_index) for engine_index in range(2)]
    scheduler = SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.5)
    iteration = SimpleNamespace(finished_requests=[SimpleNamespace(queued_time=0.1)] * 2)
    loggers[1].record(scheduler, iteration, engine_idx=1)
    text = metrics.render().decode()
    assert metric(text, "mdl_engine_running_requests", replica="1") == 3
    assert metric(text, "mdl_engine_waiting_requests", replica="1") == 1
    assert metric(text, "mdl_engine_finished_requests_total", replica="1") == 2
    assert metric(text, "mdl_engine_running_requests", replica="0") == 0
    assert metric(text, "mdl_engine_finished_requests_total", replica="0") == 0


@pytest.mark.slow
def test_admission_scales_with_replicas(dp_server):
    """n = capacity + 1 is refused as never fitting, naming the doubled capacity; n =
    capacity is admitted and answered (one replica alone admits half)."""
    clip = audio_part(audio_file(seconds=1.0))
    too_big = httpx.post(
        dp_server.url + "/v1/chat/completions",
        timeout=120,
        json=chat_body(clip, max_tokens=2, n=CAPACITY + 1, temperature=1),
    )
    assert too_big.status_code == 400, too_big.text
    assert f"admits at most {CAPACITY}" in too_big.text
    fits = httpx.post(
        dp_server.url + "/v1/chat/completions",
        timeout=300,
        json=chat_body(clip, max_tokens=2, n=CAPACITY, temperature=1),
    )
    assert fits.status_code == 200, fits.text
    assert len(fits.json()["choices"]) == CAPACITY


@pytest.mark.slow
def test_concurrent_requests_spread_over_both_replicas(dp_server):
    text = httpx.get(dp_server.url + "/metrics", timeout=30).text
    before = [metric(text, "mdl_engine_finished_requests_total", replica=str(r)) for r in range(REPLICAS)]

    async def send_all():
        async with httpx.AsyncClient(timeout=300) as client:
            body = chat_body(audio_part(audio_file(seconds=1.0)), max_tokens=4)
            return await asyncio.gather(
                *(client.post(dp_server.url + "/v1/chat/completions", json=body) for _ in range(CAPACITY))
            )

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * CAPACITY, [r.text for r in responses]
    finished = before
    deadline = time.monotonic() + 60  # the stats of a replica's last step arrive with its next output batch
    while time.monotonic() < deadline:
        text = httpx.get(dp_server.url + "/metrics", timeout=30).text
        finished = [
            metric(text, "mdl_engine_finished_requests_total", replica=str(r)) - before[r] for r in range(REPLICAS)
        ]
        if sum(finished) >= CAPACITY:
            break
        time.sleep(0.5)
    assert all(count >= 1 for count in finished), finished


@pytest.mark.slow
def test_one_replica_dying_is_engine_death(dp_server):
    """SIGKILL of one replica's engine core takes the whole AsyncLLM down (vLLM's DP): streams
    that replica was generating end with an engine_unavailable error event instead of
    finishing, readiness is no longer 200 and the process exits non-zero for the orchestrator
    to restart it. The kill comes once every stream has its first token, with ~1900 tokens
    still to go, and goes to a replica the per-replica running gauge shows busy: vLLM's
    balancer may put every stream on one replica, and a stream on the replica that lives on
    may legitimately finish while vLLM's client shuts the survivor down (seconds on a busy
    CPU). So every stream ends (none hangs), each either with engine_unavailable or with its
    whole answer (finish_reason "length"), never cut short behind a [DONE], and at least one
    (the dead replica's) with engine_unavailable. There are only as many streams as one
    replica runs at once: a stream queued behind two 1900-token ones would get its first
    token only once they had finished normally."""
    url = dp_server.url
    streams = MAX_NUM_SEQS

    async def stream(client: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> list[str]:
        body = chat_body(audio_part(audio_file(seconds=1.0)), max_tokens=1900, ignore_eos=True, stream=True)
        events = []
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) == 1:
                        counter[0] += 1
                        if counter[0] == streams:
                            started.set()
        return events

    async def busy_replica(client: httpx.AsyncClient) -> int:
        """The replica running the most streams, once the gauges account for all of them (a
        replica's stats arrive with its next output batch)."""
        deadline, running = time.monotonic() + DEATH_NOTICE_S, [0] * REPLICAS
        while time.monotonic() < deadline:
            text = (await client.get(url + "/metrics")).text
            running = [metric(text, "mdl_engine_running_requests", replica=str(r)) for r in range(REPLICAS)]
            if sum(running) == streams:
                return running.index(max(running))
            await asyncio.sleep(0.2)
        raise AssertionError(f"running gauges {running} never added up to {streams} streams")

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            started, counter = asyncio.Event(), [0]
            in_flight = [asyncio.create_task(stream(client, started, counter)) for _ in range(streams)]
            await asyncio.wait_for(started.wait(), timeout=300)
            replica_core(dp_server.process.pid, await busy_replica(client)).send_signal(signal.SIGKILL)
            killed_at, ready = time.monotonic(), 200
            while time.monotonic() - killed_at < DEATH_NOTICE_S and ready == 200:
                try:
                    ready = (await client.get(url + "/health/ready", timeout=5)).status_code
                except httpx.HTTPError:
                    ready = None
                await asyncio.sleep(0.2)
            return ready, await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), timeout=120)

    ready, outcomes = asyncio.run(run())
    assert ready != 200
    for events in outcomes:  # every stream ended (none hung), none cut short
        assert isinstance(events, list), repr(events)
        whole = any('"finish_reason":"length"' in e for e in events) and events[-1] == "data: [DONE]"
        assert whole or any("engine_unavailable" in e for e in events), events[-3:]
    assert any(any("engine_unavailable" in e for e in events) for events in outcomes), [o[-2:] for o in outcomes]
    assert dp_server.process.wait(timeout=EXIT_WAIT_S) not in (0, None)
