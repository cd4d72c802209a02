"""The vLLM engine: AsyncEngineArgs from Settings, and its start/health/stop life cycle.

The engine starts in a worker thread after the HTTP server is already listening, so that
/health/live answers during the (minutes-long, for 7B) load and /health/ready says 503
until the engine is up.
"""

import asyncio
import logging
import time
from enum import Enum

from mdlserve.server.metrics import GatewayMetrics, engine_stat_logger
from mdlserve.server.settings import Settings

logger = logging.getLogger("mdlserve.server")
HEALTH_INTERVAL_S = 1.0
LOG_STATS_INTERVAL_S = 10.0


def engine_args(settings: Settings):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mdlserve.server.platform import default_kv_cache_bytes

    kv_cache_bytes = settings.kv_cache_bytes or default_kv_cache_bytes()
    return AsyncEngineArgs(
        model=settings.model,
        served_model_name=settings.served_model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        quantization=settings.quantization,
        load_format=settings.load_format,
        enforce_eager=settings.enforce_eager,
        limit_mm_per_prompt={"audio": settings.max_audio_parts},
        **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes else {}),
    )


class EngineState(str, Enum):
    LOADING = "loading"
    UP = "up"
    FAILED = "failed"  # never came up
    DEAD = "dead"  # came up, then died
    STOPPED = "stopped"


class EngineHandle:
    """Owns the AsyncLLM: starts it in the background, watches it, shuts it down."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        self.engine = None  # vllm.v1.engine.async_llm.AsyncLLM once up
        self.tokenizer = None
        self.state = EngineState.LOADING
        self.started_at: float | None = None
        self._start_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        metrics.engine_up.set(0)

    @property
    def up(self) -> bool:
        return self.state is EngineState.UP

    def start(self, on_failure) -> None:
        """Begin loading; `on_failure()` is called if the engine cannot start or dies."""
        self._start_task = asyncio.create_task(self._start(on_failure), name="engine-start")

    def _build(self):
        """Runs in a worker thread: even vLLM's imports take seconds the event loop needs."""
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(engine_args(self.settings), stat_loggers=[engine_stat_logger(self.metrics)])

    async def _start(self, on_failure) -> None:
        started = time.perf_counter()
        try:
            self.engine = await asyncio.to_thread(self._build)
            self.tokenizer = self.engine.get_tokenizer()
        except Exception:
            logger.exception("the engine failed to start")
            self.state = EngineState.FAILED
            on_failure()
            return
        if self.state is not EngineState.LOADING:  # stop() was called while loading
            return
        self.state = EngineState.UP
        self.started_at = time.time()
        self.metrics.engine_up.set(1)
        logger.info("engine up in %.1f s (model %s)", time.perf_counter() - started, self.settings.model)
        self._watch_task = asyncio.create_task(self._watch(on_failure), name="engine-watch")

    async def _watch(self, on_failure) -> None:
        """Flags the engine dead as soon as it stops answering; drives vLLM's periodic
        stats log line."""
        last_log = time.monotonic()
        while self.state is EngineState.UP:
            try:
                await self.engine.check_health()
            except Exception:
                logger.error("the engine died; readiness is now false")
                self.state = EngineState.DEAD
                self.metrics.engine_up.set(0)
                on_failure()
                return
            if time.monotonic() - last_log >= LOG_STATS_INTERVAL_S:
                last_log = time.monotonic()
                await self.engine.do_log_stats()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def stop(self) -> None:
        previous = self.state
        if previous not in (EngineState.FAILED, EngineState.DEAD):  # keep the cause: serve() exits 1 on it
            self.state = EngineState.STOPPED
        self.metrics.engine_up.set(0)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._start_task is not None and previous is EngineState.LOADING:
            logger.info("waiting for the engine to finish loading before stopping it")
            await asyncio.shield(self._start_task)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
