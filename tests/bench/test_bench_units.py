"""Benchmark building blocks that need no engine: parsing, clips, scenarios, reports, plots."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mdlserve.benchmarks import reference
from mdlserve.benchmarks.common import (
    latency_stats,
    make_clip,
    parse_engine_arg,
    parse_int_list,
    parse_seconds_list,
    write_results,
)
from mdlserve.benchmarks.http_load import RequestResult, RequestSpec, base_url, request_body, summarize
from mdlserve.benchmarks.loadtest import Scenario, drift, windows
from mdlserve.benchmarks.offline import EngineOptions, OfflineWorkload, llm_kwargs, ttft_parts
from mdlserve.benchmarks.suite import speedups


def test_list_parsing():
    assert parse_int_list("1, 8,32") == [1, 8, 32]
    assert parse_int_list("") == []
    assert parse_seconds_list("2:32:2") == [float(s) for s in reference.TTFT_CLIP_SECONDS]
    assert parse_seconds_list("2,4.5") == [2.0, 4.5]
    assert parse_seconds_list("") == []


def test_ttft_parts_split_the_ttft_by_engine_timestamps():
    # vLLM's RequestStateStats: arrival on the frontend's clock, the rest on the engine core's.
    stats = dict(queued_ts=100.002, scheduled_ts=100.003, first_token_ts=100.021)
    parts = ttft_parts(SimpleNamespace(first_token_latency=0.030, **stats))
    assert parts == pytest.approx({"queued_ms": 1.0, "engine_step_ms": 18.0, "frontend_ms": 11.0})
    assert sum(parts.values()) == pytest.approx(30.0)
    # No first token yet, or stats not kept (disable_log_stats): nothing to split.
    assert ttft_parts(SimpleNamespace(first_token_latency=0.0, **stats)) == {}
    assert ttft_parts(None) == {}


def test_engine_arg_parsing_and_precedence():
    assert parse_engine_arg("max-num-batched-tokens=16384") == ("max_num_batched_tokens", 16384)
    assert parse_engine_arg("enable_prefix_caching=false") == ("enable_prefix_caching", False)
    assert parse_engine_arg('compilation_config={"level": 0}') == ("compilation_config", {"level": 0})
    assert parse_engine_arg("tokenizer_mode=slow") == ("tokenizer_mode", "slow")
    with pytest.raises(ValueError):
        parse_engine_arg("no-equals-sign")
    engine = EngineOptions(dtype="bfloat16", max_num_batched_tokens=8192, extra={"max_num_batched_tokens": 4096})
    kwargs = engine.llm_kwargs()
    assert kwargs["max_num_batched_tokens"] == 4096 and kwargs["dtype"] == "bfloat16"
    assert "quantization" not in kwargs  # unset flags leave vLLM's defaults


def test_worker_engine_kwargs_per_implementation():
    work = OfflineWorkload(impl="builtin", model="m", load_format="dummy",
                           engine=EngineOptions(kv_cache_memory_bytes=1), batches=[1, 512, 8], clip_s=30,
                           out_tokens=100, ttft_clip_s=[2], ttft_repeats=1, prompt="p", seed=0)  # fmt: skip
    kwargs = llm_kwargs(work)
    assert kwargs["max_num_seqs"] == 512 and kwargs["trust_remote_code"] and not kwargs["disable_log_stats"]
    work.impl = "plugin"
    assert "trust_remote_code" not in llm_kwargs(work)


def test_clips_are_fresh_and_reproducible():
    a, b, c = make_clip(2.0, (0, 1, 1)), make_clip(2.0, (0, 1, 1)), make_clip(2.0, (0, 1, 2))
    assert a.dtype == np.float32 and a.shape == (32000,)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_request_body_is_openai_chat_with_audio():
    spec = RequestSpec(key=(0, 1), clip_s=1.0, prompt="Caption the audio.", max_tokens=7, stream=True,
                       exact_tokens=True)  # fmt: skip
    body = request_body(spec, "m")
    audio, text = body["messages"][0]["content"]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    assert text == {"type": "text", "text": "Caption the audio."}
    assert body["stream_options"] == {"include_usage": True}
    assert body["min_tokens"] == body["max_tokens"] == 7 and body["ignore_eos"]
    assert base_url("http://h:8000/v1/") == "http://h:8000"


def test_http_summary_counts_and_latencies():
    results = [
        RequestResult(start_s=0.0, status="200", ok=True, clip_s=1, stream=True, prompt_kind="caption",
                      e2e_ms=100.0, ttft_ms=10.0, itl_ms=[30.0, 30.0, 30.0], output_tokens=4),
        RequestResult(start_s=1.0, status="503", ok=False, clip_s=1, stream=True, prompt_kind="qa", e2e_ms=5.0),
        RequestResult(start_s=2.0, status="timeout", ok=False, clip_s=1, stream=False, prompt_kind="qa"),
    ]  # fmt: skip
    s = summarize(results, duration_s=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (3, 1, {"503": 1, "timeout": 1})
    assert s["request_throughput"] == 0.5 and s["output_tokens_per_s"] == 2.0
    assert s["tpot_ms"]["median"] == 30.0 and s["itl_ms"]["n"] == 3
    assert latency_stats([])["median"] is None


def test_bundled_scenario_traffic_shape():
    scenario = Scenario.load("mixed-traffic")
    planned = scenario.requests(seed=0)
    assert planned == scenario.requests(seed=0)  # reproducible from the seed
    times = [t for t, _ in planned]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < scenario.duration_s
    ramp = sum(t < scenario.ramp_up_s for t in times) / scenario.ramp_up_s
    steady = sum(t >= scenario.ramp_up_s for t in times) / (scenario.duration_s - scenario.ramp_up_s)
    assert ramp < steady  # the rate ramps up
    specs = [s for _, s in planned]
    assert all(1 <= s.clip_s <= 60 for s in specs)
    assert {s.prompt_kind for s in specs} == {"caption", "qa"} and {s.stream for s in specs} == {True, False}
    assert len({s.key for s in specs}) == len(specs)  # a fresh clip per request
    smoke = scenario.smoke()
    assert smoke.duration_s < 10 and all(c["max_s"] <= 4 for c in smoke.clips)


def test_windows_and_drift():
    results = [RequestResult(start_s=t, status="200", ok=True, clip_s=1, stream=True, prompt_kind="caption",
                             e2e_ms=100.0 + 10 * t, ttft_ms=5.0) for t in np.arange(0, 20, 0.5)]  # fmt: skip
    rows = windows(results, duration_s=20, window_s=5)
    assert [w["requests"] for w in rows] == [10, 10, 10, 10]
    late = RequestResult(start_s=20.3, status="200", ok=True, clip_s=1, stream=True, prompt_kind="caption",
                         e2e_ms=300.0, ttft_ms=5.0)  # planned before the end, sent late by a busy machine
    assert [w["requests"] for w in windows([*results, late], duration_s=20, window_s=5)] == [10, 10, 10, 11]
    d = drift(rows, ramp_up_s=5)
    assert d["e2e_p50_last_ms"] > d["e2e_p50_first_ms"] and d["e2e_p50_ratio"] > 1
    assert d["e2e_p50_slope_ms_per_min"] == pytest.approx(600, rel=0.01)


def _synthetic_summary() -> dict:
    throughput = [{"impl": impl, "via": "engine", "batch": b, "clip_s": 30.0, "out_tokens_per_clip": 100,
                   "samples_per_s": b * f, "wall_s": 1 / f, "output_tokens": b * 100,
                   "output_tokens_per_s": b * f * 100} for impl, f in (("plugin", 1.0), ("builtin", 0.5))
                  for b in (1, 8)]  # fmt: skip
    ttft = [{"impl": impl, "via": "engine", "clip_s": c, "median_ms": m, "p90_ms": m * 1.1, "n": 3}
            for impl, m in (("plugin", 20.0), ("builtin", 40.0)) for c in (2.0, 4.0)]  # fmt: skip
    summary = {"gpu": "cpu", "vllm": "x", "torch": "y", "commit": "c", "date": "d", "preset": "tiny",
               "dtype": "float32", "quantization": None, "engine_args": {}, "mode": "compare",
               "throughput": throughput, "ttft": ttft}  # fmt: skip
    summary["ratios"] = speedups(summary)
    return summary


def test_speedups_reports_plugin_over_builtin():
    ratios = _synthetic_summary()["ratios"]
    assert [r["speedup"] for r in ratios if r["metric"] == "samples_per_s"] == [2.0, 2.0]
    assert [r["speedup"] for r in ratios if r["metric"] == "ttft_median_ms"] == [2.0, 2.0]


def test_results_files_markdown_and_plots(tmp_path):
    written = write_results(tmp_path, _synthetic_summary(), {"requests": []})
    names = {p.name for p in written}
    assert names == {"summary.json", "raw.json", "summary.md", "throughput.png", "ttft.png"}
    assert json.loads((tmp_path / "summary.json").read_text())["ratios"][0]["speedup"] == 2.0
    md = (tmp_path / "summary.md").read_text()
    assert "| 8 | 8.00 | 4.00 |" in md and "authors README" in md
    assert all((tmp_path / n).stat().st_size > 1000 for n in names if n.endswith(".png"))


def test_reference_numbers():
    assert list(reference.README_SAMPLES_PER_S) == [1, 4, 8, 16, 32, 64, 128, 200]
    assert list(reference.REPORT_SAMPLES_PER_S) == [1, 4, 8, 16, 32, 64, 128, 512]
    assert reference.README_SAMPLES_PER_S[200] == 25.15 and reference.REPORT_SAMPLES_PER_S[512] == 29.04


def test_mdl_serve_bench_command_line():
    from mdlserve.server.cli import build_parser

    args = build_parser().parse_args(["bench", "compare", "--dummy", "--engine-arg", "a=1", "--engine-arg", "b=x"])
    assert args.bench_mode == "compare" and args.engine_arg == ["a=1", "b=x"] and args.dummy
    args = build_parser().parse_args(["bench", "serve", "--url", "http://h:1", "--request-rate", "1,2"])
    assert args.bench_mode == "serve" and args.stream
    args = build_parser().parse_args(["bench", "soak", "mixed-traffic", "--url", "u", "--duration-s", "60"])
    assert args.duration_s == 60


def test_a_step_budget_beyond_the_largest_batch_is_refused_before_any_engine_starts():
    from mdlserve.benchmarks.cli import main

    with pytest.raises(SystemExit, match=r"--max-num-batched-tokens 4096 is more than the largest batch x "
                                         r"--max-model-len \(2 x 1024\)"):  # fmt: skip
        main(["throughput", "--smoke", "--batches", "1,2", "--max-num-batched-tokens", "4096"])


class _FakeLLM:
    """Stands in for vllm.LLM: each call takes 0.2 s and returns the requested tokens."""

    def generate(self, prompts, params, use_tqdm=False):
        import time
        from types import SimpleNamespace

        time.sleep(0.2)
        return [SimpleNamespace(prompt_token_ids=[0] * 10, outputs=[SimpleNamespace(token_ids=[1] * params.max_tokens)],
                                metrics=SimpleNamespace(first_token_latency=0.01)) for _ in prompts]  # fmt: skip

    def collective_rpc(self, method):
        assert method == "pinned_host_stats"
        return [{}]  # what the probe reads without CUDA


def test_time_budget_skips_points_that_would_not_fit(tmp_path):
    import time

    from mdlserve.benchmarks.offline import OfflineRunner

    work = OfflineWorkload(impl="plugin", model="m", load_format="auto", engine=EngineOptions(), batches=[1, 512],
                           clip_s=0.5, out_tokens=3, ttft_clip_s=[0.5], ttft_repeats=1, prompt="p", seed=0)  # fmt: skip
    runner = OfflineRunner(work, tmp_path / "result.json")
    runner.prompt_text = "p"
    runner.measure_ttft(_FakeLLM())
    work.deadline = time.time() + 2.0
    runner.measure_throughput(_FakeLLM())  # batch 1 at ~5/s: 512 clips would need ~100 s
    assert [r["batch"] for r in runner.result["throughput"]] == [1]
    assert runner.result["throughput"][0]["output_tokens"] == 3
    assert "pinned_host_allocs" not in runner.result["throughput"][0]  # no CUDA: nothing to read
    assert runner.result["errors"] == [{"impl": "plugin", "stage": "throughput", "batch": 512,
                                        "sample_format": "float32", "error": "skipped: time budget"}]  # fmt: skip
    (row,) = runner.result["ttft"]
    assert row["n"] == 1 and row["median_ms"] == 10.0 and row["ttft_source"] == "engine_metrics"
    work.deadline = time.time() - 1
    runner.measure_ttft(_FakeLLM())
    assert runner.result["errors"][-1]["stage"] == "ttft" and len(runner.result["ttft"]) == 1


@pytest.mark.parametrize("impl", ["plugin", "builtin"])
def test_each_point_runs_once_per_sample_format_with_fresh_clips(tmp_path, impl):
    """pcm16: the clip as 16-bit PCM, int16 for the plugin and its float32 samples for the
    built-in; every row says its form, and the tables give each form its own column."""
    from mdlserve.benchmarks.offline import OfflineRunner
    from mdlserve.benchmarks.report import offline_tables

    class RecordingLLM(_FakeLLM):
        clips: list = []

        def generate(self, prompts, params, use_tqdm=False):
            self.clips += [p["multi_modal_data"]["audio"] for p in prompts]
            return super().generate(prompts, params, use_tqdm)

    work = OfflineWorkload(impl=impl, model="m", load_format="auto", engine=EngineOptions(), batches=[2],
                           clip_s=0.5, out_tokens=3, ttft_clip_s=[0.5], ttft_repeats=1, prompt="p", seed=0,
                           sample_formats=["float32", "pcm16"])  # fmt: skip
    runner = OfflineRunner(work, tmp_path / "result.json")
    runner.prompt_text = "p"
    llm = RecordingLLM()
    runner.measure_ttft(llm)
    runner.measure_throughput(llm)
    assert [r["sample_format"] for r in runner.result["throughput"]] == ["float32", "pcm16"]
    assert [r["sample_format"] for r in runner.result["ttft"]] == ["float32", "pcm16"]
    # TTFT: a warm-up and one repeat per form; then 2 clips per form: all different.
    *_, float_batch, _, pcm_batch, _ = llm.clips
    assert len({c.tobytes() for c in llm.clips}) == 8
    assert float_batch.dtype == np.float32
    assert pcm_batch.dtype == (np.int16 if impl == "plugin" else np.float32)
    samples = pcm_batch * np.float32(2**-15) if impl == "plugin" else pcm_batch
    assert np.array_equal(samples * 32768, np.round(samples * 32768)) and np.abs(samples).max() <= 1
    tables = offline_tables({"throughput": runner.result["throughput"], "ttft": runner.result["ttft"]})
    assert f"{impl} samples/s" in tables and f"{impl} pcm16 samples/s" in tables
    assert f"{impl} median ms" in tables and f"{impl} pcm16 median ms" in tables


def test_each_batch_records_what_the_engines_pinned_host_cache_grew_by(tmp_path):
    from mdlserve.benchmarks.offline import OfflineRunner, PinnedHostProbe

    class GrowingLLM(_FakeLLM):
        """The engine's pinned cache grows by one block of 8 MiB (12.5 ms) per clip generated."""

        clips = 0

        def generate(self, prompts, params, use_tqdm=False):
            self.clips += len(prompts)
            return super().generate(prompts, params, use_tqdm)

        def collective_rpc(self, method):
            assert hasattr(PinnedHostProbe, method)  # vLLM calls it on the worker by this name
            return [{"allocs": self.clips, "alloc_ms": 12.5 * self.clips, "frees": self.clips // 3,
                     "bytes": (8 << 20) * self.clips}]  # fmt: skip

    work = OfflineWorkload(impl="plugin", model="m", load_format="auto", engine=EngineOptions(), batches=[2, 3],
                           clip_s=0.5, out_tokens=3, ttft_clip_s=[0.5], ttft_repeats=1, prompt="p", seed=0)  # fmt: skip
    runner = OfflineRunner(work, tmp_path / "result.json")
    runner.prompt_text = "p"
    llm = GrowingLLM()
    runner.warm_up(llm)  # 1 + 3 clips
    assert runner.result["pinned_host_after_warmup"] == {"allocs": 4, "alloc_ms": 50.0, "frees": 1,
                                                         "bytes": 4 * (8 << 20)}  # fmt: skip
    runner.measure_throughput(llm)
    grown = [(r["batch"], r["pinned_host_allocs"], r["pinned_host_alloc_ms"], r["pinned_host_frees"],
              r["pinned_host_bytes"]) for r in runner.result["throughput"]]  # fmt: skip
    assert grown == [(2, 2, 25.0, 1, 6 * (8 << 20)), (3, 3, 37.5, 1, 9 * (8 << 20))]


def test_warm_up_runs_one_clip_a_small_batch_and_the_largest_batch(tmp_path):
    from mdlserve.benchmarks.offline import OfflineRunner

    class RecordingLLM(_FakeLLM):
        calls: list = []

        def generate(self, prompts, params, use_tqdm=False):
            self.calls.append((len(prompts), params.max_tokens))
            return super().generate(prompts, params, use_tqdm)

    work = OfflineWorkload(impl="plugin", model="m", load_format="auto", engine=EngineOptions(), batches=[32, 512],
                           clip_s=0.5, out_tokens=100, ttft_clip_s=[0.5], ttft_repeats=1, prompt="p", seed=0)  # fmt: skip
    runner = OfflineRunner(work, tmp_path / "result.json")
    runner.prompt_text = "p"
    llm = RecordingLLM()
    runner.warm_up(llm)
    assert llm.calls == [(1, 16), (8, 16), (512, 16)]


def test_stream_times_the_first_token_and_the_first_text_apart():
    """A first token with no text (part of a UTF-8 character) starts first_token_ms but not
    TTFT; the role chunk starts neither; ITL runs between chunks with text."""
    import asyncio
    import time

    from mdlserve.benchmarks.http_load import ChatClient

    def event(delta=None, usage=None):
        choices = [] if delta is None else [{"index": 0, "delta": delta}]
        return "data: " + json.dumps({"choices": choices, **({"usage": usage} if usage else {})})

    async def lines():
        for line, pause in ((event({"role": "assistant", "content": ""}), 0.03),
                            (event({"role": None, "content": ""}), 0.03),  # as the gateway writes token chunks
                            (event({"content": "A"}), 0.03), (event({"content": "B"}), 0.0),
                            (event(usage={"completion_tokens": 3}), 0.0), ("data: [DONE]", 0.0)):
            yield line
            yield ""
            await asyncio.sleep(pause)  # fmt: skip

    result = RequestResult(start_s=0.0, status="200", ok=False, clip_s=1, stream=True, prompt_kind="caption")
    asyncio.run(ChatClient._read_stream(lines(), time.perf_counter(), result))
    assert result.ok and result.output_tokens == 3
    assert 25 <= result.first_token_ms < result.ttft_ms - 25  # the empty token came one pause before "A"
    assert len(result.itl_ms) == 1 and result.itl_ms[0] >= 25


def test_anchors_compare_each_anchor_with_ours_beside_it_level_by_level():
    from mdlserve.benchmarks.anchors import compare, markdown

    def run(tool, beside, concurrency, rps, ttft):
        return {"tool": tool, "beside": beside, "concurrency": concurrency, "request_throughput": rps,
                "in_flight": 0.9 * concurrency, "ttft_median_ms": ttft, "tpot_median_ms": None if ttft is None else 2.0,
                "e2e_median_ms": None if tool == "vllm" and concurrency == 4 else 100.0,
                "send_burst": {"ours": 0.8 * concurrency, "locust": 1.6}.get(tool)}  # fmt: skip

    runs = [run("ours", "vllm", 1, 4.0, 30.0), run("vllm", "vllm", 1, 5.0, 40.0),
            run("ours", "locust", 1, 6.0, None), run("locust", "locust", 1, 5.0, None),
            run("vllm", "vllm", 1, 3.0, 20.0), run("ours", "vllm", 1, 4.4, 34.0),
            run("locust", "locust", 1, 7.0, None), run("ours", "locust", 1, 6.6, None),
            run("ours", "vllm", 4, 10.0, 80.0), run("vllm", "vllm", 4, 12.5, 100.0)]  # fmt: skip
    one_vllm, one_locust, four_vllm = compare(runs)
    assert [(x["concurrency"], x["anchor"], x["stream"]) for x in (one_vllm, one_locust, four_vllm)] == [
        (1, "vllm", True), (1, "locust", False), (4, "vllm", True)]  # fmt: skip
    # Each anchor against ours' runs beside it, not against all of ours.
    assert one_vllm["ours"]["request_throughput"] == pytest.approx(4.2)
    assert one_vllm["theirs"]["request_throughput"] == 4.0
    assert one_vllm["ours_over_theirs"]["request_throughput"] == pytest.approx(1.05)
    assert one_vllm["ours_over_theirs"]["ttft_median_ms"] == pytest.approx(32.0 / 30.0)
    assert one_locust["ours"]["request_throughput"] == pytest.approx(6.3)
    assert one_locust["theirs"]["request_throughput"] == 6.0
    assert one_locust["ours_over_theirs"]["request_throughput"] == pytest.approx(1.05)
    assert four_vllm["ours_over_theirs"]["request_throughput"] == pytest.approx(0.8)
    # A statistic a tool did not report (TTFT without streaming) has no mean and no ratio.
    assert one_locust["theirs"]["ttft_median_ms"] is None and one_locust["ours_over_theirs"]["ttft_median_ms"] is None
    assert four_vllm["theirs"]["e2e_median_ms"] is None and four_vllm["ours_over_theirs"]["e2e_median_ms"] is None
    table = markdown({"levels": [one_vllm, one_locust, four_vllm], "runs": runs})
    assert "| 1 | bench serve, streaming | 4.00, 4.40 | 4.20 | 0.90 | 32.0 | 2.00 | 100.0 | 0.8 |" in table
    assert "| 1 | ours / vLLM's | | 1.050 | 1.000 | 1.067 | 1.000 | 1.000 | – |" in table  # vLLM's keeps no send times
    assert "| 1 | bench serve, non-streaming | 6.00, 6.60 | 6.30 | 0.90 | – | – | 100.0 | 0.8 |" in table
    assert "| 1 | locust | 5.00, 7.00 | 6.00 | 0.90 | – | – | 100.0 | 1.6 |" in table
    assert "| 1 | ours / locust's | | 1.050 | 1.000 | – | – | 1.000 | 0.500 |" in table
    assert "| 4 | ours / vLLM's | | 0.800 | 1.000 | 0.800 | 1.000 | – | – |" in table


def test_send_burst_is_the_mean_size_of_the_burst_each_request_was_sent_in():
    from mdlserve.benchmarks.anchors import send_burst

    in_step = [wave * 0.6 + user * 0.001 for wave in range(4) for user in range(16)]  # 4 waves of 16, 1 ms apart
    assert send_burst(in_step) == 16.0
    assert send_burst([i * 0.04 for i in range(64)]) == 1.0  # 40 ms apart: each alone
    assert send_burst([0.0, 0.004, 0.1, 0.3, 0.302, 0.304]) == pytest.approx((2 * 2 + 1 + 3 * 3) / 6)
    assert send_burst(list(reversed(in_step))) == 16.0  # the order of the records does not matter
    assert send_burst([]) is None


def test_anchors_in_flight_is_littles_law_of_each_tools_figures():
    from mdlserve.benchmarks.anchors import with_in_flight

    assert with_in_flight({"request_throughput": 17.65, "e2e_mean_ms": 880.0})["in_flight"] == pytest.approx(15.532)
    assert with_in_flight({"request_throughput": None, "e2e_mean_ms": 880.0})["in_flight"] is None


def test_anchors_tools_are_checked():
    from mdlserve.benchmarks.anchors import main

    with pytest.raises(SystemExit) as refused:
        main(["--url", "http://h:1", "--tokenizer", "/ckpt", "--tools", "vllm,jmeter", "--out", "/nonexistent"])
    assert refused.value.code == 2



@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-requests", "0"], "--num-requests 0 is less than twice --concurrency 16"),
        (["--concurrency", "4,32", "--num-requests", "63"], "--num-requests 63 is less than twice --concurrency 32"),
        (["--concurrency", "0,4"], "--concurrency takes levels of at least 1; got '0,4'"),
        (["--concurrency", ""], "--concurrency takes levels of at least 1; got ''"),
        (["--rounds", "0"], "--rounds and --out-tokens take at least 1"),
    ],
)
def test_anchors_refuse_a_workload_no_tool_could_finish_before_running_any(flags, message, capsys):
    """Refused by argparse, before the server is asked for its model (the URL is unreachable)."""
    from mdlserve.benchmarks.anchors import main

    with pytest.raises(SystemExit) as refused:
        main(["--url", "http://127.0.0.1:9", "--tokenizer", "/ckpt", "--out", "/nonexistent", *flags])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


def test_anchors_pass_the_same_workload_to_every_tool(tmp_path, monkeypatch):
    from mdlserve.benchmarks import anchors

    calls = []
    monkeypatch.setattr(anchors.subprocess, "run", lambda command, **kw: calls.append((command, kw.get("env"))))
    monkeypatch.setattr(anchors, "vllm_result", lambda path: {"file": path.name})
    monkeypatch.setattr(anchors, "locust_result", lambda path: {"record": path.name})
    monkeypatch.setattr(anchors, "ours_result", lambda directory: {"dir": directory.name})
    args = SimpleNamespace(url="http://h:1/v1/", model_name="m", tokenizer="/ckpt", num_requests=8, out_tokens=7,
                           clip_s=2.5, api_key="k3y")  # fmt: skip
    assert anchors.run_vllm(args, tmp_path / "d.jsonl", 4, tmp_path, "vllm-c4-r0") == {"file": "vllm-c4-r0.json"}
    assert anchors.run_ours(args, 4, 123, True, tmp_path, "ours-vllm-c4-r0") == {"dir": "ours-vllm-c4-r0"}
    locust = anchors.run_locust(args, tmp_path / "b.jsonl", 4, tmp_path, "locust-c4-r0")
    assert locust == {"record": "locust-c4-r0.json"}
    assert anchors.run_ours(args, 4, 124, False, tmp_path, "ours-locust-c4-r0") == {"dir": "ours-locust-c4-r0"}
    (vllm_cmd, vllm_env), (ours_cmd, _), (locust_cmd, locust_env), (ours_nostream_cmd, _) = calls

    def option(command, name):
        return command[command.index(name) + 1]

    # The tools append /v1/chat/completions themselves (ours strips a trailing /v1 too).
    assert option(vllm_cmd, "--base-url") == option(locust_cmd, "--host") == "http://h:1"
    assert option(ours_cmd, "--url") == "http://h:1/v1/"
    assert option(vllm_cmd, "--max-concurrency") == option(ours_cmd, "--concurrency") == "4"
    assert option(locust_cmd, "--users") == option(locust_cmd, "--spawn-rate") == "4"  # all users at once
    assert option(vllm_cmd, "--num-prompts") == option(ours_cmd, "--num-requests") == "8"
    assert option(vllm_cmd, "--custom-output-len") == option(ours_cmd, "--out-tokens") == "7"
    assert json.loads(option(vllm_cmd, "--extra-body")) == {"min_tokens": 7} and "--ignore-eos" in vllm_cmd
    assert option(vllm_cmd, "--temperature") == "0" and option(vllm_cmd, "--dataset-name") == "custom_audio"
    assert vllm_env["OPENAI_API_KEY"] == "k3y" and option(ours_cmd, "--api-key") == "k3y"
    assert locust_env["ANCHOR_API_KEY"] == "k3y" and locust_env["ANCHOR_BODIES"] == str(tmp_path / "b.jsonl")
    assert option(locust_cmd, "--exit-code-on-error") == "0"  # a failed request is counted, not fatal
    assert option(ours_cmd, "--seed") == "123" and option(ours_cmd, "--clip-s") == "2.5"
    # Ours beside locust runs in locust's mode, non-streaming; beside vLLM's tool, streaming.
    assert "--no-stream" in ours_nostream_cmd and "--no-stream" not in ours_cmd


def test_locust_bodies_are_the_requests_bench_serve_sends(tmp_path):
    from mdlserve.benchmarks.anchors import write_locust_bodies
    from mdlserve.benchmarks.http_load import encode_body

    args = SimpleNamespace(clip_s=0.5, out_tokens=6, model_name="m")
    keys = [(1, 48, 0, 0, i) for i in range(3)]
    lines = write_locust_bodies(tmp_path, keys, args).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    for key, line in zip(keys, lines):
        spec = RequestSpec(key=key, clip_s=0.5, prompt="Caption the audio.", max_tokens=6, stream=False,
                           exact_tokens=True)  # fmt: skip
        assert line == encode_body(spec, "m")
        body = json.loads(line)
        assert body["stream"] is False and body["min_tokens"] == body["max_tokens"] == 6 and body["ignore_eos"]
    assert len(set(lines[:3])) == 3  # a fresh clip per request


def test_locust_sends_every_body_once_counts_failures_and_stops(tmp_path):
    """The locustfile in a real locust process, against a stub server that answers the third
    request it receives with a 503 and the fourth with a 200 lacking `usage`: every body is
    sent once, by at most --users at a time, both failures are counted (not fatal), tokens
    come from the answers' usage, and the run ends when the last body is answered (no
    --run-time)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mdlserve.benchmarks.anchors import run_locust

    received, in_flight, lock = [], [0, 0], threading.Lock()  # in_flight: now, most

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                received.append((self.path, self.headers.get("Authorization"), body))
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
                nth = len(received)
            time.sleep(0.05)
            answer = {3: b'{"error": "busy"}', 4: b"{}"}.get(nth, json.dumps({"usage": {"completion_tokens": 5}}).encode())
            with lock:
                in_flight[0] -= 1
            self.send_response(503 if nth == 3 else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    bodies = [json.dumps({"n": i}).encode() for i in range(5)]
    (tmp_path / "bodies.jsonl").write_bytes(b"".join(b + b"\n" for b in bodies))
    args = SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="k3y")
    try:
        result = run_locust(args, tmp_path / "bodies.jsonl", 2, tmp_path, "locust-c2-r0")
    finally:
        httpd.shutdown()
    assert sorted(body for _, _, body in received) == sorted(bodies)
    assert {(path, auth) for path, auth, _ in received} == {("/v1/chat/completions", "Bearer k3y")}
    assert in_flight[1] <= 2
    assert (result["requests"], result["ok"], result["errors"], result["output_tokens"]) == (5, 3, 2, 15)
    assert result["request_throughput"] > 0 and result["e2e_mean_ms"] > 0 and result["ttft_median_ms"] is None
    assert result["in_flight"] == pytest.approx(result["request_throughput"] * result["e2e_mean_ms"] / 1000)
    record = json.loads((tmp_path / "locust-c2-r0.json").read_text())
    assert record["answered"] == 5 and len(record["send_times"]) == 5
    assert max(record["send_times"]) <= record["last_answer"]
    assert 1.0 <= result["send_burst"] <= 2.0  # two users
