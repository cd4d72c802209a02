"""`mdl-serve bench hostile` end to end at a tiny size: a real server on the tiny checkpoint,
each hostile body once."""

import json
import subprocess
import sys

import pytest

from mdlserve.benchmarks.hostile_gateway import hostile_bodies

pytestmark = pytest.mark.slow  # a heavy case: `make test-slow` and CI run it


def test_bench_hostile_reports_memory_and_loop_lag_and_no_5xx(tiny_checkpoint, tmp_path):
    cases = list(hostile_bodies())
    out, server_log = tmp_path / "hostile.json", tmp_path / "server.log"
    proc = subprocess.run([sys.executable, "-m", "mdlserve.server.cli", "bench", "hostile", "--model", tiny_checkpoint,
                           "--requests", str(len(cases)), "--concurrency", "2", "--out", str(out),
                           "--server-arg=--max-body-bytes-in-flight=33554432", "--server-log", str(server_log)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + server_log.read_text()[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == len(cases) and result["concurrency"] == 2
    assert result["server_5xx"] == 0
    assert sum(result["statuses"].values()) == len(cases)
    assert {name: sum(counts.values()) for name, counts in result["by_case"].items()} == dict.fromkeys(cases, 1)
    # The longest accepted WAV is answered; garbage, lying headers and oversized JSON are 4xx.
    assert result["by_case"]["longest accepted WAV (~580 s)"] == {"200": 1}
    for case in ("random bytes as base64 audio", "lone surrogates", "JSON: 10^7 elements", "bad audio_url"):
        assert list(result["by_case"][case]) == ["400"], case
    assert 0 < result["rss_baseline_mib"] <= result["rss_peak_mib"]
    assert abs(result["rss_growth_peak_mib"] - (result["rss_peak_mib"] - result["rss_baseline_mib"])) <= 1
    assert result["rss_after_mib"] > 0 and result["event_loop_lag_samples"] > 0
    assert result["worst_event_loop_lag_at_most_ms"] > 0
    assert result["server_args"] == ["--max-body-bytes-in-flight=33554432"]
    assert len(result["load_average_1min_before_after"]) == 2
