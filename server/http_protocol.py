"""uvicorn's httptools protocol with the two header limits uvicorn itself lacks.

uvicorn bounds neither the size of a request's headers (a 1 MiB header was accepted) nor
the time they take to arrive (a client sending half a request line held its connection
forever: slow-loris). Here a request's line and headers must total at most
MAX_HEADER_BYTES (else 431) and arrive within HEADER_TIMEOUT_S of the connection opening
or of the request's first byte (else 408, connection closed). The body's own time limit
is BodySizeLimitMiddleware's (server/middleware.py).

While a request's app reads its body, the socket is paused only past READING_HIGH_WATER
buffered bytes instead of uvicorn's 64 KiB (see `on_body`).

The 408 waits for one more turn of the event loop after the deadline. uvloop runs due
timers before it reads sockets, so when the loop was held up past the deadline (a long
callback, the process descheduled on a loaded machine) headers that arrived in time were
still unread when the timer fired, and a prompt client got a 408 (tests/gateway/
test_http_protocol.py reproduces it; a CI run once answered a long request of
test_lifecycle.py with this 408).
"""

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mdlserve.server.errors import ApiError, envelope

MAX_HEADER_BYTES = 64 << 10
HEADER_TIMEOUT_S = 10.0
# After the deadline, the loop reads what has arrived before this timer refuses.
LAST_READ_S = 0.05
# Unread body bytes a connection buffers before its socket pauses, once its app reads the
# body (before that, uvicorn's HIGH_WATER_LIMIT of 64 KiB).
READING_HIGH_WATER = 4 << 20
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_CODES = {400: "invalid_http", 408: "headers_timeout", 431: "headers_too_large"}


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; uvicorn then calls send_400_response."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = True
        self._raw_header_bytes = 0
        self._parsed_header_bytes = 0
        self._refusal: tuple[int, str] | None = None
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Earlier chunks all belonged to the unfinished headers: bounds what the parser buffers.
        if self._in_headers and self._raw_header_bytes > MAX_HEADER_BYTES:
            self._send_refusal(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
            return
        if self._in_headers:
            self._raw_header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._parsed_header_bytes = 0
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_timed_out)

    def on_url(self, url: bytes) -> None:
        self._parsed_header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_header_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._raw_header_bytes = 0
        self._cancel_header_timer()
        if self._parsed_header_bytes > MAX_HEADER_BYTES:
            self._refusal = (431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
            raise _Refused()
        super().on_headers_complete()
        _mark_reads(self.cycle)

    def on_body(self, body: bytes) -> None:
        """uvicorn's `on_body` pauses the socket whenever 64 KiB of body wait unread. Until
        the app reads, that bounds what a request waiting for the body budget (server/
        middleware.py) holds. Once the app reads, the budget has granted it the whole body,
        and pausing every 64 KiB only costs a pause, a resume and a turn of the event loop
        per 64 KiB: about 20 for a 30 s clip's 1.3 MB, 0.6 ms of the API process's CPU per
        request on the 2-core VM (benchmarks/results/2026-12-03-cpu-body-flow). So while the
        app reads, the socket pauses only past READING_HIGH_WATER unread bytes."""
        cycle = self.cycle
        if not getattr(cycle, "app_reads", False):
            super().on_body(body)
            return
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > READING_HIGH_WATER:
            self.flow.pause_reading()
        cycle.message_event.set()

    def send_400_response(self, msg: str) -> None:
        self._send_refusal(*(self._refusal or (400, "not a valid HTTP/1.1 request")))

    def _headers_timed_out(self) -> None:
        self._header_timer = self.loop.call_later(LAST_READ_S, self._refuse_unfinished_headers)

    def _refuse_unfinished_headers(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.logger.warning("request headers not received within %g s; closing the connection", HEADER_TIMEOUT_S)
            self._send_refusal(408, f"request headers not received within {HEADER_TIMEOUT_S:g} s")

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _send_refusal(self, status: int, message: str) -> None:
        """The error envelope every other refusal has, written before the app sees the request."""
        body = envelope(ApiError(status, message, code=_CODES[status])).model_dump_json().encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


def _mark_reads(cycle) -> None:
    """Wrap uvicorn's request cycle's `receive` so that the cycle's `app_reads` turns true at
    the app's first read (uvicorn's task looks `receive` up only when the app starts)."""
    read = cycle.receive

    async def receive():
        cycle.app_reads = True
        return await read()

    cycle.app_reads = False
    cycle.receive = receive
