"""Every error the gateway answers with, and the one mapping to OpenAI's error envelope
`{"error": {message, type, param, code}}`.

Only errors we know to be the client's fault become 4xx: an `ApiError` raised on purpose
(the request builder, admission, auth, the session), FastAPI's request validation, and the
body limits. Anything else is our bug and becomes a 500 "internal error" that names the
request id and nothing more (RequestContextMiddleware); in particular a `ValueError` from
a library is never turned into a 400 here. Streams report errors with the same envelope as
a last SSE event (`error_event`).
"""

import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from mdlserve.server.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger("mdlserve.server")

# nginx's "client closed request": recorded in metrics and logs, never seen by the client.
CLIENT_CLOSED = 499
# Set in a request's scope state when its client left mid-stream (after a 200 was sent).
CLIENT_CLOSED_FLAG = "client_closed"

# Status -> (OpenAI error type, rejection reason for mdl_rejections_total).
_KINDS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    404: ("not_found_error", "bad_request"),
    405: ("invalid_request_error", "bad_request"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "bad_request"),
    422: ("invalid_request_error", "bad_request"),
    429: ("rate_limit_error", "queue_full"),
    431: ("invalid_request_error", "payload_too_large"),
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


class EngineDead(ApiError):
    """The engine stopped (crashed or was shut down). Raised by engines (engine.Engine's
    contract) for requests in flight and new submissions."""

    def __init__(self, message: str = "the engine stopped; retry on another replica"):
        super().__init__(503, message, code="engine_unavailable", reason=None)
        self.type = "server_error"


class EngineAborted(ApiError):
    """The engine ended a request on its own (finish reason "abort"): with data-parallel
    replicas, one replica's death aborts the requests it held. The answer is incomplete, so
    the client gets a 503 to retry, never a 200 with a cut-off text."""

    def __init__(self):
        super().__init__(503, "the engine aborted the request; retry", code="engine_unavailable", reason=None)
        self.type = "server_error"


class RequestTimedOut(ApiError):
    """--request-timeout passed; the engine request has been aborted."""

    def __init__(self, seconds: float):
        super().__init__(504, f"request timed out after {seconds:g} s (--request-timeout)", code="timeout")


class ClientDisconnected(ApiError):
    """The client went away; its work was cancelled. Answered with an empty 499 that
    nobody reads, so that logs and metrics record it."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "client disconnected", reason=None)


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
        super().__init__(
            408, f"request body not received within {seconds:g} s (--request-timeout)", headers={"Connection": "close"}
        )


class EnvelopeResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text holding lone
    surrogates, which cannot be encoded as UTF-8 (Starlette's JSONResponse would raise)."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def envelope(exc: ApiError) -> ErrorResponse:
    return ErrorResponse(error=ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code))


def api_error_response(exc: ApiError) -> Response:
    if exc.status == CLIENT_CLOSED:
        return Response(status_code=CLIENT_CLOSED)
    return EnvelopeResponse(envelope(exc).model_dump(), status_code=exc.status, headers=exc.headers)


def internal_error_body(request_id: str) -> dict:
    """The whole of what a client learns about our bug: the request id to quote."""
    return {
        "error": {
            "message": f"internal error (request id {request_id})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def error_event(exc: BaseException, request_id: str) -> str:
    """The last SSE event of a stream that failed after its headers were sent."""
    if isinstance(exc, ApiError):
        body = envelope(exc).model_dump()
    else:
        logger.error("stream failed", exc_info=exc)
        body = internal_error_body(request_id)
    return f"data: {json.dumps(body, ensure_ascii=True)}\n\n"


def _resolved_path(error: Mapping, data: object, root: str) -> str:
    """Where in `data` the error is, as `messages[0].content[1].input_audio.format`.

    Pydantic's locations also name the union member that was tried (`str`,
    `list[tagged-union[...]]`, a tagged union's tag such as `input_audio`); those are not in
    the input, so walking the location through the input keeps exactly the keys and
    indices it has. A missing field's name ends its location without being in the input."""
    path, node = root, data
    loc = list(error.get("loc", ()))
    for i, step in enumerate(loc):
        if isinstance(node, Mapping) and isinstance(step, str) and step in node:  # noqa: SIM114 (for mypy)
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif not (error.get("type") == "missing" and i == len(loc) - 1):
            continue
        path += f"[{step}]" if isinstance(step, int) else (f".{step}" if path else step)
    return path


def validation_problems(errors: list, data: object, root: str = "") -> list[tuple[str, str]]:
    """(path, message) for each problem pydantic found in `data`, read as a person would.

    A field declared as a union (chat `content`: a string or a list of parts) fails once per
    member. Where one member got further into the input (a list whose part 1 has a bad
    `format`), the other members' type mismatches at the field itself are noise and are
    dropped; where all failed at the field, one message says what it should have been."""
    found = [(_resolved_path(e, data, root), e) for e in errors]
    containers = {container for path, _ in found for container in _containers(path)}
    problems: dict[str, list[str]] = {}
    for path, error in found:
        type_mismatch = str(error.get("type", "")).endswith("_type")
        if type_mismatch and path in containers:
            continue
        message = str(error.get("msg", "invalid value"))
        if message.startswith("Value error, Expected UploadFile"):  # Starlette's words for a text field
            message = "must be a file (a multipart part with a filename), not a text field"
        problems.setdefault(path, []).append(message)
    described = []
    for path, messages in problems.items():
        first, *more = dict.fromkeys(messages)
        message = " or ".join([first, *(m.removeprefix("Input should be ") for m in more)])
        described.append((path, message))
    return described


def problems_message(problems: list[tuple[str, str]]) -> str:
    """`invalid request: path: message; ...` for the first five problems."""
    return "invalid request: " + "; ".join(f"{path}: {msg}" if path else msg for path, msg in problems[:5])


def _containers(path: str) -> set[str]:
    """The paths `path` is inside: "" and each prefix that a `.` or `[` follows. Collected once
    for all errors: comparing every error's path with every other's took 24 s of the event
    loop for the 8000 errors of 4000 messages with a number as content, and 33000 such
    messages (a 1 MB body) would have held it for half an hour."""
    return {""} | {path[:i] for i, ch in enumerate(path) if ch in ".["} if path else set()


# Characters of a client's header value quoted in an error message, at most.
QUOTED_HEADER_CHARS = 100


def quoted_header(value: str) -> str:
    """A client's header value for an error message: repr-quoted (control characters
    escaped), cut after QUOTED_HEADER_CHARS characters with the full length said."""
    if len(value) <= QUOTED_HEADER_CHARS:
        return repr(value)
    return f"{value[:QUOTED_HEADER_CHARS]!r}... ({len(value)} characters)"


def unsupported_encoding(request: Request) -> str | None:
    """The 415's message for a body sent with a Content-Encoding (gzip, br, ...): the server
    reads bodies as sent and decodes none. None without one (or with `identity`)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    return f"request bodies are read uncompressed: Content-Encoding {quoted_header(encoding)} is not supported"


def has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "0").strip()
    return length != "0" or "chunked" in request.headers.get("transfer-encoding", "").lower()


def validation_error(request: Request, exc: RequestValidationError) -> ApiError:
    """The 400 (or 415) for FastAPI's validation errors, naming where each problem is."""
    errors = exc.errors()
    invalid_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid_json is not None:
        if (refusal := unsupported_encoding(request)) is not None:  # read as sent, they fail to parse
            return ApiError(415, refusal)
        reason = (invalid_json.get("ctx") or {}).get("error")
        return bad_request("the request body is not valid JSON" + (f" ({reason})" if reason else ""))
    not_an_object = {"missing", "model_attributes_type", "dict_type", "model_type"}
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in not_an_object for e in errors):
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if content_type.strip() and media != "application/json" and not media.endswith("+json"):
            return ApiError(
                415,
                f"the request body must be JSON (Content-Type: application/json), not {quoted_header(content_type)}",
            )
        if not media and has_body(request):  # FastAPI reads no JSON without the header
            return ApiError(415, "the request body must be JSON sent with Content-Type: application/json (none given)")
        return bad_request("the request body must be a JSON object")
    inputs = {"body": exc.body, "query": request.query_params, "header": request.headers,
              "path": request.path_params, "cookie": request.cookies}  # fmt: skip
    problems = []
    for source, data in inputs.items():
        # FastAPI's locations begin with the part of the request they are in.
        located = [{**e, "loc": tuple(e["loc"])[1:]} for e in errors if tuple(e.get("loc", ()))[:1] == (source,)]
        problems += validation_problems(located, data) if located else []
    problems = problems or [("", "the request is invalid")]
    return bad_request(problems_message(problems), param=problems[0][0] or None)


# Starlette's multipart parser's words for what is wrong with a form body -> ours, which say
# where the problem is.
_MULTIPART_PROBLEMS = {
    "Invalid multipart data.": "the multipart/form-data body could not be parsed (a part's header line is malformed "
    "or too long: a filename of thousands of characters, say)",
    "Missing boundary in multipart.": "the Content-Type multipart/form-data needs its boundary parameter "
    "(multipart/form-data; boundary=...)",
}


def _http_error(request: Request, exc: StarletteHTTPException) -> ApiError:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    detail = _MULTIPART_PROBLEMS.get(detail, detail) if exc.status_code == 400 else detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    reason = "by-status" if exc.status_code < 500 else None
    return ApiError(
        exc.status_code, detail, param=getattr(exc, "param", None), reason=reason, headers=getattr(exc, "headers", None)
    )


def count_rejection(request: Request, exc: ApiError) -> None:
    if exc.reason is not None:
        request.app.state.gateway.metrics.rejections.labels(reason=exc.reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    """The one place exceptions become responses."""

    async def respond(request: Request, exc: ApiError) -> Response:
        count_rejection(request, exc)
        if isinstance(exc, EngineDead):
            logger.error("request failed: %s", exc.message)
        return api_error_response(exc)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return await respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return await respond(request, validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_http(request: Request, exc: StarletteHTTPException) -> Response:
        return await respond(request, _http_error(request, exc))
