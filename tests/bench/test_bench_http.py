"""HTTP modes (serve, loadtest, soak) at smoke size against a live OpenAI-compatible server.

The server is our gateway (`mdl-serve serve`) when this checkout has it, else vLLM's own
OpenAI server; both on the tiny checkpoint. Also the arithmetic of `serve`'s shared window
and of splitting a level over load-generator processes.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile

from mdlserve.benchmarks.cli import main as bench
from mdlserve.benchmarks.http_load import RequestResult, RequestSpec, after_first_wave, window_summary
from mdlserve.benchmarks.load_workers import closed_shares, open_shares, split_proportionally
from mdlserve.benchmarks.server_sampling import MetricsReader, Sample, counter_delta, parse_series

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """The server's URL and the pid of its API process."""
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
        yield SimpleNamespace(url=url, pid=proc.pid, checkpoint=tiny_checkpoint)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _load(out) -> tuple[dict, list]:
    return json.loads((out / "summary.json").read_text()), json.loads((out / "raw.json").read_text())["requests"]


def test_serve_closed_and_open_loop(server, tmp_path):
    bench(["serve", "--smoke", "--url", server.url, "--out", str(tmp_path), "--ready-timeout-s", "60"])
    summary, raw = _load(tmp_path)
    assert summary["mode"] == "serve" and summary["target_url"] == server.url
    assert [(r["mode"], r["concurrency"], r["request_rate"]) for r in summary["serve"]] == [
        ("closed", 1, None), ("closed", 2, None), ("open", None, 2.0)]  # fmt: skip
    for row in summary["serve"]:
        assert row["via"] == "http" and row["requests"] == row["ok"] == 4 and row["errors"] == {}
        assert row["processes"] == 1 and row["requests_per_process"] == [4]
        assert row["total_output_tokens_per_s"] == pytest.approx(4 * 8 / row["duration_s"], rel=1e-3)
        assert row["total_request_throughput"] == pytest.approx(4 / row["duration_s"], rel=1e-3)
        assert row["request_throughput"] == pytest.approx(row["window_completions"] / row["window_s"], rel=1e-3)
        for metric in ("ttft_ms", "e2e_ms", "tpot_ms"):
            stats = row[metric]
            assert stats["n"] == 4 and 0 < stats["median"] <= stats["p90"] <= stats["p99"]
        assert row["ttft_ms"]["median"] < row["e2e_ms"]["median"]
    assert [(r["batch"], r["via"]) for r in summary["throughput"]] == [(1, "http"), (2, "http")]
    assert len(summary["ttft"]) == 3 and all(r["via"] == "http" and r["n"] == 4 for r in summary["ttft"])
    assert len(raw) == 12 and all(r["ok"] and r["output_tokens"] == 8 for r in raw)
    assert isinstance(summary["seed"], int) and all(r["key"][0] == summary["seed"] for r in raw)
    assert len({tuple(r["key"]) for r in raw}) == 12  # no clip sent twice
    assert (tmp_path / "serve_latency.png").stat().st_size > 1000 and (tmp_path / "summary.md").exists()


def test_serve_audio_files_non_streaming(server, tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "a.wav", 0.1 * np.random.default_rng(0).standard_normal(24000), 16000)
    out = tmp_path / "out"
    bench(["serve", "--smoke", "--url", server.url, "--audio-dir", str(audio_dir), "--concurrency", "2",
           "--request-rate", "", "--num-requests", "4", "--no-stream", "--out", str(out)])  # fmt: skip
    summary, raw = _load(out)
    (row,) = summary["serve"]
    assert row["ok"] == 4 and row["clip_s"] == 1.5 and not row["stream"] and row["ttft_ms"]["n"] == 0
    assert summary["ttft"] == [] and all(r["output_tokens"] == 8 for r in raw)


@pytest.mark.parametrize("mode", ["loadtest", "soak"])
def test_scenario_runs(server, tmp_path, mode):
    extra = ["--duration-s", "4"] if mode == "soak" else []
    bench([mode, "mixed-traffic", "--smoke", "--url", server.url, "--out", str(tmp_path), *extra])
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


def _window_checks(row: dict, requests: list[dict]) -> None:
    """The shared window's arithmetic, recomputed from the per-request records."""
    start, end = row["window_start_s"], row["window_end_s"]
    inside = [r for r in requests if start < r["end_s"] <= end]
    assert row["window_completions"] == sum(r["ok"] for r in inside) and row["window_errors"] == 0
    # A closed loop's window ends just after a completion (the one whose user then sent the
    # last request); an open loop's at its last arrival, possibly before anything completed.
    assert row["window_completions"] > 0 or row["mode"] == "open"
    assert row["window_s"] == pytest.approx(end - start, abs=1e-3) and 0 < end <= row["duration_s"]
    assert row["request_throughput"] == pytest.approx(row["window_completions"] / row["window_s"], rel=1e-3)
    assert row["duration_s"] == pytest.approx(max(r["end_s"] for r in requests), abs=1e-3)
    assert row["total_request_throughput"] == pytest.approx(len(requests) / row["duration_s"], rel=1e-3)
    busy = sum(max(0.0, min(r["end_s"], end) - max(r["start_s"], start)) for r in requests)
    assert row["mean_in_flight"] == pytest.approx(busy / row["window_s"], rel=1e-2)
    if row["mode"] == "closed":
        assert 0 < row["mean_in_flight"] <= row["concurrency"] + 1e-3
        e2e_s = np.mean([r["e2e_ms"] for r in inside if r["ok"]]) / 1000
        assert row["littles_law_throughput"] == pytest.approx(row["mean_in_flight"] / e2e_s, rel=1e-2)
    # The window ends when the first worker sent its last request.
    by_worker = {}
    for r in requests:
        by_worker.setdefault(r["worker"], []).append(r)
    assert sorted(len(v) for v in by_worker.values()) == sorted(row["requests_per_process"])
    assert row["first_send_s"] == [min(r["start_s"] for r in by_worker[w]) for w in sorted(by_worker)]
    # A closed loop notes the time just before its last request takes its own start time
    # (later still on a busy machine): the end lies between that worker's last two starts.
    # An open loop notes it once its last request has started.
    starts = [sorted(r["start_s"] for r in rs) for rs in by_worker.values()]
    if row["mode"] == "closed":
        assert any(s[-2] <= end <= s[-1] for s in starts), (end, starts)
    else:
        assert any(s[-1] <= end for s in starts), (end, starts)


def test_serve_processes_share_one_window(server, tmp_path, capsys):
    bench(["serve", "--smoke", "--url", server.url, "--processes", "2", "--concurrency", "4", "--request-rate", "",
           "--num-requests", "16", "--seed", "7", "--server-pid", str(server.pid), "--metrics-interval-s", "0.1",
           "--out", str(tmp_path)])  # fmt: skip
    summary, raw = _load(tmp_path)
    (row,) = summary["serve"]
    assert summary["seed"] == 7 and summary["processes"] == 2
    assert row["processes"] == 2 and row["concurrency_per_process"] == [2, 2] and row["requests_per_process"] == [8, 8]
    assert row["requests"] == row["ok"] == 16 and row["errors"] == {} and row["stream"]
    assert sorted(tuple(r["key"]) for r in raw) == [(7, 11, 0, i) for i in range(16)]  # each request once
    assert all(r["ok"] and r["output_tokens"] == 8 and r["ttft_ms"] > 0 for r in raw)
    _window_checks(row, raw)

    gauges = row["server_in_flight"]
    assert row["metrics_samples"] >= 1 and gauges["mdl_clips_in_flight"]["n"] == row["metrics_samples"]
    for stats in gauges.values():
        assert 0 <= stats["min"] <= stats["median"] <= stats["max"] <= 4
    stages = row["server_stage_ms"]
    assert set(stages) == {"time_to_engine", "ttft"} and 0 < stages["time_to_engine"] < stages["ttft"]
    assert stages["ttft"] <= max(r["ttft_ms"] for r in raw)  # the server's share of what the client saw
    loadgen, api = row["loadgen_cpu"], row["api_cpu"]
    assert 0 <= loadgen["max_process_cores"] <= loadgen["cores"] + 1e-6
    assert loadgen["cores"] == pytest.approx(loadgen["cpu_s"] / row["window_s"], rel=1e-2, abs=1e-3)
    assert api["cpu_ms_per_request"] == pytest.approx(api["cpu_s"] * 1000 / row["window_completions"], rel=1e-2)
    assert api["with_children_cpu_s"] >= api["cpu_s"] - 1e-6  # the engine core is the API process's child
    samples = json.loads((tmp_path / "raw.json").read_text())["samples"]
    assert {s["source"] for s in samples if s["at_window_end"]} == {"metrics", "cpu"}
    assert "| procs |" in capsys.readouterr().out


def test_serve_processes_non_streaming_closed_and_open(server, tmp_path):
    bench(["serve", "--smoke", "--url", server.url, "--processes", "2", "--concurrency", "3", "--request-rate", "4",
           "--num-requests", "7", "--no-stream", "--out", str(tmp_path)])  # fmt: skip
    summary, raw = _load(tmp_path)
    closed, open_ = summary["serve"]
    assert closed["concurrency_per_process"] == [2, 1] and closed["requests_per_process"] == [5, 2]
    assert open_["concurrency_per_process"] is None and open_["requests_per_process"] == [4, 3]
    assert len({tuple(r["key"]) for r in raw}) == len(raw) == 14 and all(r["ok"] for r in raw)
    for row in (closed, open_):
        assert row["ok"] == 7 and not row["stream"] and row["ttft_ms"]["n"] == 0 and row["api_cpu"] is None
        _window_checks(row, [r for r in raw if r["mode"] == row["mode"]])


def test_serve_refuses_fewer_than_two_requests_per_user():
    with pytest.raises(SystemExit, match="less than twice --concurrency 8"):
        bench(["serve", "--url", "http://127.0.0.1:9", "--concurrency", "2,8", "--num-requests", "15"])


def test_split_proportionally_and_shares():
    assert split_proportionally(2048, [128] * 4) == [512] * 4
    assert split_proportionally(12, [3, 2]) == [7, 5] and split_proportionally(10, [1, 1, 1]) == [4, 3, 3]
    specs = [RequestSpec(key=(i,), clip_s=1.0, prompt="p", max_tokens=1, stream=True, exact_tokens=True)
             for i in range(10)]  # fmt: skip
    shares = closed_shares(specs, 5, 8)  # never more workers than users
    assert [(s.concurrency, len(s.specs)) for s in shares] == [(1, 2)] * 5
    assert [spec.key for s in shares for spec in s.specs] == [(i,) for i in range(10)]
    dealt = open_shares(specs, [0.1 * i for i in range(10)], 3)
    assert [[spec.key[0] for spec in s.specs] for s in dealt] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert dealt[1].arrivals_s == pytest.approx([0.1, 0.4, 0.7])


def test_window_summary_counts_completions_inside_the_window():
    def done(end_s: float, ok: bool = True) -> RequestResult:
        return RequestResult(start_s=0.0, status="200" if ok else "500", ok=ok, clip_s=1, stream=False,
                             prompt_kind="caption", output_tokens=10, end_s=end_s, e2e_ms=1000 * end_s)  # fmt: skip

    results = [done(0.5), done(1.0), done(2.0, ok=False), done(3.0), done(3.5)]
    w = window_summary(results, start_s=0.5, end_s=3.0)  # (0.5, 3.0]: 1.0 and 3.0 ok, 2.0 an error
    assert (w["window_s"], w["window_completions"], w["window_errors"]) == (2.5, 2, 1)
    assert w["request_throughput"] == pytest.approx(0.8) and w["output_tokens_per_s"] == pytest.approx(8.0)
    # all five started at 0: in flight 2.5 s of the window for the last two, 0.5, 1.5 and 0 before
    assert w["mean_in_flight"] == pytest.approx((0.5 + 1.5 + 2.5 + 2.5) / 2.5)
    assert w["littles_law_throughput"] == pytest.approx(w["mean_in_flight"] / 2.0)  # mean E2E of the two ok: 2 s
    empty = window_summary(results, start_s=3.0, end_s=3.0)
    assert empty["request_throughput"] is None and empty["window_completions"] == 0


def test_after_first_wave_counts_from_the_last_of_the_first_wave():
    def done(end_s: float, ok: bool = True) -> RequestResult:
        return RequestResult(start_s=0.0, status="200" if ok else "500", ok=ok, clip_s=1, stream=False,
                             prompt_kind="caption", end_s=end_s)  # fmt: skip

    results = [done(1.0), done(2.0), done(2.5, ok=False), done(3.0), done(4.0), done(6.0)]
    steady = after_first_wave(results, concurrency=2, end_s=5.0)  # first wave ends at 2.0; (2, 5]: 3.0 and 4.0
    assert steady["steady_start_s"] == 2.0
    assert steady["steady_request_throughput"] == pytest.approx(2 / 3)
    assert after_first_wave(results, concurrency=2, end_s=2.0)["steady_request_throughput"] is None
    assert after_first_wave(results[:2], concurrency=2, end_s=5.0)["steady_request_throughput"] is None


def test_parse_gauges_sums_label_sets():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
vllm:num_requests_running_total 99
mdl_clips_in_flight 512.0
mdl_queue_length 0.0 1700000000000
"""
    assert parse_series(text) == {"vllm:num_requests_running": 7.0, "mdl_clips_in_flight": 512.0,
                                  "mdl_queue_length": 0.0}  # fmt: skip


def test_counter_delta_interpolates_at_the_window_bounds():
    samples = [Sample(0.0, {"api": 10.0}), Sample(1.0, {"api": 11.0}), Sample(3.0, {"api": 15.0, "x": 1.0})]
    assert counter_delta(samples, "api", 0.5, 2.0) == pytest.approx(13.0 - 10.5)
    assert counter_delta(samples, "x", 0.0, 3.0) is None  # one sample is not a rate


def test_metrics_reader_tolerates_a_server_without_metrics():
    import http.server
    import threading

    class NoMetrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoMetrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    reader = MetricsReader(f"http://127.0.0.1:{httpd.server_address[1]}", api_key=None)
    try:
        assert reader() is None and not reader.available and reader() is None
    finally:
        reader.close()
        httpd.shutdown()
    gone = MetricsReader("http://127.0.0.1:9", api_key=None, timeout_s=1)  # nothing listens: skipped, not fatal
    assert gone() is None and gone.available
    gone.close()


@pytest.mark.slow  # eight load runs, two of them vLLM's CLI (its imports take ~10 s each on the CPU VM)
def test_anchors_run_vllms_tool_and_locust_beside_ours_on_the_same_server(server, tmp_path):
    from mdlserve.benchmarks.anchors import main as anchors

    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    summary = anchors(["--url", server.url, "--tokenizer", server.checkpoint, "--model-name", model,
                       "--tools", "vllm,locust", "--concurrency", "2", "--num-requests", "4", "--clip-s", "1.5",
                       "--out-tokens", "5", "--rounds", "2", "--out", str(tmp_path)])  # fmt: skip
    assert [(r["round"], r["beside"], r["tool"]) for r in summary["runs"]] == [
        (0, "vllm", "ours"), (0, "vllm", "vllm"), (0, "locust", "ours"), (0, "locust", "locust"),
        (1, "vllm", "vllm"), (1, "vllm", "ours"), (1, "locust", "locust"), (1, "locust", "ours"),
    ]  # fmt: skip
    for run in summary["runs"]:
        assert run["requests"] == run["ok"] == 4 and run["errors"] == 0 and run["output_tokens"] == 4 * 5
        assert run["request_throughput"] > 0 and 0 < run["in_flight"] and run["e2e_median_ms"] > 0
        if run["beside"] == "vllm":  # streaming: TTFT before the end
            assert 0 < run["ttft_median_ms"] < run["e2e_median_ms"]
        else:
            assert run["ttft_median_ms"] is None
        # Two users: each request was sent alone or with the other one; vLLM's tool keeps no send times.
        assert run["send_burst"] is None if run["tool"] == "vllm" else 1.0 <= run["send_burst"] <= 2.0
    vllm_level, locust_level = summary["levels"]
    for level in (vllm_level, locust_level):
        mean = {tool: np.mean([r["request_throughput"] for r in summary["runs"]
                               if r["beside"] == level["anchor"] and r["tool"] == tool])
                for tool in ("ours", level["anchor"])}  # fmt: skip
        assert level["ours_over_theirs"]["request_throughput"] == pytest.approx(mean["ours"] / mean[level["anchor"]])
    assert (tmp_path / "vllm-c2-r1.json").exists() and (tmp_path / "locust-c2-r1.json").exists()
    assert (tmp_path / "ours-locust-c2-r1" / "summary.json").exists()
    assert not list(tmp_path.glob("clips-*"))  # the anchors' clips are removed after their runs
    table = (tmp_path / "summary.md").read_text()
    assert "ours / vLLM's" in table and "ours / locust's" in table


def test_load_client_records_each_failure_and_refuses_a_server_it_cannot_use():
    """The load generator's client (aiohttp) against a real server: a non-200 answer keeps
    its status and body, a dropped connection its exception, a server slower than the
    timeout reads "timeout"; a warm-up answered 401 stops the run with the server's words."""
    import asyncio
    import http.server
    import threading

    from mdlserve.benchmarks.http_load import ChatClient

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            key = self.path.split("/")[1]  # /KEY/v1/chat/completions
            if key == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
            elif key == "slow":
                time.sleep(3)
            else:
                body = b"no key given" if key == "warm" else b"engine fell over"
                self.send_response(401 if key == "warm" else 500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{httpd.server_address[1]}"

    async def send(path: str) -> RequestResult:
        client = ChatClient(f"{origin}/{path}", api_key=None, timeout_s=1.0, model="m")
        try:
            spec = RequestSpec(key=(1, 2, 3), clip_s=1.0, prompt="p", max_tokens=2, stream=False, exact_tokens=False)
            spec.body = b"{}"
            return await client.send(spec, time.perf_counter())
        finally:
            await client.close()

    async def warm() -> None:
        async with ChatClient(f"{origin}/warm", api_key=None, timeout_s=5.0, model="m", ready_timeout_s=5):
            pass

    try:
        failed = asyncio.run(send("fail"))
        assert (failed.status, failed.error, failed.ok) == ("500", "engine fell over", False)
        dropped = asyncio.run(send("drop"))
        assert dropped.status in ("ServerDisconnectedError", "ClientOSError") and not dropped.ok
        slow = asyncio.run(send("slow"))
        assert (slow.status, slow.error, slow.ok) == ("timeout", "timed out", False)
        with pytest.raises(SystemExit, match="warm-up request failed with 401: no key given"):
            asyncio.run(warm())
    finally:
        httpd.shutdown()
