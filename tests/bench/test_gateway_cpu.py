"""benchmarks/gateway_cpu.py end to end on the tiny checkpoint: a real server, real requests."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a heavy case: `make test-slow` and CI run it


def test_reports_api_process_cpu_per_request(tiny_checkpoint, tmp_path):
    out = tmp_path / "gateway-cpu.json"
    proc = subprocess.run([sys.executable, "-m", "mdlserve.benchmarks.gateway_cpu", "--model", tiny_checkpoint,
                           "--requests", "6", "--concurrency", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert result["requests"] == 6 and result["concurrency"] == 3 and result["clip_s"] == 30.0
    # Six 30 s WAV bodies (1.3 MB of base64 each) cannot be parsed, decoded and processed for free.
    assert 0.5 < result["api_process_cpu_ms_per_request"] < 5000
    # Both times are counted in clock ticks (10 ms), and the kernel derives the process's
    # from its threads' run time: with the JSON parsed on the loop the two are close and the
    # loop's may lead by a tick or so, never by more.
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    slack = 2 * tick_ms / result["requests"]
    assert 0 < result["event_loop_cpu_ms_per_request"] <= result["api_process_cpu_ms_per_request"] + slack
    assert result["wall_s"] > 0
