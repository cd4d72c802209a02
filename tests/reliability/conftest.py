"""Servers and the report collector of the reliability suite.

Four real `mdl-serve serve` processes (tests/gateway/helpers.ServerProcess) start together
on first use so their engine loads overlap:
  guarded: production settings for security (SSRF guard on, API keys, debug logging) with
           small limits; hostile input, SSRF, auth and slow-loris tests.
  open:    `--allowed-networks 127.0.0.1/32` so audio_url reaches local test HTTP servers;
           load, disconnects, timeouts and URL-fetch failures.
  killed:  its engine process is SIGKILLed by the engine-death test.
  drained: SIGTERMed under load by the drain test.
Both security servers load tests/reliability/server_hooks/sitecustomize.py: a resolver that
never sends DNS queries and a log of every connect() the server makes.

`--heavy` (or MDL_RELIABILITY_HEAVY=1) lengthens the soak and multiplies the request counts.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.helpers import ServerProcess, terminate_all

from .report import ReliabilityReport

HOOKS_DIR = Path(__file__).parent / "server_hooks"
API_KEY = "sk-reliability-7f3a9c1e5b2d"
OTHER_API_KEY = "sk-reliability-second-4e8b"
MAX_NUM_SEQS = 2
MAX_QUEUE = 2
UPLOAD_LIMIT = 1 << 20
FETCH_MAX_BYTES = 64 << 10
FETCH_TIMEOUT_S = 2
# guarded: the slow-upload cases wait this long for their 408, and every real request must
# finish inside it on a busy 2-core machine (at 10 s, a 1 s clip with 4 output tokens once
# took longer beside two busy loops); open: long, so that load on a shared CPU is judged on
# lost requests, not on the timeout doing its job. The timeout itself is tested with the
# gateway's fake engine (tests/gateway/test_gateway_behaviour.py).
GUARDED_REQUEST_TIMEOUT_S = 30
OPEN_REQUEST_TIMEOUT_S = 120
GUARDED_MAX_MODEL_LEN = 4096
MAX_AUDIO_SECONDS = 30
DRAIN_TIMEOUT_S = 90
# Names the hooked resolver answers (nothing else resolves except localhost and numeric hosts).
TEST_HOSTS = {
    "private-alias.test": ["10.20.30.40"],
    "metadata-alias.test": ["169.254.169.254"],
    "ula-alias.test": ["fd12:3456:789a::1"],
    "loopback-alias.test": ["127.0.0.1"],
    "mixed-alias.test": ["93.184.216.34", "10.0.0.7"],
    "loopback-v6-alias.test": ["::1"],
}


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true", default=False,
                     help="reliability suite: long soak and larger request counts (also MDL_RELIABILITY_HEAVY=1)")


@pytest.fixture(scope="session")
def heavy(request) -> bool:
    return request.config.getoption("--heavy", default=False) or os.environ.get("MDL_RELIABILITY_HEAVY") == "1"


@pytest.fixture(scope="session")
def reliability_report(tmp_path_factory, heavy):
    report = ReliabilityReport(heavy=heavy)
    yield report
    directory = Path(os.environ.get("MDL_RELIABILITY_REPORT_DIR") or tmp_path_factory.mktemp("reliability-report"))
    json_path, _ = report.write(directory)
    print(f"\nreliability report: {json_path}")


@dataclass
class HookedServer:
    """A server plus the connect() log its sitecustomize hook writes."""

    server: ServerProcess
    connect_log: Path

    @property
    def url(self) -> str:
        return self.server.url

    def connected_to(self) -> list[tuple[str, int]]:
        if not self.connect_log.exists():
            return []
        entries = []
        for line in self.connect_log.read_text().splitlines():
            host, _, port = line.rpartition(" ")
            entries.append((host, int(port)))
        return entries


def _hook_env(connect_log: Path) -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(HOOKS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": python_path, "MDL_RELIABILITY_HOSTS": json.dumps(TEST_HOSTS),
            "MDL_RELIABILITY_CONNECT_LOG": str(connect_log)}


class _Servers:
    def __init__(self, checkpoint: str, tmp_path_factory):
        self.logs = tmp_path_factory.mktemp("reliability-logs")
        small = ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
                 "--max-audio-seconds", str(MAX_AUDIO_SECONDS), "--fetch-timeout", str(FETCH_TIMEOUT_S),
                 "--fetch-max-bytes", str(FETCH_MAX_BYTES)]
        self.guarded = HookedServer(ServerProcess(
            checkpoint, [*small, "--api-keys", f"{API_KEY},{OTHER_API_KEY}", "--max-upload-bytes", str(UPLOAD_LIMIT),
                         "--request-timeout", str(GUARDED_REQUEST_TIMEOUT_S), "--log-level", "debug",
                         "--max-model-len", str(GUARDED_MAX_MODEL_LEN)],
            self.logs, env=_hook_env(self.logs / "guarded-connects.log"), name="guarded",
        ), self.logs / "guarded-connects.log")  # fmt: skip
        self.open = HookedServer(ServerProcess(
            checkpoint, [*small, "--request-timeout", str(OPEN_REQUEST_TIMEOUT_S), "--allowed-networks", "127.0.0.1/32"],
            self.logs, env=_hook_env(self.logs / "open-connects.log"), name="open",
        ), self.logs / "open-connects.log")  # fmt: skip
        lifecycle = ["--max-num-seqs", "4", "--max-queue", "4", "--drain-timeout", str(DRAIN_TIMEOUT_S)]
        self.killed = ServerProcess(checkpoint, lifecycle, self.logs, name="killed")
        self.drained = ServerProcess(checkpoint, [*lifecycle, "--allowed-networks", "127.0.0.1/32"], self.logs,
                                     name="drained")

    def stop(self) -> None:
        terminate_all([self.guarded.server, self.open.server, self.killed, self.drained])


@pytest.fixture(scope="session")
def _servers(tiny_checkpoint, tmp_path_factory):
    servers = _Servers(tiny_checkpoint, tmp_path_factory)
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def guarded_server(_servers) -> HookedServer:
    _servers.guarded.server.wait_ready()
    return _servers.guarded


@pytest.fixture(scope="session")
def open_server(_servers) -> HookedServer:
    _servers.open.server.wait_ready()
    return _servers.open


@pytest.fixture(scope="session")
def killed_server(_servers) -> ServerProcess:
    _servers.killed.wait_ready()
    return _servers.killed


@pytest.fixture(scope="session")
def drained_server(_servers) -> ServerProcess:
    _servers.drained.wait_ready()
    return _servers.drained


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
