"""One load level spread over several load-generator processes, with one shared window.

One Python process cannot keep hundreds of 1.3 MB streaming requests in flight without its
own event loop becoming the bottleneck, so `--processes P` splits a level over P worker
processes (spawned). Adding up rates that each process measured on its own clock is not a
throughput: the processes would start at different times. Instead every worker prepares
all its request bodies, reports ready, and waits for a start time that the parent hands
out once all are ready; every result is timed from that common start. The level's window
runs from the start (plus `ramp_s`) to the moment the first worker ran out of requests, that
is sent its last one (in a closed loop right after a completion; until then every worker
held its full share in flight).
`--processes 1` runs the same code in this process.
"""

import asyncio
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Protocol, cast

from .http_load import ChatClient, RequestResult, RequestSpec, closed_loop, encode_bodies, open_loop
from .server_sampling import LevelSampling

# Between "all workers are ready" and the common start: time for every worker to get the
# start message, set up its event loop and HTTP client, and sleep until it. A late worker
# shows in the row's `first_send_s`.
START_LEAD_S = 1.0


@dataclass
class Target:
    """Where the requests go."""

    url: str
    api_key: str | None
    timeout_s: float
    model: str


@dataclass
class Share:
    """One worker's part of a level: its requests and, in a closed loop, how many it keeps in
    flight; in an open loop, when to send each (seconds after the common start)."""

    index: int
    specs: list[RequestSpec]
    concurrency: int = 0  # closed loop
    arrivals_s: list[float] | None = None  # open loop


@dataclass
class WorkerOutcome:
    index: int
    results: list[RequestResult]
    sent_last_s: float  # since the common start: when it sent its last request


@dataclass
class LevelRun:
    outcomes: list[WorkerOutcome]
    sampling: LevelSampling
    window_start_s: float
    window_end_s: float
    results: list[RequestResult]  # every worker's, in worker order


def split_proportionally(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders get the rest): the parts
    add up to `total` and differ from the exact shares by less than one."""
    exact = [total * w / sum(weights) for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: parts[i] - exact[i])
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def closed_shares(specs: list[RequestSpec], concurrency: int, processes: int) -> list[Share]:
    """Concurrency split as evenly as possible over min(processes, concurrency) workers, the
    requests in proportion to it, so that all workers run out at about the same time."""
    workers = min(processes, concurrency)
    users = split_proportionally(concurrency, [1] * workers)
    counts = split_proportionally(len(specs), users)
    shares, first = [], 0
    for i, (n, count) in enumerate(zip(users, counts)):
        shares.append(Share(index=i, specs=specs[first : first + count], concurrency=n))
        first += count
    return shares


def open_shares(specs: list[RequestSpec], arrivals_s: list[float], processes: int) -> list[Share]:
    """Arrivals dealt round-robin over the workers, each keeping its absolute send time."""
    workers = min(processes, len(specs))
    return [Share(index=i, specs=specs[i::workers], arrivals_s=arrivals_s[i::workers]) for i in range(workers)]


class ProgressHooks(Protocol):
    """What a worker reports while it runs: each finished request, and sending its last."""

    def completed(self) -> None: ...

    def sent_last(self) -> None: ...


class LocalHooks:
    def __init__(self, bar, sampling: LevelSampling):
        self.bar, self.sampling = bar, sampling

    def completed(self) -> None:
        self.bar.update(1)

    def sent_last(self) -> None:
        self.sampling.window_end()


class PipeHooks:
    def __init__(self, conn: Connection):
        self.conn = conn

    def completed(self) -> None:
        self.conn.send(("completed", None))

    def sent_last(self) -> None:
        self.conn.send(("sent_last", None))


async def drive(share: Share, target: Target, start_at: float, hooks: ProgressHooks) -> WorkerOutcome:
    """Send a share's prepared requests from `start_at` (time.monotonic(), the same clock in
    every process on the host)."""
    client = ChatClient(target.url, target.api_key, target.timeout_s, target.model)
    origin = time.perf_counter() + (start_at - time.monotonic())
    try:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        if share.arrivals_s is None:
            results, sent_last_s = await closed_loop(client, share.specs, share.concurrency, origin, hooks)
        else:
            results, sent_last_s = await open_loop(client, share.specs, share.arrivals_s, origin, hooks)
    finally:
        await client.close()
    return WorkerOutcome(share.index, results, sent_last_s)


def worker_main(conn: Connection, share: Share, target: Target) -> None:
    """A worker process: build every body, report ready, wait for the start time, run, send the
    results, and stay alive until told to exit (the parent reads its CPU time until then).
    A parent that went away (its end of the pipe closed) ends the worker quietly."""
    try:
        asyncio.run(encode_bodies(share.specs, target.model))
        conn.send(("ready", os.getpid()))
        _, start_at = conn.recv()
        outcome = asyncio.run(drive(share, target, start_at, PipeHooks(conn)))
        conn.send(("done", outcome))
        conn.recv()
    except (EOFError, BrokenPipeError):
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _receive(conn: Connection, index: int) -> tuple[str, object]:
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise SystemExit(f"load-generator worker {index} exited without a result") from None
    if kind == "error":
        raise SystemExit(f"load-generator worker {index} failed:\n{payload}")
    return kind, payload


def run_level(shares: list[Share], target: Target, sampling_args: dict, ramp_s: float, bar) -> LevelRun:
    """Run one level in-process (one share) or in one spawned process per share."""
    if len(shares) == 1:
        asyncio.run(encode_bodies(shares[0].specs, target.model))
        start_at = time.monotonic() + START_LEAD_S
        with LevelSampling(origin=start_at, loadgen_pids=[os.getpid()], **sampling_args) as sampling:
            outcomes = [asyncio.run(drive(shares[0], target, start_at, LocalHooks(bar, sampling)))]
    else:
        outcomes, sampling = _run_in_processes(shares, target, sampling_args, bar)
    window_end_s = min(o.sent_last_s for o in outcomes)
    results = [r for o in outcomes for r in o.results]
    return LevelRun(outcomes, sampling, min(ramp_s, window_end_s), window_end_s, results)


def _run_in_processes(shares: list[Share], target: Target, sampling_args: dict, bar):
    ctx = multiprocessing.get_context("spawn")
    conns, procs = [], []
    try:
        for share in shares:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child_end, share, target), daemon=True)
            proc.start()
            child_end.close()
            conns.append(parent_end)
            procs.append(proc)
        pids = [cast(int, _receive(conn, i)[1]) for i, conn in enumerate(conns)]
        start_at = time.monotonic() + START_LEAD_S
        for conn in conns:
            conn.send(("start", start_at))
        outcomes: list[WorkerOutcome | None] = [None] * len(shares)
        with LevelSampling(origin=start_at, loadgen_pids=pids, **sampling_args) as sampling:
            while any(o is None for o in outcomes):
                for conn in cast(list[Connection], wait([c for c, o in zip(conns, outcomes) if o is None])):
                    index = conns.index(conn)
                    kind, payload = _receive(conn, index)
                    if kind == "completed":
                        bar.update(1)
                    elif kind == "sent_last":
                        sampling.window_end()
                    elif kind == "done":
                        outcomes[index] = cast(WorkerOutcome, payload)
        for conn in conns:
            conn.send(("exit", None))
    finally:
        for conn in conns:  # a worker still waiting for the start (after a failure elsewhere) ends
            conn.close()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return outcomes, sampling
