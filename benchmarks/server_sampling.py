"""What the load generator samples while a level runs: the server's in-flight gauges and
the CPU of the load generator's and the server's processes.

A throughput figure means little without knowing whether the server really had N requests
in flight and whether the client, not the server, ran out of CPU. Two threads sample every
`interval_s` from the common start (and once more when the measurement window closes):
the server's Prometheus `/metrics` (our gateway's `mdl_*` gauges and vLLM's
`vllm:num_requests_*`, whichever it serves; a server without /metrics is tolerated) and
psutil's CPU times of the load-generator processes and, given its pid on this host, the
API server process. CPU over the window is interpolated between samples at its bounds.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Gauges read from /metrics (summed over label sets, e.g. one per engine).
IN_FLIGHT_METRICS = (
    "mdl_clips_in_flight",  # our gateway: admitted clip units, running plus queued
    "mdl_queue_length",
    "mdl_engine_running_requests",  # our gateway's copy of the engine scheduler's gauges
    "mdl_engine_waiting_requests",
    "vllm:num_requests_running",  # vLLM's own (its server, and ours through the global registry)
    "vllm:num_requests_waiting",
)
# Our gateway's stage histograms: (sum, count) pairs, read at every sample; their growth over
# the window gives the mean per request completed in it.
STAGE_HISTOGRAMS = {
    "time_to_engine": "mdl_time_to_engine_seconds",  # arrival -> engine submission
    "ttft": "mdl_ttft_seconds",  # arrival -> first generated token
}
STAGE_SERIES = tuple(f"{name}_{part}" for name in STAGE_HISTOGRAMS.values() for part in ("sum", "count"))


@dataclass
class Sample:
    t: float  # seconds since the common start
    values: dict[str, float]
    at_window_end: bool = False


class PeriodicSampler:
    """Calls `read` on a thread of its own every `interval_s` from `origin + first_s` (origin:
    time.monotonic()), at once on `window_end()`, and a last time on `stop()`. `read` returns a
    dict, or None when there is nothing to record; the sample's time is the middle of the read."""

    def __init__(self, read: Callable[[], dict | None], origin: float, interval_s: float, first_s: float = 0.0):
        self.read, self.origin, self.interval_s, self.first_s = read, origin, interval_s, first_s
        self.samples: list[Sample] = []
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def window_end(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._sample(at_window_end=False)

    def _run(self) -> None:
        tick = self.origin + self.first_s
        while True:
            woken = self._wake.wait(max(0.0, tick - time.monotonic()))
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
                self._sample(at_window_end=True)
                continue
            self._sample(at_window_end=False)
            while tick <= time.monotonic():  # a slow read skips ticks instead of bunching them
                tick += self.interval_s

    def _sample(self, at_window_end: bool) -> None:
        before = time.monotonic()
        values = self.read()
        if values is not None:
            t = (before + time.monotonic()) / 2 - self.origin
            self.samples.append(Sample(t, values, at_window_end))


def parse_series(text: str, names: tuple[str, ...] = IN_FLIGHT_METRICS) -> dict[str, float]:
    """The sum over label sets of each of `names` (gauges, or a histogram's _sum and _count)
    in a Prometheus text exposition."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            after_labels = line.rsplit("}", 1)[-1] if "{" in line else line[len(name) :]
            found[name] = found.get(name, 0.0) + float(after_labels.split()[0])
    return found


class MetricsReader:
    """GET {url}/metrics; gives up after a 404 (a server without Prometheus metrics) and
    skips a sample whose request fails or times out (a saturated server answers late)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 5.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)
        self.url = f"{url}/metrics"
        self.available = True

    def __call__(self) -> dict | None:
        import httpx

        if not self.available:
            return None
        try:
            resp = self.http.get(self.url)
        except httpx.HTTPError:
            return None
        if resp.status_code == 404:
            self.available = False
        return parse_series(resp.text, IN_FLIGHT_METRICS + STAGE_SERIES) if resp.status_code == 200 else None

    def close(self) -> None:
        self.http.close()


def process_cpu_s(process, with_children: bool = False) -> float:
    """User + system CPU seconds of a process; with_children adds its live descendants (vLLM's
    engine core, for one) and the children it has already reaped."""
    times = process.cpu_times()
    total = times.user + times.system
    if with_children:
        import psutil

        total += times.children_user + times.children_system
        for child in process.children(recursive=True):
            try:
                child_times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += child_times.user + child_times.system
    return total


def api_processes(server) -> list:
    """The server process and, under `--api-processes N`, its N gateway processes (titled
    VLLM::APIServer_<i>), not the engine cores."""
    import psutil

    found = [server]
    for child in server.children(recursive=True):
        try:
            if any("APIServer" in part for part in (child.name(), *child.cmdline())):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


class CpuReader:
    """CPU seconds of each load-generator process (`loadgen:<i>`) and, with a server pid, of
    the API process(es) alone (`api`: with --api-processes N the supervisor and its N
    gateway processes) and with every descendant (`api_with_children`)."""

    def __init__(self, loadgen_pids: list[int], server_pid: int | None):
        import psutil

        self.loadgen = [psutil.Process(pid) for pid in loadgen_pids]
        self.server = psutil.Process(server_pid) if server_pid else None

    def __call__(self) -> dict:
        import psutil

        values = {}
        for i, process in enumerate(self.loadgen):
            try:
                values[f"loadgen:{i}"] = process_cpu_s(process)
            except psutil.NoSuchProcess:
                continue
        if self.server is not None:
            try:
                values["api"] = sum(process_cpu_s(process) for process in api_processes(self.server))
                values["api_with_children"] = process_cpu_s(self.server, with_children=True)
            except psutil.NoSuchProcess:
                pass
        return values


class LevelSampling:
    """Both samplers of one level, started before the common start and stopped after the last
    worker finished."""

    def __init__(self, url: str, api_key: str | None, origin: float, interval_s: float,
                 loadgen_pids: list[int], server_pid: int | None):  # fmt: skip
        self.metrics_reader = MetricsReader(url, api_key)
        self.cpu = PeriodicSampler(CpuReader(loadgen_pids, server_pid), origin, interval_s)
        # The CPU from the start (the window's first bound); the gauges from one interval later,
        # since at the start itself no request has reached the server yet.
        self.metrics = PeriodicSampler(self.metrics_reader, origin, interval_s, first_s=interval_s)
        self.loadgen_processes = len(loadgen_pids)
        self._window_closed = False

    def __enter__(self) -> "LevelSampling":
        self.cpu.start()
        self.metrics.start()
        return self

    def window_end(self) -> None:
        """The first worker sent its last request: sample now, so the window has a last sample."""
        if not self._window_closed:
            self._window_closed = True
            self.cpu.window_end()
            self.metrics.window_end()

    def __exit__(self, *exc) -> None:
        self.cpu.stop()
        self.metrics.stop()
        self.metrics_reader.close()

    def report(self, start_s: float, end_s: float, completions: int) -> dict:
        """The row's in-flight and CPU fields for the window [start_s, end_s]."""
        window_s = end_s - start_s
        in_window = [s for s in self.metrics.samples if start_s <= s.t <= end_s or s.at_window_end]
        in_flight = {}
        for name in IN_FLIGHT_METRICS:
            values = [s.values[name] for s in in_window if name in s.values]
            if values:
                in_flight[name] = {"n": len(values), "min": min(values), "median": float(np.median(values)),
                                   "max": max(values)}  # fmt: skip
        per_worker = [counter_delta(self.cpu.samples, f"loadgen:{i}", start_s, end_s)
                      for i in range(self.loadgen_processes)]  # fmt: skip
        known = [c for c in per_worker if c is not None]
        loadgen = None
        if known and window_s > 0:
            loadgen = {"cpu_s": sum(known), "cores": sum(known) / window_s, "max_process_cores": max(known) / window_s,
                       "cpu_ms_per_request": 1000 * sum(known) / completions if completions else None}  # fmt: skip
        api = None
        own = counter_delta(self.cpu.samples, "api", start_s, end_s)
        tree = counter_delta(self.cpu.samples, "api_with_children", start_s, end_s)
        if own is not None and tree is not None and window_s > 0:
            api = {"cpu_s": own, "cores": own / window_s,
                   "cpu_ms_per_request": 1000 * own / completions if completions else None,
                   "with_children_cpu_s": tree, "with_children_cores": tree / window_s,
                   "with_children_cpu_ms_per_request": 1000 * tree / completions if completions else None}  # fmt: skip
        return {"server_in_flight": in_flight, "server_stage_ms": self.stage_means(start_s, end_s),
                "metrics_samples": len(in_window), "loadgen_cpu": loadgen, "api_cpu": api}  # fmt: skip

    def stage_means(self, start_s: float, end_s: float) -> dict[str, float]:
        """Mean ms per request of each gateway stage over the window: the growth of the
        histogram's sum over the growth of its count, both interpolated at the bounds."""
        means = {}
        for stage, name in STAGE_HISTOGRAMS.items():
            total = counter_delta(self.metrics.samples, f"{name}_sum", start_s, end_s)
            count = counter_delta(self.metrics.samples, f"{name}_count", start_s, end_s)
            if total is not None and count:
                means[stage] = 1000 * total / count
        return means

    def raw(self) -> list[dict]:
        """Every sample, for raw.json."""
        rows = [{"source": "metrics", "t": s.t, "at_window_end": s.at_window_end, **s.values}
                for s in self.metrics.samples]  # fmt: skip
        rows += [{"source": "cpu", "t": s.t, "at_window_end": s.at_window_end, **s.values} for s in self.cpu.samples]
        return rows


def counter_delta(samples: list[Sample], key: str, start_s: float, end_s: float) -> float | None:
    """Growth of the counter `key` (CPU seconds, a histogram's sum or count) between two
    moments, interpolated between the samples around them."""
    points = sorted((s.t, s.values[key]) for s in samples if key in s.values)
    if len(points) < 2:
        return None
    times, values = zip(*points)
    return float(np.interp(end_s, times, values) - np.interp(start_s, times, values))
