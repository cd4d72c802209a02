"""Prometheus metrics (prefix `mdl_`) and the bridge from vLLM's engine statistics.

The gateway's metrics live in a registry of their own (one per app, so several apps can
share a process in tests); /metrics serves it followed by prometheus-client's global
registry, where vLLM registers its own `vllm:*` metrics.

With --api-processes N every process writes its samples to PROMETHEUS_MULTIPROC_DIR (set by
the supervisor before the processes start) and /metrics of any of them serves the sum over
all: counters and histograms add up, each gauge says how (`multiprocess_mode`; ignored in
one process).
"""

import asyncio
import os
import time

from prometheus_client import REGISTRY as GLOBAL_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Gateway stages: milliseconds for a clip in the body, seconds when fetched from a URL.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, api_process: int = 0) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mdl_requests", "HTTP requests by route and status code", ["route", "status"], registry=registry
        )
        self.api_process_requests = Counter(
            "mdl_api_process_requests",
            "HTTP requests by the API process that served them (0 .. --api-processes - 1)",
            ["api_process"],
            registry=registry,
        ).labels(api_process=str(api_process))
        self.request_duration = Histogram(
            "mdl_request_duration_seconds",
            "End-to-end request time, until the last byte is sent",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "mdl_ttft_seconds",
            "Time from request arrival at the gateway (its headers) to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_engine = Histogram(
            "mdl_time_to_engine_seconds",
            "Time from request arrival at the gateway to its submission to the engine "
            "(body upload and parsing, audio fetch and decoding, prompt building)",
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "mdl_queue_wait_seconds",
            "Time requests waited in the engine scheduler's queue (from vLLM)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode = Histogram(
            "mdl_decode_seconds",
            "Mean time per generated token after the first, one sample per request",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.audio_decode = Histogram(
            "mdl_audio_decode_seconds",
            "Time to decode and resample one audio clip (in the decode pool)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audio_seconds = Counter(
            "mdl_audio_seconds", "Seconds of audio received (after decoding)", registry=registry
        )
        # The admission count is shared by every API process: the latest value is the server's.
        self.clips_in_flight = Gauge(
            "mdl_clips_in_flight",
            "Admitted clip units not yet finished (running plus queued)",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.queue_length = Gauge(
            "mdl_queue_length",
            "Admitted clip units beyond --max-num-seqs (waiting for a batch slot)",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.rejections = Counter("mdl_rejections", "Requests refused, by reason", ["reason"], registry=registry)
        for reason in ("queue_full", "unauthorized", "payload_too_large", "bad_request", "draining", "timeout"):
            self.rejections.labels(reason=reason)
        # Engine gauges carry `replica`: vLLM's engine index (0 .. --data-parallel-size - 1).
        self.engine_running = Gauge(
            "mdl_engine_running_requests",
            "Requests in the engine replica's running batch (from vLLM)",
            ["replica"],
            registry=registry,
            multiprocess_mode="mostrecent",  # each scheduler step reports to one API process
        )
        self.engine_waiting = Gauge(
            "mdl_engine_waiting_requests",
            "Requests waiting in the engine replica's scheduler (from vLLM)",
            ["replica"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.engine_kv_cache_usage = Gauge(
            "mdl_engine_kv_cache_usage_ratio",
            "Fraction of the engine replica's KV cache blocks in use (0-1, from vLLM)",
            ["replica"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.engine_finished = Counter(
            "mdl_engine_finished_requests",
            "Requests the engine replica finished (from vLLM): how the load spreads over replicas",
            ["replica"],
            registry=registry,
        )
        self.engine_up = Gauge(
            "mdl_engine_up",
            "1 while the engine answers, else 0",
            registry=registry,
            multiprocess_mode="livemin",  # 0 while any API process sees it down
        )
        self.loop_lag = Histogram(
            "mdl_event_loop_lag_seconds",
            "How late the event loop ran a timer due now (sampled every 100 ms)",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag_max = Gauge(
            "mdl_event_loop_lag_max_seconds",
            "Worst event-loop lag sampled since the process started (the engine's start included)",
            registry=registry,
            multiprocess_mode="livemax",
        )

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            every_process = CollectorRegistry()
            multiprocess.MultiProcessCollector(every_process)
            return generate_latest(every_process)
        return generate_latest(self.registry) + generate_latest(GLOBAL_REGISTRY)


class LoopLagMonitor:
    """Samples the event loop's lag: a task sleeps LAG_INTERVAL_S and records how much
    later than asked it woke up. Every request and stream shares the loop, so this is
    the delay any of them may see from work that holds it (parsing, tokenizing, ...)."""

    LAG_INTERVAL_S = 0.1

    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.LAG_INTERVAL_S)
            lag = max(0.0, time.perf_counter() - asked - self.LAG_INTERVAL_S)
            self.metrics.loop_lag.observe(lag)
            if lag > self.worst:
                self.worst = lag
                self.metrics.loop_lag_max.set(lag)


def engine_stat_logger(metrics: GatewayMetrics) -> type:
    """A vLLM stat-logger class (passed to AsyncLLM via `stat_loggers`) that copies the
    scheduler's gauges and finished requests' queue times into `metrics`. vLLM builds one
    per engine replica (data parallel), passing its index: the `replica` label."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineStatsBridge(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.replica = str(engine_index)
            # Every replica's series exist (at 0) from the start, not from its first step.
            for family in (
                metrics.engine_running,
                metrics.engine_waiting,
                metrics.engine_kv_cache_usage,
                metrics.engine_finished,
            ):
                family.labels(replica=self.replica)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            replica = str(engine_idx)
            if scheduler_stats is not None:
                metrics.engine_running.labels(replica=replica).set(scheduler_stats.num_running_reqs)
                metrics.engine_waiting.labels(replica=replica).set(scheduler_stats.num_waiting_reqs)
                metrics.engine_kv_cache_usage.labels(replica=replica).set(scheduler_stats.kv_cache_usage)
            if iteration_stats is not None:
                metrics.engine_finished.labels(replica=replica).inc(len(iteration_stats.finished_requests))
                for finished in iteration_stats.finished_requests:
                    metrics.queue_wait.observe(finished.queued_time)

        def log_engine_initialized(self):
            pass

    return EngineStatsBridge
