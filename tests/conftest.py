"""Shared fixtures: a generated tiny checkpoint, and the fast engine environment.

The environment of tests/fast_engine.py (FAST_ENV) brings a tiny engine's start from ~30 s
to ~2 s on a CPU with identical greedy outputs; tests marked `slow` start engines on vLLM's
default multiprocess path instead. Helpers shared by every folder: fast_engine.py (engine
settings), clips.py (the synthetic clip generator).
"""

import os

import pytest

from fast_engine import FAST_ENV

for _name, _value in {**FAST_ENV, "VLLM_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from mdlserve.model_plugin.checkpoints import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny"))
