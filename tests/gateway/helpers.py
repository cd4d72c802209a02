"""Gateway test helpers: a real `mdl-serve serve` subprocess, audio files, metrics parsing."""

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile

from clips import make_clip
from fast_engine import FAST_CLI_FLAGS as FAST_FLAGS
from mdlserve.benchmarks.decode_pool import encode

MODEL = "midashenglm-7b"
START_TIMEOUT_S = 400


def raw_exchange(url: str, head: str, chunks: list[bytes] = ()) -> bytes:
    """Send a hand-written request head and body chunks over a plain socket (for what
    httpx will not send: lying sizes, bodies that never come); return the response, read
    up to the end of its Content-Length body, or until the server closes."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has answered
        return read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    """One response from `sock`: up to the end of its Content-Length body, or until the
    server closes."""
    response = b""
    while not _complete(response) and (data := sock.recv(65536)):
        response += data
    return response


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"^content-length: *(\d+)", head, re.IGNORECASE | re.MULTILINE)
    return length is not None and len(body) >= int(length.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m mdlserve.server.cli serve ...` in its own session (so a signal reaches only
    the server process, as in a container) with stderr in a log file."""

    def __init__(self, checkpoint: str, args: list[str], log_dir: Path, *, env: dict[str, str] | None = None,
                 fast: bool = True, name: str = "server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        process_env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", **(env or {}))
        if fast:
            process_env["TORCHDYNAMO_DISABLE"] = "1"
        else:  # vLLM's defaults: torch.compile, multiprocessing
            process_env.pop("TORCHDYNAMO_DISABLE", None)
            process_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        command = [sys.executable, "-m", "mdlserve.server.cli", "serve", "--model", checkpoint,
                   "--port", str(self.port), *(FAST_FLAGS if fast else []), *args]
        self._log = open(self.log_path, "wb")
        self._stop_sent = False
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=process_env,
                                        start_new_session=True)

    def wait_listening(self, timeout: float = 180) -> None:
        self._wait(lambda r: r.status_code in (200, 503), "/health/live", timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/ready", timeout)

    def _wait(self, ok, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if ok(httpx.get(self.url + path, timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not up after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def send_stop(self) -> None:
        """SIGTERM, once (stopping several servers: signal them all, then wait for each)."""
        if not self._stop_sent and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._stop_sent = True

    def terminate(self) -> int:
        self.send_stop()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def terminate_all(servers: list[ServerProcess]) -> None:
    """Stops every server, their shutdowns overlapping (each one alone takes seconds)."""
    for server in servers:
        server.send_stop()
    for server in servers:
        server.terminate()


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid` (vLLM's engine cores, API processes, ...); none once it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def named(processes: list[psutil.Process], part: str) -> list[psutil.Process]:
    """Those of `processes` whose name or command line contains `part` (e.g. vLLM's
    process titles: EngineCore_DP1, APIServer_0)."""
    found = []
    for process in processes:
        try:
            if any(part in item for item in (process.name(), *process.cmdline())):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """frames x channels float32, from the suite's clip generator (tests/clips.py)."""
    return make_clip(int(seconds * rate), rate=rate, channels=channels)


def audio_file(fmt: str = "wav", rate: int = 16000, channels: int = 1, seconds: float = 2.0) -> bytes:
    return encode(tone(seconds, rate, channels), rate, fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def chat_body(*parts: dict, text: str = "Caption the audio.", max_tokens: int = 4, **extra) -> dict:
    content = [*parts, {"type": "text", "text": text}] if text else list(parts)
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of samples `name{labels...}` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                seen = True
    if not seen:
        raise KeyError(name)
    return total


def wav_bytes(samples: np.ndarray, rate: int, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()
