"""CPU the gateway's own process spends per request (not the engine core's).

    python -m mdlserve.benchmarks.gateway_cpu --model CHECKPOINT [--requests 160] [--out RESULT.json]

Starts `mdl-serve serve` on the checkpoint (vLLM's default multiprocess path, so the
engine core is a separate process and is not counted), warms it up, then sends
`--requests` chat completions with a fresh 30 s 16 kHz WAV each (bodies built before the
measurement), `--concurrency` at a time, `max_tokens` 1, and reads the server process's
user + system CPU time before and after: all threads, and the main thread alone (the
event loop, which every request and stream shares; decoding and vLLM's input processing
run in worker threads). With `--py-spy FILE` it also records the
process's stacks (py-spy raw format) during the measurement. Works on a CPU with the tiny
checkpoint: what it measures is the HTTP, JSON, audio and input-processing work per
request, which does not depend on the model's size.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import soundfile

CLIP_S = 30.0
SAMPLE_RATE = 16000


def wav_body(rng: np.random.Generator, model: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, (rng.standard_normal(int(CLIP_S * SAMPLE_RATE)) * 0.1).astype(np.float32), SAMPLE_RATE,
                    format="WAV", subtype="PCM_16")
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
    return json.dumps({"model": model, "max_tokens": 1, "temperature": 0, "messages": [
        {"role": "user", "content": [audio, {"type": "text", "text": "Caption the audio."}]}]}).encode()


async def send_all(url: str, bodies: list[bytes], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: bytes) -> None:
            async with gate:
                r = await client.post("/v1/chat/completions", content=body,
                                      headers={"content-type": "application/json"})
                if r.status_code != 200:
                    raise SystemExit(f"request failed: {r.status_code} {r.text[:300]}")
        await asyncio.gather(*(one(body) for body in bodies))


def main_thread_cpu(process: psutil.Process) -> float:
    """CPU seconds of the process's main thread (on Linux its thread id is the pid)."""
    (main,) = [t for t in process.threads() if t.id == process.pid]
    return main.user_time + main.system_time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (the tiny preset is enough)")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--py-spy", default=None, metavar="FILE", help="also record py-spy raw stacks here")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mdlserve.server.cli", "serve", "--model", args.model, "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-bytes", str(1 << 30),
         "--max-num-seqs", str(max(args.concurrency, 8))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING"))
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        rng = np.random.default_rng(0)
        bodies = [wav_body(rng, model) for _ in range(args.requests + 8)]
        asyncio.run(send_all(url, bodies[:8], 8))

        process = psutil.Process(server.pid)
        spy = None
        if args.py_spy:
            spy = subprocess.Popen([shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--format", "raw", "-o", args.py_spy, "--pid",
                                    str(server.pid), "--rate", "200", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before, loop_before, start = process.cpu_times(), main_thread_cpu(process), time.perf_counter()
        asyncio.run(send_all(url, bodies[8:], args.concurrency))
        after, loop_after, wall = process.cpu_times(), main_thread_cpu(process), time.perf_counter() - start
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
    finally:
        server.terminate()
        server.wait()
    cpu_s = (after.user - before.user) + (after.system - before.system)
    result = {"requests": args.requests, "concurrency": args.concurrency, "clip_s": CLIP_S, "wall_s": round(wall, 2),
              "api_process_cpu_ms_per_request": round(cpu_s / args.requests * 1000, 2),
              "event_loop_cpu_ms_per_request": round((loop_after - loop_before) / args.requests * 1000, 2),
              "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
