"""Client-side tools of the reliability suite: requests whose outcome is judged complete,
refused or lost; engine/admission gauges from /metrics; the server's resource footprint."""

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil

from gateway.helpers import audio_file, audio_part, chat_body, metric

IDLE_GAUGES = ("mdl_engine_running_requests", "mdl_engine_waiting_requests", "mdl_clips_in_flight",
               "mdl_queue_length")
CLIP = audio_file("wav", seconds=1.0)


@dataclass
class Outcome:
    """One request's fate. `complete`: a 200 with a finished answer (finish_reason set; for
    streams also `[DONE]` and no error event). `refused`: a 429 carrying Retry-After."""

    status: int | None
    latency_s: float
    complete: bool = False
    refused: bool = False
    detail: str = ""

    @property
    def lost(self) -> bool:
        return not (self.complete or self.refused)

    @property
    def label(self) -> str:
        return str(self.status) if self.status is not None else "no_answer"


def captioning_body(max_tokens: int = 4, stream: bool = False, **extra) -> dict:
    return chat_body(audio_part(CLIP), max_tokens=max_tokens, stream=stream, **extra)


async def send_chat(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None,
                    first_event: asyncio.Event | None = None) -> Outcome:
    """`first_event` (streams only) is set when the first SSE event arrives: the request is
    then certainly admitted and running."""
    started = time.perf_counter()
    try:
        if body.get("stream"):
            return await _send_stream(client, url, body, headers, started, first_event)
        response = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(None, time.perf_counter() - started, detail=type(exc).__name__)
    latency = time.perf_counter() - started
    if response.status_code == 200:
        choices = response.json().get("choices") or [{}]
        finished = all(choice.get("finish_reason") for choice in choices)
        return Outcome(200, latency, complete=finished, detail="" if finished else "no finish_reason")
    return _refusal_or_error(response, latency)


async def _send_stream(client, url, body, headers, started, first_event) -> Outcome:
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return _refusal_or_error(response, time.perf_counter() - started)
        finished, done, error = False, False, ""
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first_event is not None:
                first_event.set()
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = event["error"].get("message", "error event")
            finished |= any(choice.get("finish_reason") for choice in event.get("choices", []))
    complete = finished and done and not error
    detail = error or ("" if complete else f"finish_reason seen: {finished}, [DONE] seen: {done}")
    return Outcome(200, time.perf_counter() - started, complete=complete, detail=detail)


def _refusal_or_error(response: httpx.Response, latency: float) -> Outcome:
    refused = response.status_code == 429 and response.headers.get("retry-after") is not None
    return Outcome(response.status_code, latency, refused=refused, detail=response.text[:200])


def status_counts(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(sorted(Counter(outcome.label for outcome in outcomes).items()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def gauges(url: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return {name: metric(text, name) for name in IDLE_GAUGES}


async def wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    """Polls until the engine and admission gauges are all 0; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        reading = await asyncio.to_thread(gauges, url)
        if not any(reading.values()) or time.monotonic() > deadline:
            return reading
        await asyncio.sleep(0.5)


def footprint(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of the server process and its children (the engine)."""
    process = psutil.Process(pid)
    processes = [process, *process.children(recursive=True)]
    rss = fds = 0
    for each in processes:
        try:
            rss += each.memory_info().rss
            fds += each.num_fds()
        except psutil.NoSuchProcess:
            continue
    return rss, fds


def engine_core(pid: int) -> psutil.Process:
    """vLLM's EngineCore child of the server (AsyncLLM always runs the engine in a process)."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no EngineCore process under pid {pid}")
