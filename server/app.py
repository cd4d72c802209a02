"""The FastAPI application factory."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from mdlserve.server.deps import require_serving
from mdlserve.server.engine import Engine
from mdlserve.server.errors import install_error_handlers
from mdlserve.server.middleware import (
    AdmissionGateMiddleware,
    AuthMiddleware,
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
)  # fmt: skip
from mdlserve.server.openapi import install_openapi
from mdlserve.server.routes import DOCS, audio, chat, health, models, speech
from mdlserve.server.settings import Settings
from mdlserve.server.state import ApiProcess, GatewayState


def create_app(settings: Settings, engine: Engine | None = None, api_process: ApiProcess | None = None) -> FastAPI:
    """Build the app around `engine` (any engine.Engine; None: vLLM's AsyncLLM from the
    settings, as one of several API processes when `api_process` is given). The engine
    starts (in the background) when the app's lifespan starts and stops when it ends; an
    ASGI transport that skips the lifespan must enter `app.router.lifespan_context(app)`
    itself."""
    state = GatewayState(settings, engine, api_process)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="midashenglm-serve", version="0.1.0", lifespan=lifespan, docs_url=DOCS, redoc_url=None)
    app.state.gateway = state
    install_error_handlers(app)
    install_openapi(app)
    # Middleware added last runs first: request ids and metrics, then auth and the
    # admission gate (both before any body byte is read), then the size limit.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        metrics=state.metrics,
        body_timeout=settings.request_timeout,
    )
    app.add_middleware(AdmissionGateMiddleware, state=state)
    app.add_middleware(AuthMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)

    work = [Depends(require_serving)]
    app.include_router(chat.router, dependencies=work)
    app.include_router(audio.router, dependencies=work)
    app.include_router(speech.router, dependencies=work)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
