"""A misbehaving audio host on 127.0.0.1 for URL-fetch fault tests (one path per fault)."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .traffic import CLIP


class MisbehavingAudioHost:
    """Paths: /audio.wav (a valid clip), /stall (no response for `stall_s`), /stall-body
    (headers, then silence), /truncated (closes after 1/10 of the declared length),
    /oversize (declares and sends `oversize` bytes), /oversize-undeclared (the same without
    Content-Length), /loop (redirects to itself), /gated (the clip once `gate` is set;
    `gated_fetch_started` tells that a fetch is waiting), /missing (404)."""

    def __init__(self, stall_s: float, oversize: int):
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                host.requests += 1
                route = {
                    "/audio.wav": host._audio, "/stall": host._stall, "/stall-body": host._stall_body,
                    "/truncated": host._truncated, "/oversize": host._oversize,
                    "/oversize-undeclared": host._oversize_undeclared, "/loop": host._loop, "/gated": host._gated,
                }.get(self.path, host._missing)  # fmt: skip
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.stall_s = stall_s
        self.oversize = oversize
        self.requests = 0
        self.gate = threading.Event()
        self.gated_fetch_started = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for name, value in (headers or {"Content-Length": str(len(body))}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _audio(self, handler) -> None:
        self._send(handler, 200, CLIP, {"Content-Type": "audio/wav", "Content-Length": str(len(CLIP))})

    def _stall(self, handler) -> None:
        time.sleep(self.stall_s)
        handler.close_connection = True

    def _stall_body(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(CLIP)))
        handler.end_headers()
        handler.wfile.write(CLIP[:100])
        handler.wfile.flush()
        time.sleep(self.stall_s)
        handler.close_connection = True

    def _truncated(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(CLIP)))
        handler.end_headers()
        handler.wfile.write(CLIP[: len(CLIP) // 10])
        handler.close_connection = True

    def _oversize(self, handler) -> None:
        self._send(handler, 200, bytes(self.oversize))

    def _oversize_undeclared(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(bytes(self.oversize))
        handler.close_connection = True

    def _loop(self, handler) -> None:
        self._send(handler, 302, b"", {"Location": "/loop", "Content-Length": "0"})

    def _gated(self, handler) -> None:
        self.gated_fetch_started.set()
        self.gate.wait(timeout=self.stall_s)
        self._audio(handler)

    def _missing(self, handler) -> None:
        self._send(handler, 404, b"not here")
