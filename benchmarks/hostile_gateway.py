"""Hostile-input benchmark: what a mix of hostile requests costs the gateway in memory and
event-loop time.

    mdl-serve bench hostile --model CHECKPOINT [--requests 200] [--concurrency 8]
        [--out RESULT.json] [--server-arg=--flag=value ...]
    (also python -m mdlserve.benchmarks.hostile_gateway with the same options)

Starts `mdl-serve serve` on the checkpoint (vLLM's default multiprocess path, as in
production: the engine core is its own process, so neither its memory nor its model runs
count against the API process; TORCHDYNAMO_DISABLE=1 and --enforce-eager only shorten the
start), builds a few hostile bodies at the server's limits (each reused: the client's
memory is not the point), sends `--requests` of them round-robin, `--concurrency` at a
time, while sampling the API process's RSS every 20 ms. Reports the baseline, the peak and
the RSS once the server is idle again, the status counts (any 5xx is a failure), and the
worst event-loop lag the server itself measured during the run (from the
`mdl_event_loop_lag_seconds` histogram's buckets before and after: the bound of the
smallest bucket that holds every sample taken meanwhile; the engine's start, which happens
on a worker thread but takes the GIL for seconds, is before the run and not counted).
"""

import argparse
import asyncio
import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence

import httpx
import numpy as np
import psutil
import soundfile

from .gateway_cpu import free_port

MODEL = "midashenglm-7b"
UPLOAD_LIMIT = 25 << 20  # the server's default --max-upload-bytes


def _chat(content: object, **fields: object) -> dict:
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}], **fields}


def _audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode()}}


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _wav_header_only(rate: int, channels: int, frames: int) -> bytes:
    """A 16-bit PCM WAV header that declares `frames` frames, followed by 1 kB of data."""
    data = frames * channels * 2
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16)
            + b"data" + struct.pack("<I", data) + bytes(1024))  # fmt: skip


def hostile_bodies() -> dict[str, tuple[str, bytes, str]]:
    """name -> (path, body, content type); bodies at (just under) the upload limit."""
    rng = np.random.default_rng(0)
    room = UPLOAD_LIMIT - 4096
    random_b64 = rng.integers(0, 256, room * 3 // 4, dtype=np.uint8).tobytes()
    longest_wav = _wav(np.zeros(int(room * 3 // 4 // 2) - 2048, np.int16), 16000)  # ~580 s, the heaviest accepted
    flac = io.BytesIO()
    soundfile.write(flac, np.zeros(16000 * 3600, np.float32), 16000, format="FLAC")
    json_bodies = {
        "random bytes as base64 audio": _chat([_audio_part(random_b64)]),
        "longest accepted WAV (~580 s)": _chat([_audio_part(longest_wav)]),
        "an hour of FLAC silence": _chat([_audio_part(flac.getvalue())]),
        "WAV header: 1 MHz": _chat([_audio_part(_wav_header_only(1_000_000, 1, 10**8))]),
        "WAV header: 64 channels, 10^7 frames": _chat([_audio_part(_wav_header_only(16000, 64, 10**7))]),
        "prompt of 25 MB text": _chat("word " * (room // 5)),
        "lone surrogates": None,
        "bad audio_url": _chat([{"type": "audio_url", "audio_url": {"url": "http://[::1:99999/x" + "a" * 9000}}]),
    }
    bodies = {
        name: ("/v1/chat/completions", json.dumps(body).encode(), "application/json")
        for name, body in json_bodies.items()
        if body is not None
    }
    bodies["lone surrogates"] = (
        "/v1/chat/completions",
        json.dumps(_chat("x")).replace('"x"', '"\\ud800"').encode(),
        "application/json",
    )
    bodies["JSON: 10^7 elements"] = (
        "/v1/chat/completions",
        b'{"model": "m", "x": [' + b"0," * (room // 2) + b'0], "messages": []}',
        "application/json",
    )
    bodies["JSON: nested 10^6 deep"] = ("/v1/chat/completions", b"[" * 1_000_000 + b"]" * 1_000_000, "application/json")
    boundary = "hostile"
    bodies["multipart: 25 MB of random bytes"] = (
        "/v1/audio/transcriptions",
        (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
         f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n').encode()
        + random_b64[: room - 1024] + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )  # fmt: skip
    return bodies


class RssSampler(threading.Thread):
    def __init__(self, process: psutil.Process):
        super().__init__(daemon=True)
        self.process = process
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        return self.process.memory_info().rss

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)


def _lag_buckets(text: str) -> dict[float, float]:
    """le -> cumulative count of mdl_event_loop_lag_seconds."""
    buckets = {}
    for line in text.splitlines():
        if line.startswith("mdl_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return buckets


def worst_lag_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound under which every sample between the two readings fell."""
    total = after[float("inf")] - before[float("inf")]
    return min(le for le in after if after[le] - before.get(le, 0.0) >= total)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def _wait_ready(client: httpx.AsyncClient, server: psutil.Process) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if (await client.get("/health/ready")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not server.is_running() or server.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError("the server exited before it was ready (its output: --server-log)")
        await asyncio.sleep(0.5)
    raise RuntimeError("the server did not become ready in 600 s (its output: --server-log)")


async def run(url: str, server: psutil.Process, args: argparse.Namespace) -> dict:
    bodies = hostile_bodies()
    names = list(bodies)
    statuses: Counter[str] = Counter()
    by_case: dict[str, Counter[int | str]] = {name: Counter() for name in names}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _wait_ready(client, server)
        await asyncio.sleep(2)
        lag_before = _lag_buckets((await client.get("/metrics")).text)
        sampler = RssSampler(server)
        baseline = sampler.rss()
        sampler.start()
        queue = list(range(args.requests))
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                name = names[queue.pop() % len(names)]
                path, body, content_type = bodies[name]
                code: int | str  # the HTTP status, or the name of the transport error
                try:
                    response = await client.post(path, content=body, headers={"content-type": content_type})
                    code = response.status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                statuses[str(code)] += 1
                by_case[name][code] += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        while _metric((await client.get("/metrics")).text, "mdl_clips_in_flight") > 0:
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)
        sampler.stop.set()
        sampler.join()
        after = sampler.rss()
        metrics = (await client.get("/metrics")).text
    mib = 1 << 20
    return {
        "requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 1),
        "statuses": dict(statuses), "by_case": {name: dict(c) for name, c in by_case.items()},
        "rss_baseline_mib": round(baseline / mib), "rss_peak_mib": round(sampler.peak / mib),
        "rss_after_mib": round(after / mib), "rss_growth_peak_mib": round((sampler.peak - baseline) / mib),
        "worst_event_loop_lag_at_most_ms": round(worst_lag_bound(lag_before, _lag_buckets(metrics)) * 1000, 1),
        "event_loop_lag_samples": _lag_buckets(metrics)[float("inf")] - lag_before[float("inf")],
        "server_5xx": sum(n for code, n in statuses.items() if code.startswith("5")),
        "machine": f"{os.cpu_count()} CPUs",
    }  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (the tiny preset is enough)")
    p.add_argument("--requests", type=int, default=200, help="requests to send, round-robin over the hostile bodies")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--server-log", default=os.devnull, help="write the server's output here")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="one more `mdl-serve serve` flag, e.g. --server-arg=--max-body-bytes-in-flight=33554432 (repeatable)",
    )


def run_bench(args: argparse.Namespace) -> dict:
    """Start the server, send the mix, print (and with --out write) the result JSON."""
    port = free_port()
    log = open(args.server_log, "wb")  # noqa: SIM115 (closed in the finally below)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TORCHDYNAMO_DISABLE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    load_before = os.getloadavg()
    server = subprocess.Popen(
        [sys.executable, "-m", "mdlserve.server.cli", "serve", "--model", args.model, "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--kv-cache-bytes", str(1 << 30),
         *args.server_arg],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        result = asyncio.run(run(f"http://127.0.0.1:{port}", psutil.Process(server.pid), args))
    finally:
        server.terminate()
        server.wait()
        log.close()
    result["server_args"] = list(args.server_arg)
    result["load_average_1min_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    run_bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
