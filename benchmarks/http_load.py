"""HTTP load against any OpenAI-compatible chat server (our gateway, vLLM's own, ...).

Each request is POST /v1/chat/completions with an `input_audio` part (base64 WAV) and a
text part. Streaming requests are read as SSE: TTFT is the time to the first chunk with
content (first_token_ms: to the first token's chunk, content or not), ITL the gaps between
content chunks, TPOT = (E2E - TTFT) / (tokens - 1), with
tokens from the final `usage` chunk. Clips are generated per request (seeded) or read
from a directory and dithered per request, so the server never sees the same audio
twice and its caches cannot skip the encoder. The audio is built in a worker thread
before the request's clock starts.

`serve` runs a closed loop per concurrency level (N clients, each sending its next
request when the last one finished) and an open loop per request rate (Poisson
arrivals, independent of completions), in one or several load-generator processes
(load_workers.py) with one shared measurement window; server_sampling.py samples the
server's in-flight gauges and the CPU of both sides during it.
"""

import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import SAMPLE_RATE, base_summary, gpu_name_without_cuda_context, latency_stats, make_clip, wav_bytes

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".webm"}
CLOSED_KEY, OPEN_KEY, WARMUP_KEY = 11, 12, 13


@dataclass
class RequestSpec:
    """What to send; the audio is materialised when the request is encoded."""

    key: tuple[int, ...]  # seeds the clip (or the dither of a file clip)
    clip_s: float
    prompt: str
    max_tokens: int
    stream: bool
    exact_tokens: bool  # min_tokens = max_tokens and ignore_eos (vLLM extensions)
    prompt_kind: str = "caption"
    source_clip: np.ndarray | None = None
    body: bytes | None = None  # the encoded request, when built ahead of the measurement


@dataclass
class RequestResult:
    start_s: float  # since the start of the run
    status: str  # HTTP status code or an error kind ("timeout", "connect_error", ...)
    ok: bool
    clip_s: float
    stream: bool
    prompt_kind: str
    e2e_ms: float | None = None
    ttft_ms: float | None = None
    # The first token's chunk, text or not: a token may hold only part of a UTF-8 character
    # (random weights emit many), so its chunk has no content and TTFT counts a later token.
    first_token_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    end_s: float | None = None  # since the start of the run
    key: tuple[int, ...] = ()  # the spec's: which clip was sent

    @property
    def tpot_ms(self) -> float | None:
        if self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def raw(self) -> dict:
        return {"key": list(self.key), "start_s": self.start_s, "end_s": self.end_s, "status": self.status,
                "ok": self.ok, "clip_s": self.clip_s,
                "stream": self.stream, "prompt_kind": self.prompt_kind, "e2e_ms": self.e2e_ms,
                "ttft_ms": self.ttft_ms, "first_token_ms": self.first_token_ms, "tpot_ms": self.tpot_ms,
                "itl_ms": self.itl_ms,
                "output_tokens": self.output_tokens, "error": self.error}  # fmt: skip


def load_audio_dir(directory: str) -> list[np.ndarray]:
    from mdlserve.server.audio import decode_audio

    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {directory}")
    return [decode_audio(p.read_bytes()) for p in files]


def clip_for(spec: RequestSpec) -> np.ndarray:
    if spec.source_clip is None:
        return make_clip(spec.clip_s, spec.key)
    dither = 1e-4 * np.random.default_rng(list(spec.key)).standard_normal(spec.source_clip.size, dtype=np.float32)
    return spec.source_clip + dither


def request_body(spec: RequestSpec, model: str) -> dict:
    audio = base64.b64encode(wav_bytes(clip_for(spec))).decode("ascii")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            {"type": "text", "text": spec.prompt},
        ]}],
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": spec.stream,
    }  # fmt: skip
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.exact_tokens:
        body.update(min_tokens=spec.max_tokens, ignore_eos=True)
    return body


def encode_body(spec: RequestSpec, model: str) -> bytes:
    return json.dumps(request_body(spec, model)).encode()


async def encode_bodies(specs: list[RequestSpec], model: str) -> None:
    """Build every request before a level's clock starts: a 30 s clip is ~1.3 MB of JSON, and
    generating and encoding hundreds of them inside the measurement would time the load
    generator's CPU instead of the server."""
    bodies = await asyncio.gather(*(asyncio.to_thread(encode_body, spec, model) for spec in specs))
    for spec, body in zip(specs, bodies):
        spec.body = body


def base_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


class ChatClient:
    """The load generator's HTTP client, on aiohttp: a 1.3 MB body costs it about 0.5 ms of
    CPU per request where httpx spent about 5 ms (the 2-core VM, benchmarks/results/
    2026-12-03-cpu-load-client). At 512 in flight the H200 hosts' load processes spent 4.4-8.8
    ms per request with httpx, so a wave of 128 completions kept each of them busy for most
    of a second before its last new request left, on the cores the gateway needed too.
    vLLM's `bench serve` uses aiohttp as well. Create it inside a running event loop."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float, model: str | None = None,
                 ready_timeout_s: float = 600.0, seed: int = 0):  # fmt: skip
        import aiohttp

        self.url = base_url(url)
        self.model = model
        self.ready_timeout_s = ready_timeout_s
        self.seed = seed  # of the warm-up clips, so that a new run's differ too
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Every connection kept alive (limit=0: no cap): at 512 in flight, closing and
        # reopening them would be load.
        self.http = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=30.0),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def __aenter__(self) -> "ChatClient":
        await self.wait_ready(self.ready_timeout_s)
        return self

    async def wait_ready(self, timeout_s: float) -> None:
        """Look up the model name and send a small warm-up request until it succeeds: a
        server still starting refuses connections or answers 503; any other failure (401,
        422, ...) means the load test would only measure errors, so it stops the run with
        the server's answer."""
        import aiohttp

        deadline = time.perf_counter() + timeout_s
        for attempt in range(1_000_000):
            spec = RequestSpec(key=(self.seed, WARMUP_KEY, attempt), clip_s=1.0, prompt="Caption the audio.",
                               max_tokens=2, stream=False, exact_tokens=False)  # fmt: skip
            try:
                status, text = 0, ""
                if self.model is None:
                    async with self.http.get(f"{self.url}/v1/models") as resp:
                        status, text = resp.status, await resp.text()
                    if status == 200:
                        self.model = json.loads(text)["data"][0]["id"]
                if self.model is not None:
                    warm_up = request_body(spec, self.model)
                    async with self.http.post(f"{self.url}/v1/chat/completions", json=warm_up) as resp:
                        status, text = resp.status, await resp.text()
                    if status == 200:
                        return
                if status not in (200, 503):
                    raise SystemExit(f"warm-up request failed with {status}: {text[:500]}")
            except aiohttp.ClientConnectionError:
                pass
            if time.perf_counter() > deadline:
                raise SystemExit(f"{self.url} was not ready after {timeout_s:g} s")
            await asyncio.sleep(2.0)

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.close()

    @property
    def ready_model(self) -> str:
        """The model name to send: given, or looked up by wait_ready()."""
        if self.model is None:
            raise RuntimeError("the model name is not known before wait_ready()")
        return self.model

    async def send(self, spec: RequestSpec, run_start: float) -> RequestResult:
        import aiohttp

        body = spec.body or await asyncio.to_thread(encode_body, spec, self.ready_model)
        start = time.perf_counter()
        result = RequestResult(start_s=start - run_start, key=spec.key, status="", ok=False, clip_s=spec.clip_s,
                               stream=spec.stream, prompt_kind=spec.prompt_kind)  # fmt: skip
        try:
            async with self.http.post(
                f"{self.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                result.status = str(resp.status)
                if resp.status != 200:
                    result.error = (await resp.read()).decode(errors="replace")[:300]
                elif spec.stream:
                    await self._read_stream(_lines(resp.content), start, result)
                else:
                    data = json.loads(await resp.read())
                    result.output_tokens = (data.get("usage") or {}).get("completion_tokens", 0)
                    result.ok = True
        except TimeoutError:
            result.status, result.error = "timeout", "timed out"
        except aiohttp.ClientError as exc:
            result.status, result.error = type(exc).__name__, str(exc)[:300]
        end = time.perf_counter()
        result.e2e_ms = (end - start) * 1000
        result.end_s = end - run_start
        return result

    @staticmethod
    async def _read_stream(lines, start: float, result: RequestResult) -> None:
        """Reads an SSE body from `lines` (an async iterator of its lines as text)."""
        last = None
        chunks = 0
        async for line in lines:
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.status, result.error = "stream_error", json.dumps(chunk["error"])[:300]
                return
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"].get("completion_tokens", 0)
            deltas = [c.get("delta") or {} for c in chunk.get("choices") or []]
            # Token chunks carry no role, or "role": null (the gateway's chunks, as pydantic writes them).
            if result.first_token_ms is None and any(d.get("role") is None for d in deltas):
                result.first_token_ms = (time.perf_counter() - start) * 1000
            if any(d.get("content") for d in deltas):
                now = time.perf_counter()
                if last is None:
                    result.ttft_ms = (now - start) * 1000
                else:
                    result.itl_ms.append((now - last) * 1000)
                last = now
                chunks += 1
        result.output_tokens = result.output_tokens or chunks
        result.ok = True


async def _lines(content):
    """An aiohttp body's lines as text, as they arrive."""
    async for raw in content:
        yield raw.decode().rstrip("\r\n")


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Request throughput, latency statistics (ms) and error counts of a set of requests."""
    ok = [r for r in results if r.ok]
    duration_s = max(duration_s, 1e-9)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(Counter(r.status for r in results if not r.ok)),
        "error_rate": (len(results) - len(ok)) / len(results) if results else 0.0,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s,
        "ttft_ms": latency_stats([r.ttft_ms for r in ok]),
        "first_token_ms": latency_stats([r.first_token_ms for r in ok]),
        "tpot_ms": latency_stats([r.tpot_ms for r in ok]),
        "itl_ms": latency_stats([x for r in ok for x in r.itl_ms]),
        "e2e_ms": latency_stats([r.e2e_ms for r in ok]),
    }


def window_summary(results: list[RequestResult], start_s: float, end_s: float) -> dict:
    """Throughput over the level's shared window: requests that completed inside it (start
    exclusive, end inclusive) over its length; None when the window is empty.

    Also the client's mean number of requests in flight over the window (from each request's
    start and end) and, as a cross-check that does not depend on where the window's bounds fall
    among waves of completions, Little's law: that mean over the mean E2E of the requests
    completed in the window."""
    window_s = end_s - start_s
    inside = [r for r in results if r.end_s is not None and start_s < r.end_s <= end_s]
    ok = [r for r in inside if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    busy_s = sum(max(0.0, min(r.end_s, end_s) - max(r.start_s, start_s)) for r in results if r.end_s is not None)
    mean_in_flight = busy_s / window_s if window_s > 0 else None
    mean_e2e_s = float(np.mean([r.e2e_ms for r in ok])) / 1000 if ok else None
    return {
        "window_start_s": start_s,
        "window_end_s": end_s,
        "window_s": window_s,
        "window_completions": len(ok),
        "window_errors": len(inside) - len(ok),
        "request_throughput": len(ok) / window_s if window_s > 0 else None,
        "output_tokens_per_s": tokens / window_s if window_s > 0 else None,
        "mean_in_flight": mean_in_flight,
        "littles_law_throughput": mean_in_flight / mean_e2e_s if mean_in_flight and mean_e2e_s else None,
    }


def after_first_wave(results: list[RequestResult], concurrency: int, end_s: float) -> dict:
    """Closed-loop throughput once the first `concurrency` requests have completed, up to
    the window's end. The first wave's bodies all arrive at once and its clips enter the
    engine together; what follows is the loop's steady state, the figure to hold against
    offline samples/s. None when the first wave ends after `end_s`."""
    ends = sorted(r.end_s for r in results if r.ok and r.end_s is not None)
    if len(ends) <= concurrency or ends[concurrency - 1] >= end_s:
        return {"steady_start_s": None, "steady_request_throughput": None}
    start_s = ends[concurrency - 1]
    completed = sum(1 for end in ends if start_s < end <= end_s)
    return {"steady_start_s": start_s, "steady_request_throughput": completed / (end_s - start_s)}


async def closed_loop(client: ChatClient, specs: list[RequestSpec], concurrency: int, origin: float,
                      hooks) -> tuple[list[RequestResult], float]:  # fmt: skip
    """`concurrency` users, each sending its next request when the last one finished, from
    `origin` (time.perf_counter()). Also returns when the last request was sent (seconds since
    origin): just after a completion, with `concurrency` requests in flight throughout. A
    window that ran until concurrency first dropped would hold the whole last round's work
    but almost none of its completions: with requests finishing in waves (a batching engine)
    and 4 rounds, that reads 3/4 of the true rate."""
    pending = iter(enumerate(specs))
    results: list[RequestResult] = []
    sent_last: list[float] = []

    async def user() -> None:
        for index, spec in pending:  # shared iterator: each spec goes to exactly one user
            if index == len(specs) - 1:
                sent_last.append(time.perf_counter() - origin)
                hooks.sent_last()
            results.append(await client.send(spec, origin))
            hooks.completed()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return results, sent_last[0]


async def open_loop(client: ChatClient, specs: list[RequestSpec], arrivals_s: list[float], origin: float,
                    hooks) -> tuple[list[RequestResult], float]:  # fmt: skip
    """Each request sent at its arrival time after `origin`, whatever is still running. Also
    returns when the last request was sent (seconds since origin)."""

    async def timed(spec: RequestSpec) -> RequestResult:
        result = await client.send(spec, origin)
        hooks.completed()
        return result

    tasks = []
    for spec, arrival in zip(specs, arrivals_s):
        await asyncio.sleep(max(0.0, origin + arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(timed(spec)))
    await asyncio.sleep(0)  # the last request's task starts (takes its start time) before we note the end
    sent_last_s = time.perf_counter() - origin
    hooks.sent_last()
    return list(await asyncio.gather(*tasks)), sent_last_s


def poisson_arrivals(seed: int, rate: float, n: int) -> list[float]:
    """Arrival times (s after the start) of `n` Poisson arrivals at `rate` per second."""
    gaps = np.random.default_rng([seed, OPEN_KEY, int(rate * 1000)]).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


def level_specs(args, seed: int, level_key: tuple[int, ...], sources: list[np.ndarray]) -> list[RequestSpec]:
    specs = []
    for i in range(args.num_requests):
        source = sources[i % len(sources)] if sources else None
        specs.append(RequestSpec(
            key=(seed, *level_key, i), clip_s=source.size / SAMPLE_RATE if source is not None else args.clip_s,
            prompt=args.prompt, max_tokens=args.out_tokens, stream=args.stream, exact_tokens=True,
            source_clip=source,
        ))  # fmt: skip
    return specs


def client_versions() -> dict:
    """Versions on the load generator's side (the server's are not visible over HTTP)."""
    info = {"gpu": gpu_name_without_cuda_context(), "vllm": "unknown", "torch": "unknown"}
    for name in ("vllm", "torch"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            continue
    return info


def parse_levels(args) -> list[tuple[str, float]]:
    """("closed", concurrency) and ("open", rate) levels; refuses closed levels too short for a
    window (fewer than two requests per user)."""
    from .common import parse_int_list

    levels: list[tuple[str, float]] = [("closed", c) for c in parse_int_list(args.concurrency)]
    levels += [("open", float(r)) for r in args.request_rate.replace(" ", "").split(",") if r]
    if not levels:
        raise SystemExit("nothing to run: give --concurrency and/or --request-rate")
    short = [c for mode, c in levels if mode == "closed" and 2 * c > args.num_requests]
    if short:
        raise SystemExit(f"--num-requests {args.num_requests} is less than twice --concurrency {max(short)}: the "
                         "throughput window ends when a process has sent its last request, after at least one "
                         "round of requests")  # fmt: skip
    return levels


async def ready_model(args, seed: int) -> str:
    """Wait until the server answers a warm-up request; the model name to send."""
    async with ChatClient(args.url, args.api_key, args.timeout_s, args.model_name, args.ready_timeout_s,
                          seed) as client:  # fmt: skip
        return client.ready_model


def level_row(args, mode: str, level: float, specs: list[RequestSpec], shares, run) -> dict:
    """summary.json's row of one level: totals and latencies over all its requests, throughput
    over the shared window, in-flight gauges and CPU during it."""
    duration_s = max((r.end_s for r in run.results if r.end_s is not None), default=0.0)
    totals = summarize(run.results, duration_s)
    totals["total_request_throughput"] = totals.pop("request_throughput")
    totals["total_output_tokens_per_s"] = totals.pop("output_tokens_per_s")
    window = window_summary(run.results, run.window_start_s, run.window_end_s)
    return {"impl": args.impl, "via": "http", "mode": mode,
            "concurrency": level if mode == "closed" else None,
            "request_rate": level if mode == "open" else None,
            "clip_s": float(np.mean([s.clip_s for s in specs])), "out_tokens": args.out_tokens,
            "stream": args.stream, "processes": len(shares),
            "concurrency_per_process": [s.concurrency for s in shares] if mode == "closed" else None,
            "requests_per_process": [len(s.specs) for s in shares], "ramp_s": args.ramp_s,
            "first_send_s": [min(r.start_s for r in o.results) for o in run.outcomes],
            **totals, **window,
            **(after_first_wave(run.results, int(level), run.window_end_s) if mode == "closed" else {}),
            **run.sampling.report(run.window_start_s, run.window_end_s, window["window_completions"])}  # fmt: skip


def run_levels(args, seed: int) -> tuple[dict, dict]:
    """Every level in turn, each with fresh clips; the rows and raw.json's data."""
    import psutil

    from .load_workers import Target, closed_shares, open_shares, run_level

    sources = load_audio_dir(args.audio_dir) if args.audio_dir else []
    levels = parse_levels(args)
    if args.server_pid is not None and not psutil.pid_exists(args.server_pid):
        raise SystemExit(f"--server-pid {args.server_pid}: no such process on this host")
    model = asyncio.run(ready_model(args, seed))
    target = Target(base_url(args.url), args.api_key, args.timeout_s, model)
    sampling_args = dict(url=target.url, api_key=args.api_key, interval_s=args.metrics_interval_s,
                         server_pid=args.server_pid)  # fmt: skip
    rows: list[dict] = []
    raw: list[dict] = []
    samples: list[dict] = []
    for level_index, (mode, level) in enumerate(levels):
        specs = level_specs(args, seed, (CLOSED_KEY if mode == "closed" else OPEN_KEY, level_index), sources)
        if mode == "closed":
            shares = closed_shares(specs, int(level), args.processes)
        else:
            shares = open_shares(specs, poisson_arrivals(seed, level, len(specs)), args.processes)
        label = f"c={level}" if mode == "closed" else f"{level:g} req/s"
        with tqdm(total=len(specs), desc=f"{mode} {label} x{len(shares)} proc", unit="req") as bar:
            run = run_level(shares, target, sampling_args, args.ramp_s, bar)
        rows.append(level_row(args, mode, level, specs, shares, run))
        for outcome in run.outcomes:
            raw.extend({"mode": mode, "level": level, "worker": outcome.index, **r.raw()} for r in outcome.results)
        samples.extend({"mode": mode, "level": level, **s} for s in run.sampling.raw())
    return {"rows": rows, "model": model}, {"requests": raw, "samples": samples}


def serve_summary(args, rows: list[dict], model: str, seed: int) -> dict:
    summary = base_summary(preset="remote", dtype="unknown", quantization=None, engine_args={},
                           versions=client_versions())  # fmt: skip
    summary.update(mode="serve", target_url=base_url(args.url), model_name=model, seed=seed,
                   processes=args.processes, serve=rows)  # fmt: skip
    for r in rows:
        level = {"concurrency": r["concurrency"]} if r["mode"] == "closed" else {"request_rate": r["request_rate"]}
        if r["mode"] == "closed":
            summary["throughput"].append({
                "impl": r["impl"], "via": "http", "batch": r["concurrency"], "clip_s": r["clip_s"],
                "out_tokens_per_clip": r["out_tokens"], "samples_per_s": r["request_throughput"],
                "total_samples_per_s": r["total_request_throughput"], "window_s": r["window_s"],
                "wall_s": r["duration_s"], "processes": r["processes"],
            })  # fmt: skip
        if r["ttft_ms"]["n"]:
            summary["ttft"].append({"impl": r["impl"], "via": "http", "clip_s": r["clip_s"],
                                    "median_ms": r["ttft_ms"]["median"], "p90_ms": r["ttft_ms"]["p90"],
                                    "n": r["ttft_ms"]["n"], **level})  # fmt: skip
    return summary


def run_serve(args) -> dict:
    from .common import run_dir, write_results
    from .report import serve_table

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)  # fresh clips every run
    result, raw = run_levels(args, seed)
    summary = serve_summary(args, result["rows"], result["model"], seed)
    out_dir = run_dir(args.out, args.run_name, "serve", summary["gpu"])
    write_results(out_dir, summary, raw)
    print(serve_table(summary))
    print(f"seed: {seed}; results: {out_dir}")
    return summary
