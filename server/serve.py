"""Running the app under uvicorn with a draining shutdown.

SIGTERM (what Kubernetes sends): readiness turns false and new work gets 503 while the
server keeps listening; in-flight requests get up to --drain-timeout to finish; then
uvicorn stops, the lifespan shuts the engine down, and the process exits 0. A second
SIGTERM, or SIGINT, stops at once. If the engine fails to start or dies, the process
exits 1 so the orchestrator restarts it.
"""

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mdlserve.server.app import create_app
from mdlserve.server.engine import EngineState
from mdlserve.server.http_protocol import GuardedHttpToolsProtocol
from mdlserve.server.middleware import RequestIdFilter
from mdlserve.server.settings import Settings
from mdlserve.server.state import GatewayState

logger = logging.getLogger("mdlserve.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# After the drain, connections still open get this long before uvicorn cancels them.
FINAL_GRACE_S = 5


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger("mdlserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: GatewayState):
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        state.request_exit = self.request_exit

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def request_exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.state.draining and self._loop is not None:
            # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown
            # and the process would die of SIGTERM instead of exiting 0.
            logger.info("SIGTERM: draining (up to %.0f s)", self.state.settings.drain_timeout)
            self.state.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        if sig == signal.SIGTERM:
            self.should_exit = True
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.state.admission.wait_idle(), timeout=self.state.settings.drain_timeout)
            logger.info("drained: no requests in flight")
        except TimeoutError:
            logger.warning("drain timeout: %d clip units still in flight are cancelled", self.state.admission.in_flight)
        self.should_exit = True


def serve(settings: Settings) -> int:
    """Run until shut down; returns the process exit code."""
    configure_logging(settings.log_level)
    if settings.api_processes > 1:
        from mdlserve.server.api_processes import serve_api_processes

        return serve_api_processes(settings)
    logger.info(
        "serving %s as %r on http://%s:%d", settings.model, settings.served_model_name, settings.host, settings.port
    )
    return run_gateway(create_app(settings), settings)


def run_gateway(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Serve `app` under uvicorn (on `sockets` when given, else on --host/--port) until it
    shuts down; the exit code: 1 if its engine failed or died, else 0."""
    state: GatewayState = app.state.gateway
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=FINAL_GRACE_S,
        lifespan="on",
        http=GuardedHttpToolsProtocol,
    )
    DrainingServer(config, state).run(sockets)
    if state.engine.state in (EngineState.FAILED, EngineState.DEAD):
        return 1
    return 0
