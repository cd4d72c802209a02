"""Faults: the engine process dies, SIGTERM under load, and audio URLs that fail in every
way a remote host can fail."""

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from gateway.helpers import free_port

from .conftest import DRAIN_TIMEOUT_S, FETCH_MAX_BYTES, FETCH_TIMEOUT_S
from .local_http import MisbehavingAudioHost
from .traffic import Outcome, captioning_body, engine_core, send_chat, wait_idle

# A generous deadline for the probes to notice (the engine's health is polled every second;
# a busy machine may delay that): how fast they notice is tested with the fake engine
# (tests/gateway/test_gateway_behaviour.py); this test proves vLLM's death reaches them.
DEATH_NOTICE_S = 30.0
# Long enough that the streams are usually still running when SIGTERM lands (the gated
# audio_url fetch is in flight for certain), short enough to finish inside the drain timeout
# even on a busy shared CPU.
DRAIN_TEST_TOKENS = 200
EXIT_WAIT_S = 30.0


async def _probe(client: httpx.AsyncClient, url: str) -> int | None:
    """Status of GET url, or None when nothing listens any more."""
    try:
        return (await client.get(url, timeout=2)).status_code
    except httpx.HTTPError:
        return None


def test_engine_death_fails_requests_fast_and_turns_health_false(killed_server, reliability_report):
    """SIGKILL of vLLM's EngineCore: in-flight requests end with 503 / an error event instead
    of hanging, readiness and liveness stop saying 200, and the process exits
    non-zero so the orchestrator restarts it. The kill lands as soon as the stream's first
    token is out: 1000 tokens past any end-of-sequence are far from done then."""
    url, pid = killed_server.url, killed_server.process.pid

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            generating = asyncio.Event()
            in_flight = [asyncio.create_task(send_chat(client, url, captioning_body(1000, stream, ignore_eos=True),
                                                       first_event=generating if stream else None))
                         for stream in (False, True, False)]
            await asyncio.wait_for(generating.wait(), timeout=60)
            engine_core(pid).send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            ready = live = 200
            while time.monotonic() - killed_at < DEATH_NOTICE_S and (ready == 200 or live == 200):
                ready, live = await _probe(client, url + "/health/ready"), await _probe(client, url + "/health/live")
                await asyncio.sleep(0.2)
            noticed_s = time.monotonic() - killed_at
            outcomes: list[Outcome] = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=20)
            return ready, live, noticed_s, outcomes, time.monotonic() - killed_at

    ready, live, noticed_s, outcomes, answered_s = asyncio.run(run())
    try:
        exit_code = killed_server.process.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        exit_code = None
    failed_cleanly = [o.status == 503 and "engine_unavailable" in o.detail
                      or o.status == 200 and "engine stopped" in o.detail for o in outcomes]
    observed = (f"health after {noticed_s:.1f} s: ready={ready or 'refused'}, live={live or 'refused'}; in-flight: "
                f"{[(o.status, o.detail[:60]) for o in outcomes]} within {answered_s:.1f} s; exit code {exit_code}")
    passed = ready != 200 and live != 200 and all(failed_cleanly) and exit_code not in (0, None)
    assert reliability_report.add_fault(
        "engine process killed (SIGKILL EngineCore)",
        "ready and live not 200 within 30 s; in-flight 503 engine_unavailable (streams: error event); exit != 0",
        observed, passed,
    ), observed


def test_sigterm_under_load_drains_then_exits_zero(drained_server, audio_host, reliability_report):
    """SIGTERM with requests in flight: new work gets 503 at once, readiness turns false, the
    in-flight requests complete, and the process exits 0 within the drain timeout. One of them
    is still fetching its audio_url, held by the host until the probes are done: the drain
    cannot end before them however fast the machine finishes the others."""
    url = drained_server.url
    fetching = captioning_body()
    fetching["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": audio_host.url + "/gated"}}

    def long_body(stream: bool) -> dict:
        return captioning_body(DRAIN_TEST_TOKENS, stream, ignore_eos=True)

    async def run():
        async with httpx.AsyncClient(timeout=DRAIN_TIMEOUT_S + 30) as client:
            streams_started = [asyncio.Event() for _ in range(3)]
            in_flight = [asyncio.create_task(send_chat(client, url, long_body(stream=False))),
                         asyncio.create_task(send_chat(client, url, fetching))]
            in_flight += [asyncio.create_task(send_chat(client, url, long_body(stream=True), first_event=started))
                          for started in streams_started]
            await asyncio.wait_for(asyncio.gather(*(started.wait() for started in streams_started)), timeout=60)
            await asyncio.to_thread(audio_host.gated_fetch_started.wait, 60)
            drained_server.process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            await asyncio.sleep(0.3)
            refused = await send_chat(client, url, captioning_body())
            ready = await _probe(client, url + "/health/ready")
            audio_host.gate.set()
            outcomes = await asyncio.gather(*in_flight)
            return signalled_at, refused, ready, outcomes

    signalled_at, refused, ready, outcomes = asyncio.run(run())
    try:
        exit_code = drained_server.process.wait(timeout=DRAIN_TIMEOUT_S + 15)
    except subprocess.TimeoutExpired:
        exit_code = None
    exit_after_s = time.monotonic() - signalled_at
    observed = (f"new request: {refused.status} {refused.detail[:80]}; ready: {ready}; in-flight: "
                f"{[(o.status, o.complete) for o in outcomes]}; exit code {exit_code} after {exit_after_s:.1f} s")
    passed = (refused.status == 503 and "draining" in refused.detail and ready == 503
              and all(o.complete for o in outcomes) and exit_code == 0)
    assert reliability_report.add_fault(
        "SIGTERM under load",
        f"new requests 503 draining, ready 503, in-flight complete, exit 0 within {DRAIN_TIMEOUT_S} s",
        observed, passed,
    ), observed


@pytest.fixture(scope="module")
def audio_host():
    host = MisbehavingAudioHost(stall_s=FETCH_TIMEOUT_S + 4, oversize=4 * FETCH_MAX_BYTES)
    yield host
    host.close()


# (case, URL path or absolute URL, words the error message must contain)
FETCH_FAILURES = [
    ("DNS failure", "http://nxdomain-alias.test/audio.wav", "does not resolve"),
    ("connection refused", "CLOSED_PORT", "could not connect to audio_url host '127.0.0.1'"),
    ("server never answers", "/stall", "timed out"),
    ("body stalls mid-way", "/stall-body", "timed out"),
    ("truncated body", "/truncated", "closed the connection before the body was complete"),
    ("oversize body (declared)", "/oversize", "exceeds"),
    ("oversize body (undeclared)", "/oversize-undeclared", "exceeds"),
    ("redirect loop", "/loop", "redirected more than"),
    ("HTTP 404", "/missing", "HTTP 404"),
]


@pytest.mark.parametrize(("case", "target", "words"), FETCH_FAILURES, ids=[case for case, _, _ in FETCH_FAILURES])
def test_audio_url_fetch_failure_is_a_clear_client_error(open_server, audio_host, reliability_report, case, target,
                                                         words):
    """Each remote failure ends in a 4xx naming the cause within the fetch timeout (no hang)."""
    if target == "CLOSED_PORT":
        target = f"http://127.0.0.1:{free_port()}/audio.wav"
    elif target.startswith("/"):
        target = audio_host.url + target
    body = captioning_body()
    body["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": target}}
    started = time.perf_counter()
    response = httpx.post(open_server.url + "/v1/chat/completions", json=body, timeout=60)
    elapsed = time.perf_counter() - started
    message = response.json().get("error", {}).get("message", response.text[:200])
    observed = f"{response.status_code} after {elapsed:.1f} s: {message}"
    passed = 400 <= response.status_code < 500 and words in message and elapsed < FETCH_TIMEOUT_S + 10
    assert reliability_report.add_fault(f"audio_url fetch: {case}", f"4xx naming '{words}', within the fetch timeout",
                                        observed, passed), observed


def test_fetch_failures_leave_no_stuck_work(open_server, audio_host, reliability_report):
    """After the fetch failures, stalled fetches still in progress, and good fetches side by side:
    good ones succeed and the server drains to idle."""
    stalled = captioning_body()
    stalled["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": audio_host.url + "/stall"}}
    good = captioning_body()
    good["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": audio_host.url + "/audio.wav"}}

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(send_chat(client, open_server.url, stalled),
                                        send_chat(client, open_server.url, stalled),
                                        send_chat(client, open_server.url, good))

    stalled_a, stalled_b, fetched = asyncio.run(run())
    idle = asyncio.run(wait_idle(open_server.url))
    observed = f"stalled: {stalled_a.status}, {stalled_b.status}; good fetch: {fetched.status}; afterwards {idle}"
    passed = stalled_a.status == stalled_b.status == 400 and fetched.complete and not any(idle.values())
    assert reliability_report.add_fault("audio_url fetch: stalls beside a good fetch",
                                        "stalls 400 at the fetch timeout, good fetch 200, gauges back to 0",
                                        observed, passed), observed
