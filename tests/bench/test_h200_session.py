"""benchmarks/h200_session.sh at CPU size (SMOKE=1, the tiny checkpoint): the script a GPU
lease runs unattended, so a phase that breaks here would waste device time there."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a heavy case: `make test-slow` and CI run it

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "h200_session.sh"


def run_phase(phase: str, out: Path, work: Path, checkpoint: str, **env: str) -> dict[str, bytes]:
    """Run one phase; returns the files of its archive ($OUT/<phase>.tgz) by name."""
    environ = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "WORK": str(work), "CHECKPOINT": checkpoint,
               "PORT": "18431", **env}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), phase, str(out)], env=environ, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / f"{phase}.log").stat().st_size > 0
    with tarfile.open(out / f"{phase}.tgz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def test_engine_phase_keeps_two_runs_of_one_setting_apart(tiny_checkpoint, tmp_path):
    levers = {"first": "", "again": "mm_processor_cache_gb=0;max_num_batched_tokens=2048"}
    for tag, engine_args in levers.items():
        files = run_phase("engine", tmp_path / "out", tmp_path / "work", tiny_checkpoint, TAG=tag, PROFILE="0",
                          ENGINE_ARGS=engine_args)  # fmt: skip
    for tag in ("first", "again"):
        summary = json.loads(files[f"engine/default-16384-{tag}/summary.json"])
        assert summary["errors"] == []
        expected = {"mm_processor_cache_gb": 0, "max_num_batched_tokens": 2048} if tag == "again" else {}
        assert summary["engine_args"]["extra"] == expected
        assert [r["batch"] for r in summary["throughput"]] == [2, 2]
        (ttft,) = summary["ttft"]
        assert ttft["n"] == 1 and ttft["engine_step_median_ms"] > 0


def test_gateway_phase_serves_both_modes_in_the_order_given_with_the_extra_flags_the_anchors_and_restarts(
    tiny_checkpoint, tmp_path
):
    files = run_phase("gateway", tmp_path / "out", tmp_path / "work", tiny_checkpoint, RESTART="1", ANCHOR="2", C1="1",
                      MODES="stream,nostream", SERVE_ARGS="--served-model-name smoke-served --cudagraph-mode FULL")  # fmt: skip
    for mode in ("nostream", "stream"):
        summary = json.loads(files[f"gateway/c2-{mode}-api2/summary.json"])
        (row,) = summary["serve"]
        assert row["ok"] == row["requests"] == 8 and row["stream"] is (mode == "stream")
        assert summary["model_name"] == "smoke-served"  # SERVE_ARGS reached the server
    log = (tmp_path / "out" / "gateway.log").read_text()
    assert log.index("c2-stream-api2") < log.index("c2-nostream-api2")
    anchor = json.loads(files["gateway/anchor-api2/summary.json"])  # ANCHOR: the anchors beside ours
    assert [(r["tool"], r["ok"]) for r in anchor["runs"]] == [
        ("ours", 4), ("vllm", 4), ("ours", 4), ("locust", 4), ("vllm", 4), ("ours", 4), ("locust", 4), ("ours", 4)]  # fmt: skip
    lone = json.loads(files["gateway/anchor-c1-api2/summary.json"])  # C1 with ANCHOR: vLLM's client at c=1 too
    assert [(r["tool"], r["concurrency"], r["ok"]) for r in lone["runs"]] == [
        ("ours", 1, 20), ("vllm", 1, 20), ("vllm", 1, 20), ("ours", 1, 20)]  # fmt: skip
    for start in ("api2", "api2-restart"):
        assert files[f"gateway/ready-{start}.txt"].startswith(b"server ready after ")


def test_start_phase_records_the_start_under_its_label(tiny_checkpoint, tmp_path):
    files = run_phase("start", tmp_path / "out", tmp_path / "work", tiny_checkpoint, LABEL="warm")
    assert files["start/ready-warm.txt"].startswith(b"server ready after ")


def test_gateway_phase_with_modes_set_empty_runs_only_the_lone_requests(tiny_checkpoint, tmp_path):
    files = run_phase("gateway", tmp_path / "out", tmp_path / "work", tiny_checkpoint, C1="1", MODES="")
    (row,) = json.loads(files["gateway/c1-stream-api2/summary.json"])["serve"]
    assert row["ok"] == row["requests"] and row["stream"] is True
    assert not [name for name in files if name.startswith("gateway/c2-")]  # no level at the full concurrency
