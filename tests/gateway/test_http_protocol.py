"""server/http_protocol.py on uvicorn over uvloop (what `mdl-serve serve` runs) in this
process, driven through raw sockets. The header deadline: a client whose request line never
finishes gets a 408, and one whose headers arrived in time gets its answer even when the
event loop was held up past the deadline before it could read them. The body's flow
control: unread bytes stay within 64 KiB until the app reads, then within
READING_HIGH_WATER, without pausing the socket below it."""

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from mdlserve.server import http_protocol
from mdlserve.server.http_protocol import GuardedHttpToolsProtocol

from .helpers import read_response

HEADER_TIMEOUT_S = 1.0
WAIT_S = 60.0  # generous: how long anything may take on a busy machine
REQUEST = b"GET /hello HTTP/1.1\r\nHost: gateway\r\n\r\n"


class LoopStall:
    """Holds the event loop up inside an I/O callback (where uvloop runs them, before its
    next round of due timers) from just after a connection opens until the test has sent
    its request and the header deadline has passed: a long callback, or the process
    descheduled on a loaded machine, looks like this to the connection."""

    def __init__(self):
        self.holding = threading.Event()
        self.request_sent = threading.Event()

    def start(self, loop) -> None:
        read_end, write_end = os.pipe()

        def hold() -> None:
            loop.remove_reader(read_end)
            os.close(read_end)
            self.holding.set()
            self.request_sent.wait(WAIT_S)
            time.sleep(HEADER_TIMEOUT_S * 1.5)

        loop.add_reader(read_end, hold)
        os.write(write_end, b"x")
        os.close(write_end)


class StallingProtocol(GuardedHttpToolsProtocol):
    stall: LoopStall | None = None  # the next connection opened starts it

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        stall, StallingProtocol.stall = StallingProtocol.stall, None
        if stall is not None:
            stall.start(self.loop)


async def hello(scope, receive, send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


@contextmanager
def running(app, protocol: type[GuardedHttpToolsProtocol]) -> Iterator[tuple[str, int]]:
    """uvicorn over uvloop serving `app` with `protocol` in a thread; yields its address."""
    listening = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=protocol, loop="uvloop", lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield listening.getsockname()
    server.should_exit = True
    thread.join(WAIT_S)
    listening.close()


@pytest.fixture
def server_address(monkeypatch) -> Iterator[tuple[str, int]]:
    monkeypatch.setattr(http_protocol, "HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)
    with running(hello, StallingProtocol) as address:
        yield address


def test_headers_that_never_finish_get_a_408_and_the_connection_closes(server_address):
    with socket.create_connection(server_address, timeout=WAIT_S) as connection:
        connection.sendall(b"GET /hel")
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert _error(answer) == {"message": "request headers not received within 1 s", "type": "invalid_request_error",
                              "param": None, "code": "headers_timeout"}  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status_line", "message", "code"), [
    (REQUEST.replace(b"\r\n\r\n", b"\r\nX-Big: " + b"a" * http_protocol.MAX_HEADER_BYTES + b"\r\n\r\n"),
     b"HTTP/1.1 431 Request Header Fields Too Large", "request headers exceed 65536 bytes", "headers_too_large"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n",
     b"HTTP/1.1 400 Bad Request", "not a valid HTTP/1.1 request", "invalid_http"),
], ids=["headers too large", "not HTTP"])  # fmt: skip
def test_requests_refused_before_the_app_get_the_error_envelope(server_address, request_bytes, status_line, message,
                                                                code):
    with socket.create_connection(server_address, timeout=WAIT_S) as connection:
        connection.sendall(request_bytes)
        answer = read_response(connection)
    assert answer.startswith(status_line + b"\r\n"), answer[:200]
    assert b"\r\ncontent-type: application/json\r\n" in answer
    assert _error(answer) == {"message": message, "type": "invalid_request_error", "param": None, "code": code}


def _error(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_headers_that_arrived_while_the_loop_was_held_up_are_answered(server_address):
    StallingProtocol.stall = stall = LoopStall()
    with socket.create_connection(server_address, timeout=WAIT_S) as connection:
        assert stall.holding.wait(WAIT_S), "the loop stall never started"
        connection.sendall(REQUEST)
        stall.request_sent.set()
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello"), answer


def test_the_deadline_starts_again_for_the_next_request_on_a_kept_alive_connection(server_address):
    with socket.create_connection(server_address, timeout=WAIT_S) as connection:
        connection.sendall(REQUEST)
        assert read_response(connection).endswith(b"hello")
        time.sleep(HEADER_TIMEOUT_S * 1.5)  # idle between requests: not counted
        connection.sendall(REQUEST)
        assert read_response(connection).endswith(b"hello")
        connection.sendall(b"GET /hel")
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer


HOLD_S = 0.3  # how long the body app below waits before its first read, and after it
BODY = bytes(1_500_000)  # a 30 s clip's JSON body is 1.3 MB


class RecordingProtocol(GuardedHttpToolsProtocol):
    """Records after every body chunk: whether the app reads yet, the bytes waiting unread,
    whether reading is paused, and the chunk's size."""

    events: list[tuple[bool, int, bool, int]] = []

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        RecordingProtocol.events.append((self.cycle.app_reads, len(self.cycle.body), self.flow.read_paused, len(body)))


async def slow_reader(scope, receive, send) -> None:
    """Waits before its first read and after it, then answers with the body bytes it got."""
    await asyncio.sleep(HOLD_S)
    received, more, reads = 0, True, 0
    while more:
        message = await receive()
        received += len(message["body"])
        more = message["more_body"]
        reads += 1
        if reads == 1:
            await asyncio.sleep(HOLD_S)
    answer = str(received).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
def body_server_address() -> Iterator[tuple[str, int]]:
    RecordingProtocol.events = []
    with running(slow_reader, RecordingProtocol) as address:
        yield address


def _send_body(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=WAIT_S) as connection:
        connection.sendall(b"POST /body HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        return read_response(connection)


def test_a_body_waits_unread_within_64_kib_and_streams_unpaused_once_the_app_reads(body_server_address):
    answer = _send_body(body_server_address)
    assert answer.endswith(b"\r\n\r\n%d" % len(BODY)), answer  # the app got every byte
    events = RecordingProtocol.events
    chunk = max(size for *_, size in events)
    before = [unread for reads, unread, _, _ in events if not reads]
    assert before and max(before) <= 65536 + chunk  # uvicorn's bound while the app has not read
    reading = [paused for reads, _, paused, _ in events if reads]
    assert reading and not any(reading)  # never paused while the app reads (1.5 MB < READING_HIGH_WATER)


def test_a_reading_app_that_falls_behind_still_pauses_the_socket_at_its_limit(body_server_address, monkeypatch):
    monkeypatch.setattr(http_protocol, "READING_HIGH_WATER", 128 << 10)
    answer = _send_body(body_server_address)
    assert answer.endswith(b"\r\n\r\n%d" % len(BODY)), answer
    events = RecordingProtocol.events
    chunk = max(size for *_, size in events)
    assert max(unread for reads, unread, _, _ in events if reads) <= (128 << 10) + chunk
