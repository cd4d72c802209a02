"""`mdl-serve serve` pauses the cyclic garbage collector for its start-up imports (cli.py);
vLLM's engine core is forked from the serving process and must not inherit the pause.

vLLM's launch functions are replaced by recorders of the collector's state at the moment
they are called (the moment of the fork): no engine starts here."""

import gc

import pytest

from mdlserve.server import cli
from mdlserve.server.engine import VllmEngine
from mdlserve.server.metrics import GatewayMetrics
from mdlserve.server.settings import Settings


class Launched(Exception):
    """Raised by the recorders in place of a launch."""


@pytest.fixture
def collector_paused():
    gc.disable()
    yield
    gc.enable()


def small(checkpoint: str, **overrides) -> Settings:
    return Settings(model=checkpoint, enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=2,
                    kv_cache_bytes=1 << 28, port=0, **overrides)  # fmt: skip


def test_serve_starts_with_the_collector_paused_and_leaves_it_on(monkeypatch):
    seen = []
    monkeypatch.setattr("mdlserve.server.serve.serve", lambda settings: seen.append(gc.isenabled()) or 0)
    assert cli.main(["serve", "--model", "/nonexistent"]) == 0
    assert seen == [False] and gc.isenabled()


def test_the_gateways_engine_core_is_forked_with_the_collector_on(tiny_checkpoint, monkeypatch, collector_paused):
    from vllm.v1.engine.async_llm import AsyncLLM

    seen = []

    def record(cls, config, **kwargs):
        seen.append(gc.isenabled())
        raise Launched

    monkeypatch.setattr(AsyncLLM, "from_vllm_config", classmethod(record))
    with pytest.raises(Launched):
        VllmEngine(small(tiny_checkpoint), GatewayMetrics())._build()
    assert seen == [True]


def test_the_supervisors_engine_cores_are_forked_with_the_collector_on(tiny_checkpoint, monkeypatch, collector_paused):
    from mdlserve.server.api_processes import serve_api_processes

    seen = []

    def record(*args, **kwargs):
        seen.append(gc.isenabled())
        raise Launched

    monkeypatch.setattr("vllm.v1.engine.utils.launch_core_engines", record)
    assert serve_api_processes(small(tiny_checkpoint, api_processes=2)) == 1  # "the engine failed to start"
    assert seen == [True]
