"""Server life cycle on vLLM's default engine path (torch.compile, multiprocessing; the
`lifecycle` server of conftest.py): audio_url over real HTTP (`--allowed-networks
127.0.0.1/32` lets it through the SSRF guard), no auth when no keys are set,
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
TOKENS = 3500


class Origin:
    """A local audio host. GET /held.wav answers only once `release` is set: a request
    fetching it is admitted and stays in flight for as long as the test wants, whatever the
    machine's speed (the long generations alone finished before the checks on a fast one)."""

    def __init__(self):
        self.held_requested = threading.Event()
        self.release = threading.Event()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/hop":
                    self.send_response(301)
                    self.send_header("Location", "/clip.wav")
                    self.end_headers()
                    return
                if self.path == "/held.wav":
                    origin.held_requested.set()
                    origin.release.wait(timeout=60)
                self.send_response(200)
                self.send_header("Content-Length", str(len(CLIP)))
                self.end_headers()
                self.wfile.write(CLIP)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(scope="module")
def origin():
    origin = Origin()
    threading.Thread(target=origin.server.serve_forever, daemon=True).start()
    yield origin
    origin.release.set()
    origin.server.shutdown()


def _held_request(http: httpx.Client, origin: Origin) -> tuple[int, int]:
    part = {"type": "audio_url", "audio_url": {"url": origin.url + "/held.wav"}}
    r = http.post("/v1/chat/completions", json=chat_body(part, max_tokens=2, min_tokens=2))
    return r.status_code, r.json()["usage"]["completion_tokens"]


def _request(http: httpx.Client, stream: bool) -> tuple[int, int]:
    body = chat_body(audio_part(CLIP), max_tokens=TOKENS, min_tokens=TOKENS, stream=stream,
                     stream_options={"include_usage": True} if stream else None)
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        return r.status_code, r.json()["usage"]["completion_tokens"]
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, f"{r.status_code} {r.read().decode()}"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return r.status_code, int(lines[-2].split('"completion_tokens":')[1].split(",")[0])


def test_serving_then_graceful_sigterm_under_load(servers, origin):
    server = servers.lifecycle
    server.wait_ready()
    assert metric(httpx.get(server.url + "/metrics").text, "mdl_engine_up") == 1

    # No API keys configured: no Authorization needed. audio_url over HTTP, with a redirect.
    for path in ("/clip.wav", "/hop"):
        part = {"type": "audio_url", "audio_url": {"url": origin.url + path}}
        r = httpx.post(server.url + "/v1/chat/completions", json=chat_body(part, max_tokens=2), timeout=120)
        assert r.status_code == 200, r.text

    # One client shared by the threads: a client per request spends seconds on TLS set-up
    # under load, so the requests would not arrive together.
    http = httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=8))
    with http, ThreadPoolExecutor(5) as pool:
        long_ones = [pool.submit(_request, http, stream) for stream in (False, True, False, True)]
        # Every long request admitted: in flight now, or already finished (on a fast machine
        # some do). Finished ones are counted first, so one finishing in between is missed
        # for a round rather than counted twice.
        deadline = time.monotonic() + 60
        while (admitted := sum(f.done() for f in long_ones)
               + metric(httpx.get(server.url + "/metrics").text, "mdl_clips_in_flight")) < len(long_ones):
            assert time.monotonic() < deadline, f"long requests admitted: {admitted} of {len(long_ones)}"
            time.sleep(0.2)
        held = pool.submit(_held_request, http, origin)
        assert origin.held_requested.wait(timeout=60), "the held request never fetched its audio"
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            draining = httpx.get(server.url + "/health/ready")
        except httpx.ConnectError:
            pytest.fail(f"not listening 0.3 s after SIGTERM (exit code {server.process.poll()}):\n"
                        f"{server.log_tail(6000)}")
        assert draining.status_code == 503 and draining.json()["status"] == "draining", \
            f"{draining.status_code} {draining.text}\n{server.log_tail(3000)}"
        refused = httpx.post(server.url + "/v1/chat/completions", json=chat_body(audio_part(CLIP)))
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert server.process.poll() is None  # still draining: the held request is in flight
        origin.release.set()
        results = [f.result(timeout=300) for f in long_ones]
        assert held.result(timeout=60) == (200, 2)
    assert results == [(200, TOKENS)] * 4  # every in-flight request finished in full
    assert server.process.wait(timeout=120) == 0
    assert "drained: no requests in flight" in server.log_tail(50000)
