"""The application's one state object (`app.state.gateway`)."""

import logging
from collections.abc import Callable

from mdlserve.server.admission import Admission
from mdlserve.server.audio import DecodePool
from mdlserve.server.engine import EngineHandle
from mdlserve.server.fetch import AudioFetcher
from mdlserve.server.metrics import GatewayMetrics
from mdlserve.server.settings import Settings

logger = logging.getLogger("mdlserve.server")


class GatewayState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.api_keys: list[bytes] = [key.encode() for key in settings.all_api_keys()]
        self.admission = Admission(settings.max_num_seqs, settings.max_queue, self.metrics)
        self.engine = EngineHandle(settings, self.metrics)
        self.decoder = DecodePool(settings.decode_workers, on_decoded=self._count_audio)
        self.fetcher = AudioFetcher(
            timeout=settings.fetch_timeout,
            max_bytes=settings.fetch_max_bytes,
            allowed_domains=settings.allowed_domains,
            media_dir=settings.media_dir,
            allow_private=settings.unsafe_allow_private_urls,
        )
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
        if self.settings.unsafe_allow_private_urls:
            logger.warning("MDL_UNSAFE_ALLOW_PRIVATE_URLS is set: audio_url may reach private addresses (tests only)")
        self.engine.start(on_failure=lambda: self.request_exit())

    async def stop(self) -> None:
        try:
            await self.engine.stop()
        finally:
            self.decoder.shutdown()
            await self.fetcher.aclose()
