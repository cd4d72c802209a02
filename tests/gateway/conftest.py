"""One gateway server per test session (real `mdl-serve serve` subprocess, fast engine).

Small limits so the limit tests are cheap: 2 MiB bodies, 20 s of audio, 1 MiB fetches;
4 running + 4 queued clip units for the backpressure tests; API keys on; a 15 s request
timeout; a media dir for file:// URLs. The SSRF guard is on (test_lifecycle.py runs the
server that may fetch from a local HTTP server).
"""

import pytest

from .helpers import ServerProcess

API_KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
UPLOAD_LIMIT = 2 << 20
MAX_AUDIO_SECONDS = 20
MAX_NUM_SEQS = 4
MAX_QUEUE = 4
REQUEST_TIMEOUT_S = 15


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def gateway(tiny_checkpoint, tmp_path_factory, media_dir):
    server = ServerProcess(tiny_checkpoint, [
        "--media-dir", str(media_dir), "--max-upload-bytes", str(UPLOAD_LIMIT),
        "--max-audio-seconds", str(MAX_AUDIO_SECONDS), "--fetch-max-bytes", str(1 << 20), "--fetch-timeout", "3",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE), "--api-keys", ",".join(API_KEYS),
        "--request-timeout", str(REQUEST_TIMEOUT_S),
    ], tmp_path_factory.mktemp("logs"), name="gateway")  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()
