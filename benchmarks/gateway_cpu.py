"""CPU the gateway's own process spends per request (not the engine core's).

    python -m mdlserve.benchmarks.gateway_cpu --model CHECKPOINT [--requests 160] [--max-tokens 1] [--stream]
                                             [--out RESULT.json]

Starts `mdl-serve serve` on the checkpoint (vLLM's default multiprocess path, so the
engine core is a separate process and is not counted), warms it up, then sends
`--requests` chat completions with a fresh 30 s 16 kHz WAV each (bodies built before the
measurement), `--concurrency` at a time, exactly `--max-tokens` output tokens each (1 by
default; more shows the per-token work: vLLM's output processing and, with `--stream`,
one SSE event per token), and reads the server process's
user + system CPU time before and after: all threads, and the main thread alone (the
event loop, which every request and stream shares; decoding and vLLM's input processing
run in worker threads). With `--py-spy FILE` it also records the
process's stacks (py-spy raw format) during the measurement. Works on a CPU with the tiny
checkpoint: what it measures is the HTTP, JSON, audio and input-processing work per
request, which does not depend on the model's size.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil

from .http_load import ChatClient, RequestSpec, encode_bodies

CLIP_S = 30.0
WARMUP_REQUESTS = 8
GATEWAY_CPU_KEY = 31


async def send_all(client: ChatClient, specs: list[RequestSpec], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(spec: RequestSpec) -> None:
        async with gate:
            result = await client.send(spec, 0.0)
        if not result.ok:
            raise SystemExit(f"request failed: {result.status} {result.error}")

    await asyncio.gather(*(one(spec) for spec in specs))


def main_thread_cpu(process: psutil.Process) -> float:
    """CPU seconds of the process's main thread (on Linux its thread id is the pid)."""
    (main,) = [t for t in process.threads() if t.id == process.pid]
    return main.user_time + main.system_time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(url: str, server: psutil.Process, args: argparse.Namespace) -> tuple[float, float, float]:
    """(process CPU s, main-thread CPU s, wall s) over the measured requests."""
    async with ChatClient(url, api_key=None, timeout_s=600) as client:  # waits until the server answers
        specs = [
            RequestSpec(
                key=(GATEWAY_CPU_KEY, i),
                clip_s=CLIP_S,
                prompt="Caption the audio.",
                max_tokens=args.max_tokens,
                stream=args.stream,
                exact_tokens=True,
            )
            for i in range(WARMUP_REQUESTS + args.requests)
        ]
        assert client.model is not None  # entering ChatClient read it from /v1/models
        await encode_bodies(specs, client.model)
        await send_all(client, specs[:WARMUP_REQUESTS], WARMUP_REQUESTS)
        spy = None
        if args.py_spy:
            py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--format",
                    "raw",
                    "-o",
                    args.py_spy,
                    "--pid",
                    str(server.pid),
                    "--rate",
                    "200",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        before, loop_before, start = server.cpu_times(), main_thread_cpu(server), time.perf_counter()
        await send_all(client, specs[WARMUP_REQUESTS:], args.concurrency)
        after, loop_after, wall = server.cpu_times(), main_thread_cpu(server), time.perf_counter() - start
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
    return (after.user - before.user) + (after.system - before.system), loop_after - loop_before, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (the tiny preset is enough)")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=1, help="output tokens per request (exactly: EOS ignored)")
    p.add_argument("--stream", action="store_true", help="streaming requests (one SSE event per token)")
    p.add_argument("--py-spy", default=None, metavar="FILE", help="also record py-spy raw stacks here")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mdlserve.server.cli",
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--kv-cache-bytes",
            str(1 << 30),
            "--max-num-seqs",
            str(max(args.concurrency, WARMUP_REQUESTS)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING"),
    )
    try:
        cpu_s, loop_s, wall = asyncio.run(measure(f"http://127.0.0.1:{port}", psutil.Process(server.pid), args))
    finally:
        server.terminate()
        server.wait()
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "clip_s": CLIP_S,
        "wall_s": round(wall, 2),
        "api_process_cpu_ms_per_request": round(cpu_s / args.requests * 1000, 2),
        "event_loop_cpu_ms_per_request": round(loop_s / args.requests * 1000, 2),
        "machine": f"{os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
