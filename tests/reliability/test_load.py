"""Load and overload: nothing accepted is lost, excess load is refused cleanly (429 with
Retry-After), long runs do not drift or leak, and abandoned requests leave the engine."""

import asyncio
import re
import time

import httpx
import pytest

from gateway.helpers import ServerProcess
from mdlserve.server.settings import Settings

from .conftest import MAX_NUM_SEQS, MAX_QUEUE
from .report import LoadRun
from .traffic import (
    Outcome, captioning_body, footprint, percentile, send_chat, status_counts, wait_idle,
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


@pytest.mark.slow
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
