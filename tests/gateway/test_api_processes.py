"""Several API processes over one engine (`--api-processes 2`): real `mdl-serve serve`
subprocesses on a tiny checkpoint, real HTTP.

The two processes share one port (both serve requests), one admission count (the limits
bound the server, not each process), one /metrics (any process answers with the sum over
both); SIGTERM to the supervisor drains both and exits 0 leaving no process behind; an
engine core's death stops everything with exit code 1.
"""

import asyncio
import signal
import time

import httpx
import psutil
import pytest

from mdlserve.server.settings import Settings

from .helpers import ServerProcess, audio_file, audio_part, chat_body, descendants, metric, named, terminate_all

API_PROCESSES = 2
MAX_NUM_SEQS = 2
MAX_QUEUE = 0  # both holding streams run at once (one queued would wait for the other)
CAPACITY = MAX_NUM_SEQS + MAX_QUEUE
START_TIMEOUT_S = 900
EXIT_WAIT_S = 120.0
LONG_TOKENS = 1900  # with ignore_eos: a stream that cannot finish while the test looks at it

pytestmark = pytest.mark.slow


# The tests that end the server they are given (SIGTERM, engine death).
ENDS_THE_SERVER = ("test_sigterm_drains_every_process_and_exits_zero",
                   "test_engine_core_death_stops_everything_with_exit_code_1")  # fmt: skip


class SharedServer:
    """The module's server, replaced only after a test has ended it: the SIGTERM and
    engine-death tests end theirs (in file order the SIGTERM test is the last user of the
    first server and the death test has the second: two starts instead of three), and any
    order, e.g. `-p randomly`, still gives every test a live server.

    The `planned` servers (one per selected test that ends one) start together: a server's
    start keeps about one of the machine's two cores busy, so the second one loads while
    the first one serves, instead of after it."""

    def __init__(self, checkpoint: str, log_dir, planned: int):
        self.checkpoint, self.log_dir, self.planned = checkpoint, log_dir, planned
        self.current: ServerProcess | None = None
        self.loading: list[ServerProcess] = []  # started, not handed out yet
        self.starts = 0

    def _launch(self) -> ServerProcess:
        self.starts += 1
        return ServerProcess(self.checkpoint, [
            "--api-processes", str(API_PROCESSES), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
        ], self.log_dir, name=f"api-processes-{self.starts}")  # fmt: skip

    def get(self) -> ServerProcess:
        if self.current is None or self.current.process.poll() is not None:
            if self.current is not None:
                self.current.terminate()
            self.current = self.loading.pop(0) if self.loading else self._launch()
            while self.starts < self.planned:
                self.loading.append(self._launch())
            self.current.wait_ready(timeout=START_TIMEOUT_S)
        return self.current

    def stop(self) -> None:
        terminate_all([server for server in (self.current, *self.loading) if server is not None])


@pytest.fixture(scope="module")
def shared_server(request, tiny_checkpoint, tmp_path_factory):
    ending = [item for item in request.session.items
              if getattr(item, "module", None) is request.module and item.originalname in ENDS_THE_SERVER]  # fmt: skip
    shared = SharedServer(tiny_checkpoint, tmp_path_factory.mktemp("api-processes"), planned=max(len(ending), 1))
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def server(shared_server) -> ServerProcess:
    return shared_server.get()


def wait_idle(server: ServerProcess) -> None:
    """Until no clip unit is admitted: a stream an earlier test cancelled is aborted by the
    server soon after, not at once, and until then it holds a unit of the capacity."""
    deadline = time.monotonic() + 120
    while metric(httpx.get(server.url + "/metrics", timeout=30).text, "mdl_clips_in_flight") > 0:
        assert time.monotonic() < deadline, "the server's admitted units never drained"
        time.sleep(0.5)


def test_setting_is_a_flag_and_an_environment_variable(monkeypatch):
    monkeypatch.setenv("MDL_API_PROCESSES", "3")
    assert Settings().api_processes == 3
    with pytest.raises(ValueError, match="api_processes"):
        Settings(api_processes=0)


def test_both_processes_serve_and_metrics_add_up(server):
    """Requests on fresh connections land on both processes (the kernel hands each
    connection to whichever accepts it); every answer is the same greedy caption; the
    chat counter any process reports is the sum over both."""
    body = chat_body(audio_part(audio_file(seconds=1.0)), max_tokens=4)
    answers = set()
    for _ in range(6):
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        answers.add(response.json()["choices"][0]["message"]["content"])
    assert len(answers) == 1
    served = [0.0] * API_PROCESSES
    deadline = time.monotonic() + 120
    while min(served) == 0 and time.monotonic() < deadline:
        httpx.get(server.url + "/health/live", timeout=30)  # a new connection each time
        text = httpx.get(server.url + "/metrics", timeout=30).text
        served = [metric(text, "mdl_api_process_requests_total", api_process=str(i)) for i in range(API_PROCESSES)]
    assert min(served) > 0, served
    for _ in range(3):  # whichever process answers, the totals are the server's
        text = httpx.get(server.url + "/metrics", timeout=30).text
        assert metric(text, "mdl_requests_total", route="/v1/chat/completions", status="200") == 6
        assert metric(text, "mdl_engine_up") == 1


def test_admission_is_shared_by_the_processes(server):
    """Capacity 2 for the whole server: n=3 never fits (400 naming 2, not a per-process
    share); with two streams holding both units, a third request is refused with 429 by
    whichever process takes it."""
    clip = audio_part(audio_file(seconds=1.0))
    too_big = httpx.post(server.url + "/v1/chat/completions", json=chat_body(clip, n=3, temperature=1), timeout=60)
    assert too_big.status_code == 400, too_big.text
    assert f"admits at most {CAPACITY}" in too_big.text

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            holding = chat_body(clip, max_tokens=LONG_TOKENS, ignore_eos=True, stream=True)
            first_tokens = asyncio.Queue()

            async def hold():
                async with client.stream("POST", server.url + "/v1/chat/completions", json=holding) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            await first_tokens.put(True)
                            await asyncio.sleep(3600)  # cancelled below

            streams = [asyncio.create_task(hold()) for _ in range(CAPACITY)]
            for _ in range(CAPACITY):
                await asyncio.wait_for(first_tokens.get(), timeout=300)
            refused = []
            for _ in range(4):  # fresh connections: whichever process accepts them
                async with httpx.AsyncClient(timeout=60) as other:
                    refused.append(await other.post(server.url + "/v1/chat/completions", json=chat_body(clip)))
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return refused

    refused = asyncio.run(run())
    assert [r.status_code for r in refused] == [429] * 4, [r.text for r in refused]
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)


def test_sigterm_drains_every_process_and_exits_zero(server):
    """A stream in flight when SIGTERM arrives still finishes; then the supervisor exits 0
    and neither API processes nor engine cores are left running."""
    wait_idle(server)
    try:
        children = descendants(server.process.pid)
        assert len(named(children, "EngineCore")) >= 1
        body = chat_body(audio_part(audio_file(seconds=1.0)), max_tokens=200, ignore_eos=True, stream=True)

        async def run():
            async with (
                httpx.AsyncClient(timeout=300) as client,
                client.stream("POST", server.url + "/v1/chat/completions", json=body) as response,
            ):
                assert response.status_code == 200
                lines = []
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if len(lines) == 1:
                            server.process.send_signal(signal.SIGTERM)
                return lines

        lines = asyncio.run(run())
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in lines[-2] or '"finish_reason": "length"' in lines[-2], lines[-2]
        assert server.process.wait(timeout=EXIT_WAIT_S) == 0, server.log_tail()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], alive
    finally:
        server.terminate()


def test_engine_core_death_stops_everything_with_exit_code_1(server):
    try:
        children = descendants(server.process.pid)
        (core, *_) = named(children, "EngineCore")
        core.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=EXIT_WAIT_S) == 1, server.log_tail()
        _, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], alive
        assert "exited" in server.log_tail()
    finally:
        server.terminate()
