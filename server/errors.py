"""Errors the gateway answers with, in OpenAI's shape `{"error": {message, type, param, code}}`.

Only errors we know to be the client's fault become 4xx (`ApiError` raised on purpose,
request validation, undecodable audio, vLLM's own request validation); anything else is
our bug and becomes a 500 "internal error" that names the request id and nothing more.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mdlserve.server.audio import AudioDecodeError
from mdlserve.server.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger("mdlserve.server")

# Status -> (OpenAI error type, rejection reason for mdl_rejections_total).
_KINDS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    404: ("not_found_error", "bad_request"),
    405: ("invalid_request_error", "bad_request"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "payload_too_large"),
    422: ("invalid_request_error", "bad_request"),
    429: ("rate_limit_error", "queue_full"),
    503: ("service_unavailable", "draining"),
    504: ("timeout_error", "timeout"),
}


class ApiError(Exception):
    """A deliberate, client-visible error. `reason` labels mdl_rejections_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = "by-status",
        headers: dict[str, str] | None = None,
    ):
        """`reason=None`: not counted as a rejection (e.g. 503 while the model loads)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = _KINDS.get(status, ("invalid_request_error", None))[0]
        self.reason = _KINDS.get(status, (None, None))[1] if reason == "by-status" else reason
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class PayloadTooLarge(StarletteHTTPException):
    """Raised from the body-counting receive wrapper; an HTTPException so that FastAPI's
    body parsing passes it through instead of turning it into a generic 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (--max-upload-bytes)")
        self.limit = limit


class BodyTimeout(StarletteHTTPException):
    """Raised from the body-counting receive wrapper when the body is still incomplete at
    its deadline (slow uploads); passes through FastAPI's body parsing like PayloadTooLarge."""

    def __init__(self, seconds: float):
        super().__init__(408, f"request body not received within {seconds:g} s (--request-timeout)",
                         headers={"Connection": "close"})


def error_response(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def api_error_response(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers)


def _count_rejection(request: Request, reason: str | None) -> None:
    if reason is not None:
        request.app.state.gateway.metrics.rejections.labels(reason=reason).inc()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "header")]
        # Drop pydantic's union-member tags (e.g. 'text', 'function-after[...]') for readability.
        loc = [x for x in loc if not x.startswith(("function-", "tagged-union"))]
        param = ".".join(loc) or None
        first_param = first_param or param
        message = err.get("msg", "invalid value")
        parts.append(f"{param}: {message}" if param else message)
    return "invalid request: " + "; ".join(parts), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count_rejection(request, exc.reason)
        return api_error_response(exc)

    @app.exception_handler(AudioDecodeError)
    async def _audio_error(request: Request, exc: AudioDecodeError) -> JSONResponse:
        _count_rejection(request, "bad_request")
        return error_response(400, f"could not decode audio: {exc}", type_="invalid_request_error",
                              code="invalid_audio")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_rejection(request, "bad_request")
        message, param = _validation_message(exc)
        return error_response(400, message, type_="invalid_request_error", param=param)

    from vllm.v1.engine.exceptions import EngineDeadError

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        logger.error("request failed: the engine died")
        return error_response(503, "the engine stopped while handling the request; retry", type_="service_unavailable",
                              code="engine_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, reason = _KINDS.get(exc.status_code, ("invalid_request_error", "bad_request"))
        _count_rejection(request, reason if exc.status_code < 500 else None)
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, type_=type_, headers=getattr(exc, "headers", None))
