"""Server life cycle on vLLM's default engine path (torch.compile, multiprocessing; the
`lifecycle` server of conftest.py): audio_url over real HTTP (the test-only
MDL_UNSAFE_ALLOW_PRIVATE_URLS lets it reach 127.0.0.1), no auth when no keys are set,
and SIGTERM under load: readiness 503, new work 503, in-flight requests finish, exit 0."""

import http.server
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .helpers import audio_file, audio_part, chat_body, metric

pytestmark = pytest.mark.slow

CLIP = audio_file("wav", 44100, 2, seconds=1.0)
# Long enough that the drain outlasts the checks made right after SIGTERM.
TOKENS = 3500


@pytest.fixture(scope="module")
def origin():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/hop":
                self.send_response(301)
                self.send_header("Location", "/clip.wav")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(CLIP)))
            self.end_headers()
            self.wfile.write(CLIP)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _request(http: httpx.Client, stream: bool) -> tuple[int, int]:
    body = chat_body(audio_part(CLIP), max_tokens=TOKENS, min_tokens=TOKENS, stream=stream,
                     stream_options={"include_usage": True} if stream else None)
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        return r.status_code, r.json()["usage"]["completion_tokens"]
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return r.status_code, int(lines[-2].split('"completion_tokens":')[1].split(",")[0])


@pytest.mark.xfail(strict=False, reason="known flake on vLLM's multiprocess engine path: in some full-suite "
                   "runs the listener was gone 0.3 s after SIGTERM (under investigation; the drain itself "
                   "is covered by tests/reliability/test_faults.py on the in-process path)")
def test_serving_then_graceful_sigterm_under_load(servers, origin):
    server = servers.lifecycle
    server.wait_ready()
    assert metric(httpx.get(server.url + "/metrics").text, "mdl_engine_up") == 1

    # No API keys configured: no Authorization needed. audio_url over HTTP, with a redirect.
    for path in ("/clip.wav", "/hop"):
        part = {"type": "audio_url", "audio_url": {"url": origin + path}}
        r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(part, max_tokens=2), timeout=120)
        assert r.status_code == 200, r.text

    # One client shared by the threads: a client per request spends seconds on TLS set-up
    # under load, so the requests would not arrive together.
    http = httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=8))
    with http, ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(_request, http, stream) for stream in (False, True, False, True)]
        deadline = time.monotonic() + 60
        while metric(httpx.get(server.url + "/metrics").text, "mdl_clips_in_flight") < 4:
            assert time.monotonic() < deadline, "the requests never ran together"
            time.sleep(0.5)  # /metrics is not free: do not starve the server
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        draining = httpx.get(server.url + "/health/ready")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        refused = httpx.post(server.url + "/v1/chat/completions", json=chat_body(audio_part(CLIP)))
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        results = [f.result(timeout=300) for f in in_flight]
    assert results == [(200, TOKENS)] * 4  # every in-flight request finished in full
    assert server.process.wait(timeout=120) == 0
    assert "drained: no requests in flight" in server.log_tail(50000)
