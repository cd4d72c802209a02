"""Shared fixtures: a generated tiny checkpoint and fast in-process engine settings.

TORCHDYNAMO_DISABLE=1 with enforce_eager and VLLM_ENABLE_V1_MULTIPROCESSING=0 bring a
tiny engine's start from ~30 s to ~2 s on a CPU with identical greedy outputs; tests
marked `slow` start engines on vLLM's default multiprocess path instead.
"""

import os

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from mdlserve.model_plugin.checkpoints import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny"))
