"""Hostile input: every malformed, lying or oversized request is answered 4xx with a
message naming the cause, and the server stays healthy and correct afterwards."""

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from gateway.helpers import audio_part, chat_body, wav_bytes

from .conftest import API_KEY, UPLOAD_LIMIT
from .hostile import HostileCase, hostile_cases
from .traffic import captioning_body, wait_idle

CASES = hostile_cases()


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_is_refused_with_its_cause(guarded_server, auth, reliability_report, case: HostileCase):
    kwargs = case.request_kwargs()
    kwargs["headers"] = {**auth, **kwargs["headers"]}
    response = httpx.post(guarded_server.url + case.path, timeout=60, **kwargs)
    message = _error_message(response)
    reliability_report.add_bad_input(case.name, response.status_code, message)
    assert 400 <= response.status_code < 500, (response.status_code, message)
    assert any(word.lower() in message.lower() for word in case.words), message


EDGE_AUDIO = [
    ("WAV of a single sample", wav_bytes(np.full((1, 1), 0.1, np.float32), 16000)),
    ("WAV at the lowest accepted rate (1 kHz, 10 ms)", wav_bytes(np.full((10, 1), 0.1, np.float32), 1000)),
    ("WAV at the highest accepted rate (768 kHz, 0.1 s)", wav_bytes(np.full((76800, 1), 0.1, np.float32), 768000)),
    ("8-channel WAV", wav_bytes(np.full((16000, 8), 0.1, np.float32), 16000)),
    ("WAV of digital silence", wav_bytes(np.zeros((16000, 1), np.float32), 16000)),
    ("WAV clipped at full scale", wav_bytes(np.ones((16000, 1), np.float32), 16000)),
]


@pytest.mark.parametrize(("case", "payload"), EDGE_AUDIO, ids=[case for case, _ in EDGE_AUDIO])
def test_extreme_but_valid_audio_is_answered(guarded_server, auth, reliability_report, case, payload):
    """Legitimate extremes are captioned (200) or refused with a named cause, never a 5xx."""
    response = httpx.post(guarded_server.url + "/v1/chat/completions", headers=auth, timeout=60,
                          json=chat_body(audio_part(payload)))
    message = _error_message(response) if response.status_code != 200 else "captioned"
    observed = f"{response.status_code}: {message}"
    passed = response.status_code == 200 or (400 <= response.status_code < 500 and bool(message))
    assert reliability_report.add_fault(f"edge audio: {case}", "200, or 4xx naming the cause", observed,
                                        passed), observed


def _raw_exchange(url: str, payload: bytes, pause_after: int | None = None, pause_s: float = 0.0,
                  read_timeout: float = 30.0) -> tuple[bytes, float]:
    """Sends `payload` (pausing after `pause_after` bytes), returns the response (headers and
    body may arrive in separate packets) and the seconds until its first bytes came (or until
    the server closed the connection)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        started = time.monotonic()
        head, tail = (payload, b"") if pause_after is None else (payload[:pause_after], payload[pause_after:])
        sock.sendall(head)
        if pause_s:
            time.sleep(pause_s)
        if tail:
            try:
                sock.sendall(tail)
            except OSError:
                pass
        chunks = []
        try:
            chunks.append(sock.recv(4096))
            waited = time.monotonic() - started
            sock.settimeout(2.0)  # the rest of the response follows at once, if at all
            while len(b"".join(chunks)) < 65536 and (chunk := sock.recv(4096)):
                chunks.append(chunk)
        except (TimeoutError, OSError):
            pass
        if not chunks:
            waited = time.monotonic() - started
        return b"".join(chunks), waited


def _first_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


def _status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# The three slow-loris requests: each waits for the server's deadline (~10 s), so they are
# sent together, once, by the `slow_answers` fixture, and each test judges its own answer.
SLOW_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
SLOW_BODY = b'{"model": "midashenglm-7b", "messages": []}'
SLOW_UPLOAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (len(SLOW_BODY) + 100)
               + SLOW_BODY)  # fmt: skip
MULTIPART_BOUNDARY = b"reliabilityboundary"
SLOW_MULTIPART = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: multipart/form-data; boundary=" + MULTIPART_BOUNDARY
                  + b"\r\nContent-Length: 100000\r\n\r\n--" + MULTIPART_BOUNDARY
                  + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')  # fmt: skip


@pytest.fixture(scope="module")
def slow_answers(guarded_server) -> dict[str, tuple[bytes, float]]:
    """Each slow request's answer and the seconds until it came, all three sent at once on
    their own connections (and all finished before any test looks, so they never overlap
    another test's requests)."""
    requests = {"headers": SLOW_HEADERS, "body": SLOW_UPLOAD, "multipart": SLOW_MULTIPART}
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = {name: pool.submit(_raw_exchange, guarded_server.url, payload, read_timeout=90)
                   for name, payload in requests.items()}  # fmt: skip
        return {name: future.result() for name, future in futures.items()}


def test_slow_loris_headers_are_cut_off(slow_answers, reliability_report):
    """Half a request line, then nothing: the connection is answered 408 and closed."""
    answer, waited = slow_answers["headers"]
    observed = f"{_first_line(answer)} after {waited:.1f} s"
    assert reliability_report.add_fault("slow-loris: headers never finished", "408 within 30 s", observed,
                                        _status_of(answer) == 408 and waited < 30), observed


def test_slow_upload_is_cut_off(slow_answers, reliability_report):
    """A body that trickles in slower than --request-timeout (30 s here) allows gets 408."""
    answer, waited = slow_answers["body"]
    observed = f"{_first_line(answer)} after {waited:.1f} s; {answer[-120:]!r}"
    passed = _status_of(answer) == 408 and b"request body not received" in answer and waited < 75
    assert reliability_report.add_fault("slow-loris: body never finished", "408 naming the body deadline within 75 s",
                                        observed, passed), observed


def test_slow_multipart_upload_is_cut_off(slow_answers, reliability_report):
    answer, waited = slow_answers["multipart"]
    observed = f"{_first_line(answer)} after {waited:.1f} s"
    assert reliability_report.add_fault("slow-loris: multipart upload never finished", "408 within 75 s", observed,
                                        _status_of(answer) == 408 and waited < 75), observed


BEARER = b"Authorization: Bearer %s\r\n" % API_KEY.encode()


@pytest.mark.parametrize(("case", "payload", "status"), [
    ("header of 1 MiB", b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
    ("20000 headers", b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)) + b"\r\n", 431),
    ("URL of 200 kB", b"GET /health/live?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    # Authenticated: without a key the 401 comes first, before the body (AuthMiddleware).
    ("Content-Length over the upload limit", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + BEARER
     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (UPLOAD_LIMIT + 1), 413),
    ("Content-Length not a number", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nContent-Length: 12abc\r\n\r\n{}", 400),
    ("chunked body over the upload limit", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + BEARER
     + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(UPLOAD_LIMIT // 0x10000 + 2)) + b"0\r\n\r\n",
     413),
    ("garbage instead of HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n", 400),
], ids=lambda value: value if isinstance(value, str) else "")
def test_header_and_body_size_limits_hold(guarded_server, reliability_report, case, payload, status):
    answer, _ = _raw_exchange(guarded_server.url, payload)
    message = answer.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")[:200]
    reliability_report.add_bad_input(f"HTTP limits: {case}", _status_of(answer), message)
    assert _status_of(answer) == status, answer[:300]


def test_server_healthy_and_correct_after_hostile_input(guarded_server, auth, reliability_report):
    """Runs last in this module: the server still answers a normal request, nothing is left
    in flight, and liveness/readiness are 200."""
    response = httpx.post(guarded_server.url + "/v1/chat/completions", json=captioning_body(), headers=auth,
                          timeout=60)
    idle = asyncio.run(wait_idle(guarded_server.url))
    live = httpx.get(guarded_server.url + "/health/live").status_code
    ready = httpx.get(guarded_server.url + "/health/ready").status_code
    observed = f"chat {response.status_code}, live {live}, ready {ready}, gauges {idle}"
    passed = response.status_code == 200 and live == ready == 200 and not any(idle.values())
    assert reliability_report.add_fault("healthy after hostile input", "chat 200, live/ready 200, gauges 0",
                                        observed, passed), observed
