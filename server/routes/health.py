"""GET /health, GET /health/live, GET /health/ready, GET /metrics.

/health: vLLM's probe, for clients and load balancers written against it: 200 while the
engine lives (up, draining included), 503 while it loads and after it died.

live: the process serves HTTP and the engine has not died (503 after an engine crash, so
an orchestrator restarts the pod; 200 while the model is still loading).
ready: 200 only while the engine is up and we are not draining.
"""

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from mdlserve.server.deps import State
from mdlserve.server.engine import EngineState
from mdlserve.server.metrics import CONTENT_TYPE
from mdlserve.server.routes import HEALTH, HEALTH_LIVE, HEALTH_READY, METRICS
from mdlserve.server.schemas import HealthStatus

router = APIRouter()


def _status(code: int, status: str, detail: str | None = None) -> JSONResponse:
    return JSONResponse(HealthStatus(status=status, detail=detail).model_dump(), status_code=code)


@router.get(HEALTH, response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def health(state: State) -> JSONResponse:
    if state.engine.up:
        return _status(200, "ok")
    return _status(503, state.engine.state.value, "the engine is not running")


@router.get(HEALTH_LIVE, response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def live(state: State) -> JSONResponse:
    if state.engine.gone:
        return _status(503, "dead", "the engine stopped")
    return _status(200, "alive")


@router.get(HEALTH_READY, response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def ready(state: State) -> JSONResponse:
    if state.draining:
        return _status(503, "draining", "shutting down")
    if state.engine.state is EngineState.LOADING:
        return _status(503, "loading", "the model is loading")
    if not state.engine.up:
        return _status(503, state.engine.state.value, "the engine is not running")
    return _status(200, "ready")


@router.get(METRICS, response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
