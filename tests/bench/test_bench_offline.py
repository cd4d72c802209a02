"""The offline comparison end to end on CPU: benchmarks/gpu_compare.sh at smoke size.

Runs the exact script the GPU run uses (tiny checkpoint instead of 7b), so both
implementations' workers, the result files and the script itself are exercised.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a heavy case: `make test-slow` and CI run it

REPO = Path(__file__).resolve().parents[2]
BATCHES, TTFT_CLIPS, REPEATS = [1, 2], [2.0, 4.0], 2


@pytest.fixture(scope="module")
def compare_run(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "results"
    env = dict(os.environ, PYTHON=sys.executable, BENCH_CHECKPOINT=tiny_checkpoint,
               BENCH_BATCHES=",".join(map(str, BATCHES)), BENCH_TTFT_CLIPS="2,4", BENCH_TTFT_REPEATS=str(REPEATS),
               BENCH_TIME_BUDGET_S="600", BENCH_EXTRA_ARGS="--smoke --dtype float32")  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_compare.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plugin/builtin" in proc.stdout  # the final table
    return out


def test_summary_structure_and_consistency(compare_run):
    summary = json.loads((compare_run / "summary.json").read_text())
    for key, kind in (("gpu", str), ("vllm", str), ("torch", str), ("commit", str), ("date", str),
                      ("preset", str), ("dtype", str), ("engine_args", dict), ("throughput", list), ("ttft", list)):
        assert isinstance(summary[key], kind), key  # fmt: skip
    assert summary["gpu"] == "cpu" and summary["preset"] == "tiny" and summary["dtype"] == "float32"
    assert summary["quantization"] is None and summary["engine_args"]["load_format"] == "dummy"
    assert summary["errors"] == []
    assert summary["impls"]["plugin"]["model_class"].startswith("mdlserve.model_plugin")
    assert summary["impls"]["builtin"]["model_class"].startswith("vllm.model_executor.models.midashenglm")

    rows = {(r["impl"], r["batch"]): r for r in summary["throughput"]}
    assert set(rows) == {(i, b) for i in ("plugin", "builtin") for b in BATCHES}
    for (impl, batch), r in rows.items():
        assert r["via"] == "engine" and r["clip_s"] == 4.0 and r["out_tokens_per_clip"] == 8
        assert r["output_tokens"] == batch * r["out_tokens_per_clip"]
        # wall_s is stored to 4 decimals: on a fast machine a smoke batch takes ~0.04 s, so the
        # rate recomputed from it carries up to 0.00005 / wall_s of relative rounding error.
        rounding = 0.00005 / r["wall_s"]
        assert r["wall_s"] > 0 and r["samples_per_s"] == pytest.approx(batch / r["wall_s"], rel=1e-3 + rounding)

    ttft = {(r["impl"], r["clip_s"]): r for r in summary["ttft"]}
    assert set(ttft) == {(i, c) for i in ("plugin", "builtin") for c in TTFT_CLIPS}
    for r in ttft.values():
        assert r["n"] == REPEATS and 0 < r["median_ms"] <= r["p90_ms"] and r["ttft_source"] == "engine_metrics"
    assert ttft[("plugin", 4.0)]["prompt_tokens"] > ttft[("plugin", 2.0)]["prompt_tokens"]  # more audio tokens

    ratios = summary["ratios"]
    assert len(ratios) == len(BATCHES) + len(TTFT_CLIPS) and all(r["speedup"] > 0 for r in ratios)


def test_raw_requests_and_artifacts(compare_run):
    requests = json.loads((compare_run / "raw.json").read_text())["requests"]
    throughput = [r for r in requests if r["kind"] == "throughput"]
    assert len(throughput) == 2 * sum(BATCHES) and all(r["output_tokens"] == 8 for r in throughput)
    ttft = [r for r in requests if r["kind"] == "ttft"]
    assert len(ttft) == 2 * len(TTFT_CLIPS) * (REPEATS + 1)  # one warm-up per length
    assert {p.name for p in compare_run.iterdir()} >= {"summary.json", "raw.json", "summary.md", "throughput.png",
                                                       "ttft.png", "logs"}  # fmt: skip
    assert "| 2 |" in (compare_run / "summary.md").read_text()
