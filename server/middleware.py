"""ASGI middleware: request ids, access metrics and logs, last-resort 500s, the admission
gate, body size limit and the budget of body bytes held at once.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
duration covers the last byte sent.
"""

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mdlserve.server.deps import api_key_error
from mdlserve.server.errors import (
    CLIENT_CLOSED,
    CLIENT_CLOSED_FLAG,
    ApiError,
    BodyTimeout,
    PayloadTooLarge,
    api_error_response,
    internal_error_body,
)
from mdlserve.server.metrics import GatewayMetrics
from mdlserve.server.routes import ALL_PATHS, API_PATHS, OPS_PATHS, WORK_PATHS, is_read_path, needs_api_key
from mdlserve.server.session import Arrival
from mdlserve.server.state import GatewayState

logger = logging.getLogger("mdlserve.server")
access_logger = logging.getLogger("mdlserve.server.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (from the request being handled, or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class LenientRoutingMiddleware:
    """Serves what probes and hand-written clients send that FastAPI would refuse or
    redirect: HEAD on a GET route (load balancers probe with it; FastAPI's routes, unlike
    Starlette's, do not take it) runs as the GET, and the ASGI server sends no body; a known
    path with a trailing slash runs as the path (FastAPI's redirect names an absolute
    http:// URL, wrong behind a TLS proxy). Runs first: auth, admission and metrics see the
    route served."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if len(path) > 1 and path.endswith("/") and path.rstrip("/") in ALL_PATHS:
                path = path.rstrip("/")
                scope = {**scope, "path": path, "raw_path": path.encode()}
            if scope["method"] == "HEAD" and is_read_path(path):
                scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class RequestContextMiddleware:
    """Assigns the request id (a sane client `X-Request-ID` or a new one) and the arrival
    time (`Arrival`: what the latency metrics count from, the body's upload and parsing
    included), echoes the id in the response, records mdl_requests_total /
    mdl_request_duration_seconds, and turns an unhandled exception into a 500 that names
    only the request id."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = _header(scope, b"x-request-id")
        request_id = client_id if client_id and _SANE_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        arrival = Arrival(time.perf_counter(), time.time())
        scope.setdefault("state", {}).update(request_id=request_id, arrival=arrival)
        token = request_id_var.set(request_id)
        route = scope["path"] if scope["path"] in ALL_PATHS else "other"
        started = arrival.monotonic
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not response_started:
                body = json.dumps(internal_error_body(request_id)).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
            status = 500
        finally:
            elapsed = time.perf_counter() - started
            if scope["state"].get(CLIENT_CLOSED_FLAG):
                status = CLIENT_CLOSED
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.api_process_requests.inc()
            self.metrics.request_duration.labels(route=route).observe(elapsed)
            access_logger.info("%s %s %d %.3fs", scope["method"], scope["path"], status, elapsed)
            request_id_var.reset(token)


class AuthMiddleware:
    """`Authorization: Bearer <key>` on the API routes when keys are configured (and on
    health and metrics with --auth-health-metrics), checked from the headers: a 401 is
    answered before the request's body is read or parsed."""

    def __init__(self, app: ASGIApp, state: GatewayState):
        self.app = app
        self.state = state
        self.protected = API_PATHS | (OPS_PATHS if state.settings.auth_health_metrics else frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if scope["type"] == "http" and state.api_keys and needs_api_key(scope["path"], self.protected):
            refusal = api_key_error(_header_values(scope, b"authorization"), state.api_keys)
            if refusal is not None:
                state.metrics.rejections.labels(reason=refusal.reason).inc()
                await api_error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionGateMiddleware:
    """Reserves one admission unit when a work request's headers arrive, or answers 429 at
    once, before the body is read, when there is none (Admission.reserve). Requests the
    routes answer differently pass untouched: while loading, after an engine death or
    while draining (503); unauthenticated ones never get here (AuthMiddleware). The route
    takes the reservation over when it admits the request; if it never does (a 4xx, a 429
    at the request's real weight, a client gone) the reservation is released when the
    response is done."""

    def __init__(self, app: ASGIApp, state: GatewayState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in WORK_PATHS or not state.ready:
            await self.app(scope, receive, send)
            return
        reservation = state.admission.reserve()
        if reservation is None:
            refusal = state.admission.full()
            state.metrics.rejections.labels(reason=refusal.reason).inc()
            await api_error_response(refusal)(scope, receive, send)
            return
        scope.setdefault("state", {})["admission_reservation"] = reservation
        try:
            await self.app(scope, receive, send)
        finally:
            reservation.release()


class BodyGrant:
    """Bytes a request may hold of the body budget; `release()` is idempotent (the session
    releases it when the request reaches the engine, the middleware when the response is done)."""

    def __init__(self, budget: "BodyBudget", size: int):
        self.budget = budget
        self.size = size
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._give_back(self.size)


class BodyBudget:
    """Request-body bytes held at once, across requests (--max-body-bytes-in-flight): a
    request takes its declared size before its body is read and gives it back when it
    reaches the engine or ends. Requests that do not fit wait in arrival order; a body
    larger than the whole budget takes all of it, so it waits for the others but can pass."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int, deadline: float) -> BodyGrant | None:
        """A grant of `size` bytes (capped at the budget), or None if it was not free by
        `deadline` (loop time)."""
        size = min(size, self.limit)
        if not self._waiting and self.used + size <= self.limit:
            self.used += size
            return BodyGrant(self, size)
        turn = asyncio.get_running_loop().create_future()
        entry = (size, turn)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():  # granted as the wait ended
                if isinstance(exc, TimeoutError):
                    return BodyGrant(self, size)
                self._give_back(size)
                raise
            self._waiting.remove(entry)
            self._wake()  # the next one may fit now
            if isinstance(exc, TimeoutError):
                return None
            raise
        return BodyGrant(self, size)

    def _give_back(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            size, turn = self._waiting.popleft()
            self.used += size
            turn.set_result(None)

    def busy(self, waited: float) -> ApiError:
        return ApiError(
            429,
            f"the server is reading too many request bodies at once (its budget of {self.limit} bytes, "
            f"--max-body-bytes-in-flight, stayed full for {waited:g} s); retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


class BodySizeLimitMiddleware:
    """Answers 413 as soon as a request body passes `max_bytes`: at once when
    Content-Length says so, otherwise while the body streams in (Content-Length absent or
    lying), before it is buffered. Answers 408 when the whole body has not arrived within
    `body_timeout` seconds of the request (slow-loris uploads).

    Bounds the bytes of bodies held at once (`budget`, BodyBudget): before reading a body
    the request takes its Content-Length (`max_bytes` when chunked) from the budget, waiting
    in line while it is full (its body unread: the server's socket buffers hold the rest),
    and gets a 429 if it is still full at the body deadline. The grant is in the request's
    scope state (`body_grant`) for the session to give back when the request reaches the
    engine; otherwise it is given back when the response is done."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: GatewayMetrics, body_timeout: float, budget: BodyBudget):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send)
            return
        received = 0
        body_complete = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.body_timeout
        if declared is not None:
            size = int(declared)
        else:  # chunked: as much as it may send; no Transfer-Encoding either: no body
            size = self.max_bytes if _header(scope, b"transfer-encoding") is not None else 0
        grant = await self.budget.take(size, deadline) if size else None
        if size and grant is None:
            refusal = self.budget.busy(round(loop.time() - started, 1))
            self.metrics.rejections.labels(reason=refusal.reason).inc()
            await api_error_response(refusal)(scope, receive, send)
            return
        scope.setdefault("state", {})["body_grant"] = grant

        async def counting_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
                body_complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if grant is not None:
                grant.release()

    async def _reject(self, send: Send) -> None:
        self.metrics.rejections.labels(reason="payload_too_large").inc()
        body = json.dumps({"error": {
            "message": f"request body exceeds the limit of {self.max_bytes} bytes (--max-upload-bytes)",
            "type": "invalid_request_error", "param": None, "code": "payload_too_large",
        }}).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]
