"""The application's one state object (`app.state.gateway`): settings, metrics, and the
parts of the request path wired together (builder -> session -> engine)."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mdlserve.server.admission import Admission, Units
from mdlserve.server.audio import DecodePool
from mdlserve.server.engine import Engine, EngineHandle, VllmEngine
from mdlserve.server.fetch import AudioFetcher
from mdlserve.server.metrics import GatewayMetrics, LoopLagMonitor
from mdlserve.server.request import RequestBuilder
from mdlserve.server.session import Session
from mdlserve.server.settings import Settings

logger = logging.getLogger("mdlserve.server")


@dataclass
class ApiProcess:
    """This gateway as one of --api-processes N (api_processes.py): its index, vLLM's client
    config for the engine cores the supervisor started, and the admission count all share."""

    index: int
    client_config: dict[str, Any]
    units: Units


class GatewayState:
    def __init__(self, settings: Settings, engine: Engine | None = None, api_process: ApiProcess | None = None):
        """`engine`: any engine.Engine; None builds vLLM's AsyncLLM from the settings (a
        client of the supervisor's engine cores when `api_process` is given)."""
        self.settings = settings
        self.metrics = GatewayMetrics(api_process.index if api_process else 0)
        self.api_keys: list[bytes] = [key.encode() for key in settings.all_api_keys()]
        self.admission = Admission(
            settings.admitted_running, settings.admitted_queued, self.metrics, api_process and api_process.units
        )
        if engine is None:
            engine = VllmEngine(settings, self.metrics, api_process and api_process.client_config)
        self.engine = EngineHandle(engine, self.metrics, settings.model)
        self.decoder = DecodePool(settings.decode_workers, on_decoded=self._count_audio)
        self.fetcher = AudioFetcher(
            timeout=settings.fetch_timeout,
            max_bytes=settings.fetch_max_bytes,
            allowed_domains=settings.allowed_domains,
            media_dir=settings.media_dir,
            allowed_networks=settings.allowed_networks,
        )
        self.builder = RequestBuilder(settings, self.decoder, self.fetcher)
        self.session = Session(self.engine, self.builder, self.admission, self.metrics, settings.request_timeout)
        self.loop_lag = LoopLagMonitor(self.metrics)
        self.draining = False
        # Set by the process runner (serve.py): ask uvicorn to exit, e.g. when the engine dies.
        self.request_exit: Callable[[], None] = lambda: None

    def _count_audio(self, decode_seconds: float, audio_seconds: float) -> None:
        self.metrics.audio_decode.observe(decode_seconds)
        self.metrics.audio_seconds.inc(audio_seconds)

    @property
    def ready(self) -> bool:
        return self.engine.up and not self.draining

    async def start(self) -> None:
        if self.settings.allowed_networks:
            networks = ", ".join(map(str, self.settings.allowed_networks))
            logger.info("audio_url may reach these non-public networks (--allowed-networks): %s", networks)
        self.loop_lag.start()
        self.engine.start(on_failure=lambda: self.request_exit())

    async def stop(self) -> None:
        try:
            await self.engine.stop()
        finally:
            self.loop_lag.stop()
            self.decoder.shutdown()
            await self.fetcher.aclose()
