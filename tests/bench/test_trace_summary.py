"""trace_summary: busy fraction, idle gaps and kernel families of a profiler trace."""

import gzip
import json

import pytest

from mdlserve.benchmarks import trace_summary


def _kernel(name: str, ts: float, dur: float, cat: str = "kernel", correlation: int | None = None) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _host(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 10, correlation: int | None = None) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
            "args": {"correlation": correlation}}  # fmt: skip


@pytest.fixture
def trace(tmp_path):
    # Device timeline (µs): [0,100) gemm, [50,150) attention overlapping it, a 350 µs gap,
    # [500,600) memcpy, a 50 µs gap, [650,700) rms norm. During the large gap (midpoint
    # 325) the thread that launched the memcpy (tid 10) is inside execute_model > aten::to;
    # another thread's events and the events that ended before the midpoint do not count.
    events = [
        _kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 100),
        _kernel("flash_fwd_splitkv_kernel", 50, 100),
        _kernel("Memcpy HtoD (Pageable -> Device)", 500, 100, cat="gpu_memcpy", correlation=7),
        _kernel("vllm::rms_norm_kernel", 650, 50),
        _host("execute_model", 100, 600, cat="user_annotation"),
        _host("aten::zeros", 120, 100),
        _host("aten::to", 300, 220),
        _host("cudaMemcpyAsync", 490, 20, cat="cuda_runtime", correlation=7),
        _host("other thread", 0, 1000, tid=20),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 10},
    ]
    path = tmp_path / "worker.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_busy_fraction_gaps_and_families(trace):
    summary = trace_summary.summarize(trace_summary.load_trace(trace)[0])
    assert summary["device_events"] == 4
    assert summary["span_ms"] == pytest.approx(0.700)
    assert summary["busy_ms"] == pytest.approx(0.300)  # 150 + 100 + 50: the overlap counts once
    assert summary["busy_fraction"] == pytest.approx(3 / 7)
    assert summary["gaps_over_100us"] == {"count": 1, "total_ms": pytest.approx(0.350), "largest_ms": [0.350]}
    assert summary["families_ms"] == {"gemm": 0.1, "attention": 0.1, "copy": 0.1, "norm": 0.05}
    assert [k["family"] for k in summary["top_kernels"]][-1] == "norm"
    assert summary["top_kernels"][0]["count"] == 1
    # without host events the gap is not attributed to any thread
    assert summary["idle_by_host_op_ms"] == {trace_summary.NO_LAUNCHER: pytest.approx(0.350)}


def test_gaps_are_placed_and_attributed_to_the_launching_thread(trace):
    device, host = trace_summary.load_trace(trace)
    assert len(device) == 4 and len(host) == 5
    summary = trace_summary.summarize(device, host=host)
    assert summary["idle_by_host_op_ms"] == {"aten::to": pytest.approx(0.350)}
    assert summary["largest_gaps"] == [{"at_ms": pytest.approx(0.150), "ms": pytest.approx(0.350),
                                        "next": "Memcpy HtoD (Pageable -> Device)",
                                        "host_stack": ["execute_model", "aten::to"]}]  # fmt: skip


def test_a_gap_outside_every_host_event_is_python(trace):
    device, host = trace_summary.load_trace(trace)
    host = [e for e in host if e["name"] in ("cudaMemcpyAsync", "other thread")]
    summary = trace_summary.summarize(device, host=host)
    assert summary["idle_by_host_op_ms"] == {trace_summary.NO_HOST_EVENT: pytest.approx(0.350)}
    assert summary["largest_gaps"][0]["host_stack"] == []


def test_cli_writes_json_and_prints_a_table(trace, tmp_path, capsys):
    out = tmp_path / "summary.json"
    trace_summary.main([str(trace), "--out", str(out)])
    assert json.loads(out.read_text())["trace"] == trace.name
    printed = capsys.readouterr().out
    assert "GPU busy 42.9%" in printed and "1 gaps >= 0.1 ms" in printed
    assert "idle by host event: aten::to 0.3 ms" in printed
    assert "gap 0.35 ms at 0.1 ms: execute_model > aten::to" in printed


def test_a_trace_without_device_events(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps([{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 3}]))
    summary = trace_summary.summarize(trace_summary.load_trace(path)[0])
    assert summary == {"device_events": 0}
    assert trace_summary.table(summary) == "no device events in the trace"
