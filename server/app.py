"""The FastAPI application factory."""

import asyncio
import ctypes
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from mdlserve.server.deps import require_serving
from mdlserve.server.engine import Engine
from mdlserve.server.errors import install_error_handlers
from mdlserve.server.middleware import (
    AdmissionGateMiddleware,
    AuthMiddleware,
    BodyBudget,
    BodySizeLimitMiddleware,
    LenientRoutingMiddleware,
    RequestContextMiddleware,
)  # fmt: skip
from mdlserve.server.openapi import install_openapi
from mdlserve.server.routes import DOCS, audio, chat, health, models, speech
from mdlserve.server.settings import Settings
from mdlserve.server.state import ApiProcess, GatewayState

logger = logging.getLogger("mdlserve.server")
# glibc's mallopt parameter, and the block size from which allocations get their own mapping.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def create_app(settings: Settings, engine: Engine | None = None, api_process: ApiProcess | None = None) -> FastAPI:
    """Build the app around `engine` (any engine.Engine; None: vLLM's AsyncLLM from the
    settings, as one of several API processes when `api_process` is given). The engine
    starts (in the background) when the app's lifespan starts and stops when it ends; an
    ASGI transport that skips the lifespan must enter `app.router.lifespan_context(app)`
    itself."""
    state = GatewayState(settings, engine, api_process)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        freezer = None
        if engine is None:  # a serving process (tests that pass an engine share theirs)
            return_large_blocks_to_the_os()
            freezer = asyncio.create_task(freeze_gc_heap_when_up(state))
        await state.start()
        try:
            yield
        finally:
            if freezer is not None:
                freezer.cancel()
            await state.stop()

    # No redirects to a path with(out) a trailing slash: LenientRoutingMiddleware serves them.
    app = FastAPI(title="midashenglm-serve", version="0.1.0", lifespan=lifespan, docs_url=DOCS, redoc_url=None,
                  redirect_slashes=False)  # fmt: skip
    app.state.gateway = state
    install_error_handlers(app)
    install_openapi(app)
    # Middleware added last runs first: trailing slashes and HEAD, request ids and metrics,
    # then auth and the admission gate (both before any body byte is read), then the size limit.
    app.state.body_budget = budget = BodyBudget(settings.max_body_bytes_in_flight)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        metrics=state.metrics,
        body_timeout=settings.request_timeout,
        budget=budget,
    )
    app.add_middleware(AdmissionGateMiddleware, state=state)
    app.add_middleware(AuthMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    app.add_middleware(LenientRoutingMiddleware)

    work = [Depends(require_serving)]
    app.include_router(chat.router, dependencies=work)
    app.include_router(audio.router, dependencies=work)
    app.include_router(speech.router, dependencies=work)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


async def freeze_gc_heap_when_up(state: GatewayState) -> None:
    """Once vLLM's engine is up, move every object alive then (torch, transformers, vLLM: some
    700,000 in the tiny model's API process) out of the cyclic garbage collector's reach, as
    `vllm serve` does (freeze_gc_heap). Otherwise each full collection walks all of them on
    the event loop: 370 ms on the 2-core VM, the hostile benchmark's worst stall."""
    while not state.engine.up:
        if state.engine.gone:
            return
        await asyncio.sleep(0.1)
    gc.collect()
    gc.freeze()


def return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB in this process (unless MALLOC_MMAP_THRESHOLD_ sets
    one): every block from 1 MiB up (request bodies, parsed strings, decoded audio) is then
    its own mapping, returned to the OS when freed. glibc otherwise raises the threshold to
    the largest block freed (up to 32 MiB): after one 25 MiB body, later ones came from the
    heap arenas of the threads that decoded them and stayed there, freed but resident (the
    hostile benchmark's API process stayed 270-390 MiB above its baseline when idle; with
    the fixed threshold, about 30)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library's, where it has one
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        logger.info("could not fix the malloc mmap threshold (not glibc?): freed request memory may stay resident")
