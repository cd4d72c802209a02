"""Gateway servers for the test session (real `mdl-serve serve` subprocesses).

gateway: fast engine; small limits so the limit tests are cheap (2 MiB bodies, 20 s of
audio, 1 MiB fetches); 4 running + 4 queued clip units for the backpressure tests; API
keys on; a 30 s request timeout (room for any real request on a busy 2-core machine; the
timeout itself is tested in process with the fake engine); a media dir for file:// URLs;
the SSRF guard on.
lifecycle (only when test_lifecycle.py is selected): vLLM's default engine path, no API
keys, and `--allowed-networks 127.0.0.1/32` so audio_url can reach a local HTTP server
through the SSRF guard. Both start together so their (slow, on CPU) engine loads overlap.
"""

import httpx
import pytest

from .helpers import ServerProcess, terminate_all

API_KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
UPLOAD_LIMIT = 2 << 20
MAX_AUDIO_SECONDS = 20
MAX_NUM_SEQS = 4
MAX_QUEUE = 4
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


class Servers:
    def __init__(self, checkpoint: str, logs, media_dir, with_lifecycle: bool):
        self.gateway = ServerProcess(checkpoint, [
            "--media-dir", str(media_dir), "--max-upload-bytes", str(UPLOAD_LIMIT),
            "--max-audio-seconds", str(MAX_AUDIO_SECONDS), "--fetch-max-bytes", str(1 << 20),
            "--fetch-timeout", "3", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
            "--api-keys", ",".join(API_KEYS), "--request-timeout", str(REQUEST_TIMEOUT_S),
            "--max-model-len", "4096",
        ], logs, name="gateway")  # fmt: skip
        self.lifecycle = ServerProcess(
            # The held audio_url (test_lifecycle) must outlast a slow test: with the default 10 s
            # fetch timeout it ended in a 400, the drain then found nothing in flight and the
            # server exited before the test looked (the old intermittent "connection refused").
            checkpoint, ["--max-model-len", "4096", "--drain-timeout", "240", "--fetch-timeout", "300",
                         "--allowed-networks", "127.0.0.1/32"], logs, fast=False, name="lifecycle",
        ) if with_lifecycle else None
        # What /health/* said while the gateway's engine was loading (asserted in test_api.py).
        self.while_loading: dict[str, httpx.Response] = {}

    def stop(self) -> None:
        terminate_all([server for server in (self.gateway, self.lifecycle) if server is not None])


@pytest.fixture(scope="session")
def servers(request, tiny_checkpoint, tmp_path_factory, media_dir):
    with_lifecycle = any("test_lifecycle" in item.nodeid for item in request.session.items)
    started = Servers(tiny_checkpoint, tmp_path_factory.mktemp("logs"), media_dir, with_lifecycle)
    try:
        started.gateway.wait_listening()
        url = started.gateway.url
        started.while_loading = {
            "ready": httpx.get(url + "/health/ready", timeout=10),
            "live": httpx.get(url + "/health/live", timeout=10),
            "chat": httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=10, json={
                "model": "midashenglm-7b", "messages": [{"role": "user", "content": "hi"}]}),
        }  # fmt: skip
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def gateway(servers) -> ServerProcess:
    servers.gateway.wait_ready()
    return servers.gateway
