"""One real `mdl-serve serve` (tiny checkpoint, fast engine path) for the API conformance
tests, driven by the official `openai` client and raw httpx.

Its audio limit is long enough for two transcription windows (transcripts.WINDOW_SECONDS)."""

import httpx
import openai
import pytest
from gateway.helpers import ServerProcess

API_KEY = "sk-api-conformance"
MAX_AUDIO_SECONDS = 70


@pytest.fixture(scope="session")
def api_server(tiny_checkpoint, tmp_path_factory):
    server = ServerProcess(
        tiny_checkpoint, ["--api-keys", API_KEY, "--max-audio-seconds", str(MAX_AUDIO_SECONDS),
                          "--max-model-len", "4096", "--request-timeout", "120"],
        tmp_path_factory.mktemp("api-logs"), name="api",
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="session")
def oai(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(api_server):
    with httpx.Client(base_url=api_server.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
