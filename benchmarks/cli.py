"""`mdl-serve bench ...` (also `python -m mdlserve.benchmarks ...`).

Offline (own engine per implementation, in worker processes):
  throughput  samples/s per batch size (fresh 30 s clips, exactly 100 output tokens)
  ttft        batch-1 time to first token per audio length
  compare     both, for our plugin and vLLM's built-in MiDashengLM, with speed-ups
HTTP (any OpenAI-compatible server):
  serve       closed loop per concurrency and open (Poisson) loop per request rate
  loadtest    a YAML traffic scenario (clip-length and prompt mix, streaming share, ramp-up)
  soak        a scenario held for a given time: latency drift and error rate
Gateway:
  hostile     a mix of hostile requests at the limits against a server it starts: peak and
              idle RSS of the API process, worst event-loop lag, statuses (no 5xx)
Other:
  plot        redraw summary.md and the PNGs of a results directory

`--smoke` sizes every mode for a CPU and the tiny checkpoint (under a minute).
"""

import argparse
import os
import sys
from pathlib import Path

DEFAULT_PROMPT = "Caption the audio."
IMPLS = ["plugin", "builtin"]

# Workload and engine defaults: full size (the authors' setup) and --smoke (CPU, tiny checkpoint).
OFFLINE_DEFAULTS = {
    "full": dict(batches="1,4,8,16,32,64,128,200,256,512", clip_s=30.0, out_tokens=100, ttft_clips="2:32:2",
                 ttft_repeats=10, dtype="auto", enforce_eager=False, kv_cache_memory_bytes=None),
    "smoke": dict(batches="1,2", clip_s=4.0, out_tokens=8, ttft_clips="2,4", ttft_repeats=2, dtype="float32",
                  enforce_eager=True, kv_cache_memory_bytes=256 << 20),
}  # fmt: skip
HTTP_DEFAULTS = {
    "full": dict(concurrency="1,4,16,64", request_rate="", num_requests=128, clip_s=30.0, out_tokens=100),
    "smoke": dict(concurrency="1,2", request_rate="2", num_requests=4, clip_s=4.0, out_tokens=8),
}
# In-process, single-thread engine start for smoke runs (see tests/conftest.py).
SMOKE_ENV = {"TORCHDYNAMO_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _resolve(args: argparse.Namespace, defaults: dict) -> None:
    """Fill every option left unset from the full or smoke defaults."""
    chosen = defaults["smoke" if args.smoke else "full"]
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


SAMPLE_FORMATS = ("float32", "pcm16")


def sample_formats(text: str) -> list[str]:
    forms = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(forms) - set(SAMPLE_FORMATS))
    if not forms or unknown:
        raise argparse.ArgumentTypeError(f"give one or more of {', '.join(SAMPLE_FORMATS)} (got {text!r})")
    return forms


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<run-name>)")
    p.add_argument("--run-name", default=None, help="name under benchmarks/results/ (default: <date>-<gpu>-<mode>)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized run with the tiny checkpoint")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the generated clips (serve: default random per run, recorded in the summary)",
    )


def _add_offline_args(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory")
    p.add_argument(
        "--dummy",
        action="store_true",
        help="random weights (load_format=dummy); without --model: the generated 7b checkpoint",
    )
    if mode != "compare":
        p.add_argument("--impl", choices=IMPLS, default="plugin", help="our plugin or vLLM's built-in model")
    if mode != "ttft":
        p.add_argument("--batches", default=None, help="comma list (default 1,4,8,16,32,64,128,200,256,512)")
        p.add_argument("--clip-s", type=float, default=None, help="clip length for throughput (default 30)")
        p.add_argument("--out-tokens", type=int, default=None, help="output tokens per clip (default 100)")
    p.add_argument(
        "--ttft-clips",
        default="" if mode == "throughput" else None,
        help="audio lengths: START:STOP:STEP or comma list (default 2:32:2; throughput: none)",
    )
    p.add_argument("--ttft-repeats", type=int, default=None, help="measurements per length after warm-up (default 10)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="stop starting new points after this long (split evenly between implementations)",
    )
    p.add_argument(
        "--sample-formats",
        type=sample_formats,
        default=["float32"],
        help="comma list: run every point once per form of the clips, float32 and/or pcm16 (the clip as "
        "16-bit PCM: int16 for the plugin, as the gateway passes a 16-bit WAV; its float32 samples for the "
        "built-in); default float32",
    )
    if mode != "ttft":
        p.add_argument(
            "--profile-dir",
            default=None,
            help="after the throughput points, profile one more batch of the largest size with "
            "vLLM's torch profiler; traces and kernel tables go here (one folder per implementation)",
        )
    e = p.add_argument_group("engine flags (recorded in the summary)")
    e.add_argument("--dtype", default=None, help="default auto (the checkpoint's: bf16 for 7b)")
    e.add_argument("--quantization", default=None)
    e.add_argument("--max-model-len", type=int, default=1024)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache size (CPU: default 1 GiB)")
    e.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vllm.LLM argument, VALUE parsed as JSON (repeatable)",
    )
    _add_output_args(p)


def _add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model-name", default=None, help="the request's `model` (default: the first of /v1/models)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MDL_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $MDL_API_KEY or $OPENAI_API_KEY)",
    )
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    p.add_argument(
        "--ready-timeout-s",
        type=float,
        default=600.0,
        help="how long to retry the warm-up request while the server answers 503 (loading)",
    )
    p.add_argument("--impl", choices=IMPLS, default="plugin", help="which implementation serves the URL (a label)")


def _offline_command(args: argparse.Namespace) -> None:
    from .common import (
        generated_checkpoint,
        gpu_name_without_cuda_context,
        parse_engine_arg,
        parse_int_list,
        parse_seconds_list,
        preset_of,
        run_dir,
    )
    from .offline import EngineOptions, OfflineWorkload
    from .suite import print_table, run_offline_suite

    mode = args.bench_mode
    for key in OFFLINE_DEFAULTS["full"]:
        if not hasattr(args, key):  # options the mode does not offer
            setattr(args, key, None)
    _resolve(args, OFFLINE_DEFAULTS)
    if mode == "ttft":
        args.batches = ""
    if args.smoke:
        for key, value in SMOKE_ENV.items():
            os.environ.setdefault(key, value)
    if args.model:
        model, preset = args.model, preset_of(args.model)
    elif args.dummy or args.smoke:
        preset = "7b" if args.dummy else "tiny"
        model = generated_checkpoint(preset)
    else:
        sys.exit("give --model DIR, --dummy (generated 7b, random weights) or --smoke")
    engine = EngineOptions(
        dtype=args.dtype, quantization=args.quantization, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        extra=dict(parse_engine_arg(a) for a in args.engine_arg),
    )  # fmt: skip
    work = OfflineWorkload(
        impl=IMPLS[0], model=model, load_format="dummy" if args.dummy else "auto", engine=engine,
        batches=parse_int_list(args.batches), clip_s=args.clip_s, out_tokens=args.out_tokens,
        ttft_clip_s=parse_seconds_list(args.ttft_clips), ttft_repeats=args.ttft_repeats,
        prompt=args.prompt, seed=args.seed, profile_dir=getattr(args, "profile_dir", None),
        sample_formats=args.sample_formats,
    )  # fmt: skip
    sequences, step_tokens = max(work.batches + [1]), args.max_num_batched_tokens
    if step_tokens is not None and step_tokens > sequences * args.max_model_len:
        # vLLM 0.26 only warns, then its engine fails to start on the GPU (server/settings.py).
        sys.exit(f"--max-num-batched-tokens {step_tokens} is more than the largest batch x --max-model-len "
                 f"({sequences} x {args.max_model_len}): lower it")  # fmt: skip
    impls = IMPLS if mode == "compare" else [args.impl]
    out_dir = run_dir(args.out, args.run_name, mode, gpu_name_without_cuda_context())
    summary = run_offline_suite(mode, impls, work, out_dir, preset=preset, time_budget_s=args.time_budget_s)
    print_table(summary)
    print(f"results: {out_dir}")
    if not summary["throughput"] and not summary["ttft"]:
        sys.exit("no point was measured; see the errors above and the logs in the results directory")


def _serve_command(args: argparse.Namespace) -> None:
    from .http_load import run_serve

    _resolve(args, HTTP_DEFAULTS)
    if args.processes < 1:
        sys.exit("--processes must be at least 1")
    run_serve(args)


def _loadtest_command(args: argparse.Namespace) -> None:
    from .loadtest import run_loadtest

    run_loadtest(args)


def _hostile_command(args: argparse.Namespace) -> None:
    from .hostile_gateway import run_bench

    if run_bench(args)["server_5xx"]:
        sys.exit("the server answered a hostile request with a 5xx")


def _plot_command(args: argparse.Namespace) -> None:
    import json

    from . import plots, report

    out_dir = Path(args.results_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    (out_dir / "summary.md").write_text(report.markdown(summary))
    for path in [out_dir / "summary.md", *plots.plot_all(summary, out_dir)]:
        print(path)


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    helps = {"throughput": "offline samples/s per batch size", "ttft": "offline batch-1 TTFT per audio length",
             "compare": "throughput and TTFT of our plugin vs vLLM's built-in, with speed-ups"}  # fmt: skip
    for mode, text in helps.items():
        p = sub.add_parser(mode, help=text, description=text)
        _add_offline_args(p, mode)
        p.set_defaults(func=_offline_command, bench_mode=mode)

    p = sub.add_parser("serve", help="HTTP load: closed loop per concurrency, open loop per Poisson rate")
    _add_http_args(p)
    p.add_argument("--concurrency", default=None, help="closed-loop levels, comma list (default 1,4,16,64; '' none)")
    p.add_argument("--request-rate", default=None, help="open-loop Poisson rates in req/s, comma list (default none)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default 128)")
    p.add_argument("--clip-s", type=float, default=None, help="generated clip length (default 30)")
    p.add_argument("--audio-dir", default=None, help="send these files instead (each request dithered: no repeats)")
    p.add_argument("--out-tokens", type=int, default=None, help="exact output tokens (ignore_eos; default 100)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests (no TTFT/ITL)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="load-generator processes per level, each holding its share of the concurrency; bodies are "
        "built before a common start (default 1: this process)",
    )
    p.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="leave the first seconds after the common start out of the throughput window",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the API server's pid on this host: report its CPU per request (alone and with children)",
    )
    p.add_argument(
        "--metrics-interval-s",
        type=float,
        default=0.5,
        help="how often the server's /metrics and the CPU times are sampled",
    )
    _add_output_args(p)
    p.set_defaults(func=_serve_command, bench_mode="serve", seed=None)

    for mode, text in (("loadtest", "run a YAML traffic scenario against a URL"),
                       ("soak", "hold a scenario for --duration-s; reports latency drift and error rate")):  # fmt: skip
        p = sub.add_parser(mode, help=text, description=text)
        p.add_argument("scenario", help="scenario YAML file, or the name of one in benchmarks/scenarios/")
        _add_http_args(p)
        p.add_argument("--duration-s", type=float, default=None, required=mode == "soak",
                       help="override the scenario's duration")  # fmt: skip
        p.add_argument("--window-s", type=float, default=None, help="statistics window (default: duration/10, >=5 s)")
        _add_output_args(p)
        p.set_defaults(func=_loadtest_command, bench_mode=mode)

    text = "hostile requests at the limits: the API process's peak and idle RSS, worst event-loop lag, no 5xx"
    p = sub.add_parser("hostile", help=text, description=text)
    from .hostile_gateway import add_args as add_hostile_args

    add_hostile_args(p)
    p.set_defaults(func=_hostile_command)

    p = sub.add_parser("plot", help="redraw summary.md and the PNGs of a results directory")
    p.add_argument("results_dir")
    p.set_defaults(func=_plot_command)


def add_parser(subparsers) -> None:
    """Attach `bench` to the `mdl-serve` command line."""
    bench = subparsers.add_parser("bench", help="benchmarks and load tests", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_commands(bench)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mdl-serve bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_commands(parser)
    args = parser.parse_args(argv)
    args.func(args)
