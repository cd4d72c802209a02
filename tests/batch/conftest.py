"""Batch-job fixtures: ~100 generated clips (good and bad), one engine and decode pool
shared by the in-process jobs, and a runner for `mdl-serve batch` subprocesses.

In-process jobs run `BatchJob.execute` on the shared engine (a tiny checkpoint, the fast
CPU settings of tests/fast_engine.py) so each job costs its rows, not an engine start;
the kill -9 test and the CLI tests start real `mdl-serve batch` processes.
"""

import asyncio
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fast_engine import FAST_ENGINE_KWARGS

from mdlserve.benchmarks.common import SAMPLE_RATE, make_clip, wav_bytes

MAX_AUDIO_SECONDS = 20
GOOD_CLIPS = 98  # 96 WAV + 2 FLAC
BAD_CLIPS = {"corrupt.wav": "invalid_audio", "empty.wav": "invalid_audio", "too-long.wav": "invalid_audio"}
FAST_SETTINGS = dict(dtype=FAST_ENGINE_KWARGS["dtype"], max_model_len=FAST_ENGINE_KWARGS["max_model_len"],
                     enforce_eager=True, kv_cache_bytes=FAST_ENGINE_KWARGS["kv_cache_memory_bytes"],
                     max_audio_seconds=MAX_AUDIO_SECONDS)  # fmt: skip
FAST_FLAGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--kv-cache-bytes",
              str(256 << 20), "--max-audio-seconds", str(MAX_AUDIO_SECONDS)]  # fmt: skip


def clip_seconds(i: int) -> float:
    return 0.5 + (i % 7) * 0.4


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory) -> Path:
    """98 decodable clips in two folders (0.5-2.9 s), three bad ones, one non-audio file."""
    root = tmp_path_factory.mktemp("clips")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(96):
        folder = root / ("a" if i < 48 else "b")
        (folder / f"clip{i:03d}.wav").write_bytes(wav_bytes(make_clip(clip_seconds(i), (7, i))))
    for i in (96, 97):
        soundfile.write(root / "b" / f"clip{i:03d}.flac", make_clip(clip_seconds(i), (7, i)), SAMPLE_RATE)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 4)
    (root / "empty.wav").write_bytes(b"")
    (root / "too-long.wav").write_bytes(wav_bytes(np.zeros((MAX_AUDIO_SECONDS + 5) * SAMPLE_RATE, np.float32)))
    (root / "notes.txt").write_text("not audio, not listed")
    return root


@pytest.fixture(scope="session")
def clip_server(clips_dir):
    """The clips over real HTTP on 127.0.0.1 (manifests with URLs)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clips_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@dataclass
class Runtime:
    loop: asyncio.AbstractEventLoop
    engine: object
    decoder: object
    checkpoint: str

    def settings(self, **overrides):
        from mdlserve.server.settings import Settings

        return Settings(model=self.checkpoint, max_num_seqs=16, **{**FAST_SETTINGS, **overrides})

    def run(self, input: str, output: Path, **options) -> tuple[dict, list[dict]]:
        """One job on the shared engine; returns its summary and the output file's rows."""
        from mdlserve.server.batch.options import BatchOptions
        from mdlserve.server.batch.runner import BatchJob

        opts = BatchOptions(input=str(input), output=output, progress="none", max_in_flight=16,
                            **{"max_tokens": 8, **options})  # fmt: skip
        job = BatchJob(opts, self.settings())
        summary = self.loop.run_until_complete(job.execute(self.engine, self.decoder))
        return summary, read_rows(Path(summary["output"]))  # {shard} filled in


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def runtime(tiny_checkpoint):
    from mdlserve.server.batch.loading import ProcessDecodePool
    from mdlserve.server.engine import VllmEngine
    from mdlserve.server.metrics import GatewayMetrics
    from mdlserve.server.settings import Settings

    loop = asyncio.new_event_loop()
    engine = VllmEngine(Settings(model=tiny_checkpoint, max_num_seqs=16, **FAST_SETTINGS), GatewayMetrics())
    decoder = ProcessDecodePool(2)
    loop.run_until_complete(engine.start())
    yield Runtime(loop, engine, decoder, tiny_checkpoint)
    engine.shutdown()
    decoder.shutdown()
    loop.run_until_complete(_cancel_pending())
    loop.close()


async def _cancel_pending() -> None:
    """vLLM's output handler and socket tasks, so the loop closes without warnings."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def batch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mdlserve.server.cli", "batch", *args]


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)  # fmt: skip


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])
