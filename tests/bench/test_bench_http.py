"""HTTP modes (serve, loadtest, soak) at smoke size against a live OpenAI-compatible server.

The server is our gateway (`mdl-serve serve`) when this checkout has it, else vLLM's own
OpenAI server; both on the tiny checkpoint.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile

from mdlserve.benchmarks.cli import main as bench

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    fast = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    if importlib.util.find_spec("mdlserve.server.serve"):
        cmd = [sys.executable, "-m", "mdlserve.server.cli", "serve", "--model", tiny_checkpoint, *fast,
               "--kv-cache-bytes", str(256 << 20)]  # fmt: skip
        ready_path = "/health/ready"
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_checkpoint, *fast]
        ready_path = "/v1/models"
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TORCHDYNAMO_DISABLE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, "server exited:\n" + log.read_text()[-3000:]
            assert time.time() < deadline, "server did not come up:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _load(out) -> tuple[dict, list]:
    return json.loads((out / "summary.json").read_text()), json.loads((out / "raw.json").read_text())["requests"]


def test_serve_closed_and_open_loop(server_url, tmp_path):
    bench(["serve", "--smoke", "--url", server_url, "--out", str(tmp_path), "--ready-timeout-s", "60"])
    summary, raw = _load(tmp_path)
    assert summary["mode"] == "serve" and summary["target_url"] == server_url
    assert [(r["mode"], r["concurrency"], r["request_rate"]) for r in summary["serve"]] == [
        ("closed", 1, None), ("closed", 2, None), ("open", None, 2.0)]  # fmt: skip
    for row in summary["serve"]:
        assert row["via"] == "http" and row["requests"] == row["ok"] == 4 and row["errors"] == {}
        assert row["output_tokens_per_s"] == pytest.approx(4 * 8 / row["duration_s"], rel=1e-3)
        assert row["request_throughput"] == pytest.approx(4 / row["duration_s"], rel=1e-3)
        for metric in ("ttft_ms", "e2e_ms", "tpot_ms"):
            stats = row[metric]
            assert stats["n"] == 4 and 0 < stats["median"] <= stats["p90"] <= stats["p99"]
        assert row["ttft_ms"]["median"] < row["e2e_ms"]["median"]
    assert [(r["batch"], r["via"]) for r in summary["throughput"]] == [(1, "http"), (2, "http")]
    assert len(summary["ttft"]) == 3 and all(r["via"] == "http" and r["n"] == 4 for r in summary["ttft"])
    assert len(raw) == 12 and all(r["ok"] and r["output_tokens"] == 8 for r in raw)
    assert (tmp_path / "serve_latency.png").stat().st_size > 1000 and (tmp_path / "summary.md").exists()


def test_serve_audio_files_non_streaming(server_url, tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", 0.1 * np.random.default_rng(0).standard_normal(24000), 16000)
    out = tmp_path / "out"
    bench(["serve", "--smoke", "--url", server_url, "--audio-dir", str(audio_dir), "--concurrency", "2",
           "--request-rate", "", "--num-requests", "3", "--no-stream", "--out", str(out)])  # fmt: skip
    summary, raw = _load(out)
    (row,) = summary["serve"]
    assert row["ok"] == 3 and row["clip_s"] == 1.5 and not row["stream"] and row["ttft_ms"]["n"] == 0
    assert summary["ttft"] == [] and all(r["output_tokens"] == 8 for r in raw)


@pytest.mark.parametrize("mode", ["loadtest", "soak"])
def test_scenario_runs(server_url, tmp_path, mode):
    extra = ["--duration-s", "4"] if mode == "soak" else []
    bench([mode, "mixed-traffic", "--smoke", "--url", server_url, "--out", str(tmp_path), *extra])
    summary, raw = _load(tmp_path)
    lt = summary["loadtest"]
    assert summary["mode"] == mode and lt["scenario"]["name"] == "mixed-traffic"
    assert lt["scenario"]["duration_s"] == (4.0 if mode == "soak" else 6.0)
    overall = lt["overall"]
    assert overall["requests"] == len(raw) > 0 and overall["error_rate"] == 0.0
    assert sum(w["requests"] for w in lt["windows"]) == len(raw)
    assert sum(k["requests"] for k in lt["by_prompt_kind"].values()) == len(raw)
    assert all(r["clip_s"] <= 4 and 0 < r["output_tokens"] <= 8 for r in raw)
    assert lt["drift"]["e2e_p50_first_ms"] > 0
    assert (tmp_path / "loadtest_drift.png").exists()
