"""Load and overload: nothing accepted is lost, excess load is refused cleanly (429 with
Retry-After), long runs do not drift or leak, and abandoned requests leave the engine."""

import asyncio
import re
import time

import httpx
import pytest

from gateway.helpers import ServerProcess
from mdlserve.server.settings import Settings

from .conftest import API_KEY, GUARDED_REQUEST_TIMEOUT_S, MAX_NUM_SEQS, MAX_QUEUE
from .report import LoadRun
from .traffic import (
    Outcome, captioning_body, footprint, gauges, percentile, send_chat, status_counts, wait_idle,
)  # fmt: skip

CAPACITY = MAX_NUM_SEQS + MAX_QUEUE
# Soak bounds: generous, since the machine is shared; a leak shows up as steady growth.
SOAK_RSS_GROWTH_BYTES = 300 << 20
SOAK_FD_GROWTH = 16
SOAK_LATENCY_DRIFT = 3.0
# mdlserve.server.access lines of the chat route (written when a response is done): time
# of day, status, seconds spent.
ACCESS_LINE = re.compile(r"^\S+ (\d\d:\d\d:\d\d,\d{3}) INFO mdlserve\.server\.access \[\w+\] "
                         r"POST /v1/chat/completions (\d{3}) ([\d.]+)s$", re.MULTILINE)
# Output tokens of the request meant to outlive --request-timeout (guarded context 4096,
# prompt ~41).
OUTLIVING_TOKENS = 4000


def test_twice_capacity_every_request_answered_or_refused(open_server, reliability_report, heavy):
    """2x(N+Q) simultaneous requests, half of them streaming, in several waves: each gets a
    complete answer or a 429 with Retry-After; nothing hangs, fails or is cut short."""
    concurrency, waves = 2 * CAPACITY, (10 if heavy else 3)

    async def run() -> tuple[list[Outcome], float]:
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
            for _ in range(waves):
                outcomes += await asyncio.gather(*(
                    send_chat(client, open_server.url, captioning_body(max_tokens=8, stream=i % 2 == 1))
                    for i in range(concurrency)
                ))  # fmt: skip
        return outcomes, time.perf_counter() - started

    outcomes, duration = asyncio.run(run())
    idle = asyncio.run(wait_idle(open_server.url))
    refused = [o for o in outcomes if o.refused]
    lost = [o for o in outcomes if o.lost]
    p99_429 = percentile([o.latency_s for o in refused], 99)
    reliability_report.add_load(LoadRun(
        "overload 2x(N+Q)", len(outcomes), concurrency, duration, len(lost), status_counts(outcomes),
        {"N": MAX_NUM_SEQS, "Q": MAX_QUEUE, "waves": waves, "429_p99_s": round(p99_429, 3),
         "completed": sum(o.complete for o in outcomes)},
    ))  # fmt: skip
    assert not lost, [(o.label, o.detail) for o in lost]
    assert refused, "2x capacity at once should have been partly refused"
    assert sum(o.complete for o in outcomes) >= waves * MAX_NUM_SEQS
    assert p99_429 < 5.0, "a 429 should come back at once, before any audio work"
    assert not any(idle.values()), idle


def _clock(stamp: str) -> float:
    """Seconds since midnight of a log time stamp like 09:29:56,413."""
    hours, minutes, seconds = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_twice_default_capacity_answered_or_refused(tiny_checkpoint, tmp_path, reliability_report, heavy):
    """Heavy only: the same 2x(N+Q) burst against a server on the real defaults (N = Q = 512:
    2048 requests at once): admission at full scale, nothing accepted lost."""
    if not heavy:
        pytest.skip("2048 simultaneous requests: --heavy only")
    defaults = Settings()
    capacity = defaults.max_num_seqs + defaults.max_queue
    concurrency = 2 * capacity
    server = ServerProcess(tiny_checkpoint, ["--request-timeout", "600"], tmp_path, name="defaults")
    try:
        server.wait_ready()

        async def run() -> tuple[list[Outcome], float]:
            limits = httpx.Limits(max_connections=concurrency)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                started = time.perf_counter()
                outcomes = await asyncio.gather(*(
                    send_chat(client, server.url, captioning_body(max_tokens=4, stream=i % 2 == 1))
                    for i in range(concurrency)
                ))  # fmt: skip
                return list(outcomes), time.perf_counter() - started

        outcomes, duration = asyncio.run(run())
        idle = asyncio.run(wait_idle(server.url))
    finally:
        server.terminate()
    refused = [o for o in outcomes if o.refused]
    lost = [o for o in outcomes if o.lost]
    p99_429 = percentile([o.latency_s for o in refused], 99)
    # The client's view includes its own queueing (one Python process, 2048 connections, on
    # the cores the server uses); the server's access log says when and how fast it refused.
    posts = ACCESS_LINE.findall(server.log_path.read_text(errors="replace"))
    served_429 = [(_clock(stamp), float(seconds)) for stamp, status, seconds in posts if status == "429"]
    answered_at = [t for t, _ in served_429]
    reliability_report.add_load(LoadRun(
        "overload 2x(N+Q), default limits", len(outcomes), concurrency, duration, len(lost), status_counts(outcomes),
        {"N": defaults.max_num_seqs, "Q": defaults.max_queue, "429_p99_s": round(p99_429, 3),
         "429_p50_s": round(percentile([o.latency_s for o in refused], 50), 3),
         "server_429_p99_s": round(percentile([seconds for _, seconds in served_429], 99), 3),
         "server_429_window_s": round(max(answered_at) - min(answered_at), 3),
         "completed": sum(o.complete for o in outcomes)},
    ))  # fmt: skip
    assert not lost, [(o.label, o.detail) for o in lost[:5]]
    assert sum(o.complete for o in outcomes) >= capacity
    assert refused, "2x capacity at once should have been partly refused"
    assert len(served_429) == len(refused)
    assert not any(idle.values()), idle


def test_soak_constant_load_no_errors_drift_or_leaks(open_server, reliability_report, heavy):
    """Closed-loop load at the server's capacity for a fixed time: no errors, latency does not
    drift, and RSS and open file descriptors of server plus engine stay bounded."""
    duration_s = 600.0 if heavy else 75.0
    workers = CAPACITY
    pid = open_server.server.process.pid

    async def worker(client: httpx.AsyncClient, deadline: float, results: list[tuple[float, Outcome]]) -> None:
        index = 0
        while time.monotonic() < deadline:
            sent_at = time.monotonic()
            outcome = await send_chat(client, open_server.url, captioning_body(max_tokens=4, stream=index % 3 == 0))
            results.append((sent_at, outcome))
            index += 1
            if outcome.refused:
                await asyncio.sleep(1.0)

    async def run() -> list[tuple[float, Outcome]]:
        results: list[tuple[float, Outcome]] = []
        async with httpx.AsyncClient(timeout=120) as client:
            await send_chat(client, open_server.url, captioning_body())  # warm-up, not counted
            start_footprint.extend(footprint(pid))
            started = time.monotonic()
            await asyncio.gather(*(worker(client, started + duration_s, results) for _ in range(workers)))
        return results

    start_footprint: list[int] = []
    began = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - began
    idle = asyncio.run(wait_idle(open_server.url))
    end_rss, end_fds = footprint(pid)
    start_rss, start_fds = start_footprint
    results.sort(key=lambda item: item[0])
    outcomes = [outcome for _, outcome in results]
    errors = [o for o in outcomes if o.lost]
    fifth = max(len(results) // 5, 1)
    p50_by_fifth = [round(percentile([o.latency_s for o in outcomes[i * fifth:(i + 1) * fifth] if o.complete], 50), 3)
                    for i in range(5)]
    first_p50, last_p50 = p50_by_fifth[0], p50_by_fifth[-1]
    reliability_report.add_load(LoadRun(
        "soak", len(outcomes), workers, elapsed, len(errors), status_counts(outcomes),
        {"error_rate": round(len(errors) / max(len(outcomes), 1), 4),
         "p50_s_by_fifth": p50_by_fifth,
         "rss_start_mib": start_rss >> 20, "rss_end_mib": end_rss >> 20, "fds_start": start_fds,
         "fds_end": end_fds},
    ))  # fmt: skip
    assert len(outcomes) >= workers * 5, "the soak should have completed several requests per worker"
    assert not errors, [(o.label, o.detail) for o in errors[:5]]
    assert last_p50 <= SOAK_LATENCY_DRIFT * first_p50 + 1.0, (first_p50, last_p50)
    assert end_rss - start_rss <= SOAK_RSS_GROWTH_BYTES, (start_rss >> 20, end_rss >> 20)
    assert end_fds - start_fds <= SOAK_FD_GROWTH, (start_fds, end_fds)
    assert not any(idle.values()), idle


def test_abandoned_slow_and_timed_out_requests_leave_the_engine(open_server, guarded_server, reliability_report):
    """Streams dropped mid-way, non-streaming clients that give up, slow readers and
    requests past --request-timeout (the guarded server's short one): afterwards nothing is
    left running or queued on either server."""
    url = open_server.url
    # min_tokens: sampled at temperature 1, the tiny model can end a request within a few
    # tokens, and then there is nothing left to abandon.
    long_body = {**captioning_body(max_tokens=1000, stream=True), "min_tokens": 1000}

    async def drop_stream_after_first_chunks(client: httpx.AsyncClient) -> tuple[str, dict | None]:
        """Drops the stream after 3 events; the gauges are read just before, while it is
        certainly admitted and running."""
        async with client.stream("POST", url + "/v1/chat/completions", json=long_body) as response:
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    reading = await asyncio.to_thread(gauges, url)
                    return f"{response.status_code}: dropped after {chunks} events", reading
        return f"{response.status_code}: stream ended before 3 events", None

    async def give_up_waiting(client: httpx.AsyncClient) -> str:
        try:
            response = await client.post(url + "/v1/chat/completions",
                                         json={**captioning_body(max_tokens=1000), "min_tokens": 1000}, timeout=1.5)
            return f"{response.status_code} (finished within the client's patience)"
        except httpx.TimeoutException:
            return "client timed out and closed the connection"

    async def read_slowly(client: httpx.AsyncClient) -> Outcome:
        started = time.perf_counter()
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=captioning_body(max_tokens=16, stream=True)) as response:
            body = b""
            async for piece in response.aiter_raw(chunk_size=16):
                body += piece
                await asyncio.sleep(0.05)
        complete = b"data: [DONE]" in body and b'"finish_reason":"length"' in body.replace(b" ", b"")
        return Outcome(response.status_code, time.perf_counter() - started, complete=complete)

    async def outlive_request_timeout(client: httpx.AsyncClient) -> Outcome:
        started = time.perf_counter()
        # min_tokens forbids an early end of sequence: 4000 decode steps, ~20 s even on an idle CPU.
        body = {**captioning_body(max_tokens=OUTLIVING_TOKENS), "min_tokens": OUTLIVING_TOKENS}
        response = await client.post(guarded_server.url + "/v1/chat/completions", json=body,
                                     timeout=GUARDED_REQUEST_TIMEOUT_S + 60,
                                     headers={"Authorization": f"Bearer {API_KEY}"})
        code = response.json().get("error", {}).get("code") if response.status_code != 200 else None
        return Outcome(response.status_code, time.perf_counter() - started, detail=str(code))

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            (dropped_a, during), (dropped_b, _), gave_up, timed_out = await asyncio.gather(
                drop_stream_after_first_chunks(client), drop_stream_after_first_chunks(client),
                give_up_waiting(client), outlive_request_timeout(client),
            )  # fmt: skip
            slow = await read_slowly(client)
        return during, [dropped_a, dropped_b, gave_up], timed_out, slow

    started = time.perf_counter()
    during, abandoned, timed_out, slow = asyncio.run(run())
    idle = asyncio.run(wait_idle(url))
    guarded_idle = asyncio.run(wait_idle(guarded_server.url))
    observed = (f"while busy {during}; abandoned: {abandoned}; timed out: {timed_out.status} {timed_out.detail} "
                f"after {timed_out.latency_s:.1f} s; slow reader: {slow.status} complete={slow.complete}; "
                f"afterwards {idle}, timeout server {guarded_idle}")
    passed = (during is not None and during["mdl_clips_in_flight"] > 0 and timed_out.status == 504 and timed_out.detail == "timeout"
              and slow.complete and not any(idle.values()) and not any(guarded_idle.values()))
    reliability_report.add_load(LoadRun(
        "disconnects, slow reader, timeout", 5, 4, time.perf_counter() - started, int(not slow.complete),
        {"abandoned by the client": 3, "504 (the timeout case)": int(timed_out.status == 504),
         "200": int(slow.status == 200)},
    ))  # fmt: skip
    assert reliability_report.add_fault(
        "client disconnects, slow reads, request timeout",
        "504 timeout at --request-timeout, slow reader gets the full stream, engine and admission gauges return to 0",
        observed, passed,
    ), observed
