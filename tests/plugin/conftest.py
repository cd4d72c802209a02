"""Fixtures for the plugin tests: one shared in-process engine, the reference, clips.

One `vllm.LLM` serves every in-process test (engine start dominates the runtime on a
CPU); engines that need a different process setup (vLLM's built-in implementation,
the default multiprocess path) run through `engine_runner.py` in subprocesses.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fast_engine import FAST_ENGINE_KWARGS

from .engine_runner import PROMPT, SR, make_clip, run_in_subprocess

# L % 640 >= 480: centred framing adds a patch beyond the last valid one; at 640*504+500
# samples it is alone in the third chunk (252 + 252 + 1 patches) and has no valid key.
TRAILING_PATCH_SAMPLES = 640 * 504 + 500


def audio_prompt(clip: np.ndarray, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"audio": clip}}


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    import vllm

    return vllm.LLM(model=tiny_checkpoint, **FAST_ENGINE_KWARGS)


@pytest.fixture(scope="session")
def greedy():
    import vllm

    return vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _embed_on_model(clips: list[np.ndarray]):
    """Callable for `LLM.apply_model`: the plugin's audio embeddings for already-padded clips."""

    def run(model) -> list[torch.Tensor]:
        with torch.no_grad():
            out = model.embed_multimodal(
                input_values=[torch.from_numpy(c) for c in clips],
                audio_length=torch.tensor([c.shape[0] for c in clips]),
            )
        return [t.detach().cpu().clone() for t in out]

    return run


@pytest.fixture(scope="session")
def plugin_embeddings(engine):
    """Embeddings from the engine's own model instance for a list of processor-ready clips."""

    def embed(clips: list[np.ndarray]) -> list[torch.Tensor]:
        return engine.apply_model(_embed_on_model(clips))[0]

    return embed


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    from .reference_dasheng import ReferenceMiDashengLMAudio

    return ReferenceMiDashengLMAudio(tiny_checkpoint)


def run_engine_subprocess(
    checkpoint: str, clips: list[np.ndarray], tmp_path: Path, *, env_overrides: dict, unset: tuple = ()
) -> dict:
    """Run `engine_runner.py` on the clips in a fresh interpreter; return its JSON."""
    clips_file = tmp_path / "clips.npz"
    np.savez(clips_file, *clips)
    env = dict(os.environ)
    for name in unset:
        env.pop(name, None)
    env.update(env_overrides)
    return run_in_subprocess(checkpoint, str(clips_file), env)
