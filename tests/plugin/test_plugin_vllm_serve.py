"""`vllm serve` with the plugin installed: vLLM's own OpenAI server runs our implementation.

This is what a user gets who installs the package into their vLLM and starts vLLM's
server on a MiDashengLM checkpoint: the `vllm` command (which on a CPU machine needs
the `vllm` metadata alias that the setup scripts write), an audio chat request answered
200 through the real `openai` client, and proof that our classes served it:
- vLLM's own model-inspection log (VLLM_LOG_MODEL_INSPECTION=1) shows the loaded model's
  module tree, and only our implementation has a `LogMelFrontEnd`;
- a WAV whose samples include NaN is refused with our processor's message (vLLM looks the
  processor up by the resolved model class; the built-in would encode the NaNs).
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
from clips import SR, make_clip
from fast_engine import FAST_VLLM_SERVE_FLAGS as VLLM_SERVE_FLAGS

from mdlserve.model_plugin.processing import num_audio_tokens

pytestmark = pytest.mark.slow  # a heavy case: `make test-slow` and CI run it

START_TIMEOUT_S = 600
SERVED_NAME = "midashenglm-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wav_base64(samples: np.ndarray) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SR, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def _audio_message(samples: np.ndarray) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "Caption the audio."},
        {"type": "input_audio", "input_audio": {"data": _wav_base64(samples), "format": "wav"}},
    ]}]  # fmt: skip


class VllmServe:
    """`vllm serve CHECKPOINT` (the venv's console script) on a free loopback port."""

    def __init__(self, checkpoint: str, log_path: Path):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log_path
        command = [
            str(Path(sys.executable).with_name("vllm")), "serve", checkpoint,
            "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
            "--served-model-name", SERVED_NAME, *VLLM_SERVE_FLAGS,
        ]  # fmt: skip
        env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO", VLLM_LOG_MODEL_INSPECTION="1")
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def vllm_server(tiny_checkpoint, tmp_path_factory):
    server = VllmServe(tiny_checkpoint, tmp_path_factory.mktemp("vllm-serve") / "vllm-serve.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(vllm_server):
    with openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_vllm_command_reports_its_version():
    import vllm

    out = subprocess.run(
        [str(Path(sys.executable).with_name("vllm")), "--version"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith(vllm.__version__)


def test_audio_chat_answered_by_our_implementation(vllm_server, client, engine):
    """200 with the greedy answer our in-process engine (vllm.LLM, same checkpoint) gives."""
    import vllm

    messages = _audio_message(make_clip(3 * SR, seed=7))
    reply = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8, temperature=0.0)
    (expected,) = engine.chat(messages, vllm.SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    audio_token_id = engine.get_tokenizer().convert_tokens_to_ids("<|AUDIO|>")
    assert expected.prompt_token_ids.count(audio_token_id) == num_audio_tokens(3 * SR) == 15
    assert "LogMelFrontEnd" in vllm_server.log()


def test_nan_samples_refused_by_our_processor(vllm_server, client):
    samples = make_clip(SR, seed=8)
    samples[100] = np.nan
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SERVED_NAME, messages=_audio_message(samples), max_tokens=4)
    assert "the waveform contains NaN or infinite samples" in str(refused.value)
