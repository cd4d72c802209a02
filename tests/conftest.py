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


# Folders whose modules share session-scoped servers (the conftest.py there).
SHARED_SERVER_FOLDERS = {"api", "gateway", "reliability"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How `make test`'s two pytest-xdist workers (`-n 2`) share the suite: a folder of
    SHARED_SERVER_FOLDERS is one unit of work, so one worker runs it and starts its servers
    once; every other module is a unit of its own (its module-scoped engines start once).
    Units go out most tests first. (xdist's own `--dist loadgroup` marks do not group on
    pytest 9.2: it renames items through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedServerScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]  # tests/<folder>/test_x.py
            folder = module.split("/")[1]
            return folder if folder in SHARED_SERVER_FOLDERS else module

    return SharedServerScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from mdlserve.model_plugin.checkpoints import make_checkpoint

    return str(make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny"))
