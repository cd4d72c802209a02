"""Hostile requests: audio that lies about itself, malformed bodies, broken encodings.

Each case is a name, the httpx request arguments, and words the error message must
contain (naming the cause). Payloads are generated (seeded), none are stored.
"""

import base64
import io
import json
import struct
from dataclasses import dataclass, field

import numpy as np
import soundfile

from gateway.helpers import MODEL, chat_body

from .traffic import CLIP

CHAT = "/v1/chat/completions"
TRANSCRIBE = "/v1/audio/transcriptions"


@dataclass
class HostileCase:
    name: str
    path: str
    words: tuple[str, ...]  # the message must contain one of these
    json: object = None
    content: bytes | None = None
    files: dict | None = None
    data: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def request_kwargs(self) -> dict:
        kwargs = {"headers": self.headers}
        for name in ("json", "content", "files", "data"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def _random(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def wav_header(rate: int = 16000, channels: int = 1, bits: int = 16, fmt: int = 1, data_size: int = 0,
               riff_size: int | None = None) -> bytes:
    """A canonical 44-byte RIFF/WAVE header whose fields may lie."""
    block = max(channels * bits // 8, 0)
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    riff = 36 + data_size if riff_size is None else riff_size
    return (b"RIFF" + struct.pack("<I", riff & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
            + b"data" + struct.pack("<I", data_size & 0xFFFFFFFF))


def flac_of_silence(seconds: int, rate: int = 16000) -> bytes:
    """Hours of silence compress to a few hundred kB of FLAC: a decompression bomb."""
    buffer = io.BytesIO()
    minute = np.zeros(rate * 60, dtype=np.int16)
    with soundfile.SoundFile(buffer, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write(minute)
    return buffer.getvalue()


def hostile_audio() -> list[tuple[str, bytes, str]]:
    """(name, file bytes, words of the expected message)."""
    float_nan = wav_header(fmt=3, bits=32, data_size=4000) + np.full(1000, np.nan, np.float32).tobytes()
    float_inf = wav_header(fmt=3, bits=32, data_size=4000) + np.full(1000, -np.inf, np.float32).tobytes()
    return [
        ("RIFF/WAVE header + random bytes", b"RIFF" + struct.pack("<I", 4100) + b"WAVE" + _random(4096, 1),
         "could not decode audio"),
        ("fLaC magic + random bytes", b"fLaC" + _random(4096, 2), "could not decode audio"),
        ("OggS magic + random bytes", b"OggS" + _random(4096, 3), "could not decode audio"),
        ("ID3 tag + random bytes", b"ID3\x03\x00\x00\x00\x00\x00\x10" + _random(4096, 4), "could not decode audio"),
        ("WAV truncated inside its header", CLIP[:30], "could not decode audio"),
        ("FLAC truncated inside its header", flac_of_silence(60)[:40], "could not decode audio"),
        ("WAV declaring 4 GiB of data, none present", wav_header(data_size=0xFFFFFFF0, riff_size=0xFFFFFFF8),
         "zero samples"),
        ("WAV with sample rate 0", wav_header(rate=0, data_size=2000) + _random(2000, 5), "could not decode audio"),
        ("WAV with sample rate 1 Hz (200 kB, 55 h after resampling)",
         wav_header(rate=1, bits=8, data_size=200_000) + bytes(200_000), "sample rate 1 Hz"),
        ("WAV with sample rate 2 GHz", wav_header(rate=2_000_000_000, data_size=2000) + _random(2000, 6),
         "sample rate"),
        ("WAV with 0 channels", wav_header(channels=0, data_size=2000) + _random(2000, 7), "could not decode audio"),
        ("WAV with 65535 channels", wav_header(channels=65535, data_size=4096) + _random(4096, 8),
         "could not decode audio"),
        ("float WAV of NaN", float_nan, "NaN or infinite"),
        ("float WAV of -inf", float_inf, "NaN or infinite"),
        ("FLAC of 2 hours of silence (decompression bomb)", flac_of_silence(2 * 3600), "longer than the limit"),
        ("empty file", b"", "empty"),
        ("text file", b"this is not audio, honestly", "could not decode audio"),
    ]


def _b64_case(name: str, data: str, words: str) -> HostileCase:
    body = chat_body({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    return HostileCase(name, CHAT, (words,), json=body)


def hostile_cases() -> list[HostileCase]:
    cases = []
    for name, payload, words in hostile_audio():
        encoded = base64.b64encode(payload).decode()
        cases.append(_b64_case(f"audio (base64): {name}", encoded, words))
        cases.append(HostileCase(
            f"audio (upload): {name}", TRANSCRIBE, (words,),
            files={"file": ("clip.wav", payload, "audio/wav")}, data={"model": MODEL, "max_completion_tokens": "4"},
        ))  # fmt: skip
    good = base64.b64encode(CLIP).decode()
    cases += [
        _b64_case("base64 with embedded newlines and spaces", "\n ".join(good[i:i + 76] for i in range(0, 600, 76)),
                  "not valid base64"),
        _b64_case("base64 URL-safe alphabet", base64.urlsafe_b64encode(b"\xfb\xff" * 300).decode(), "not valid base64"),
        _b64_case("base64 with a missing padding character", good[:-1] if good.endswith("=") else good + "=",
                  "not valid base64"),
        _b64_case("base64 with padding in the middle", good[:100] + "==" + good[100:], "not valid base64"),
        _b64_case("empty base64 audio", "", "empty"),
        HostileCase("data: URL with broken base64", CHAT, ("not valid base64",), json=chat_body(
            {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,@@@@"}})),
        HostileCase("JSON nested 100000 levels deep", CHAT, ("nested too deeply",), content=b"[" * 100_000 + b"]" * 100_000,
                    headers={"Content-Type": "application/json"}),
        HostileCase("JSON body over the upload limit", CHAT, ("exceeds the limit",),
                    content=b'{"model": "' + b"a" * (2 << 20) + b'"}', headers={"Content-Type": "application/json"}),
        HostileCase("10000 messages", CHAT, ("prompt",), json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi " * 20}] * 10_000}),
        HostileCase("20 audio parts (limit 8)", CHAT, ("too many audio parts",), json=chat_body(
            *[{"type": "input_audio", "input_audio": {"data": good, "format": "wav"}}] * 20)),
        HostileCase("JSON with invalid UTF-8", CHAT, ("not valid Unicode",), content=b'{"model": "\xff\xfe\xfa"}',
                    headers={"Content-Type": "application/json"}),
        HostileCase("JSON truncated", CHAT, ("the request body is not valid JSON (EOF while parsing",),
                    content=json.dumps(chat_body()).encode()[:50], headers={"Content-Type": "application/json"}),
        HostileCase("chat body sent as text/plain", CHAT,
                    ("the request body must be JSON (Content-Type: application/json), not 'text/plain'",),
                    content=json.dumps(chat_body()).encode(), headers={"Content-Type": "text/plain"}),
        HostileCase("chat body sent as multipart", CHAT,
                    ("the request body must be JSON (Content-Type: application/json), not 'multipart/form-data; ",),
                    files={"file": ("a.wav", CLIP, "audio/wav")}),
        HostileCase("transcription sent as JSON", TRANSCRIBE, ("multipart/form-data",), json={"model": MODEL}),
        HostileCase("multipart without boundary", TRANSCRIBE, ("boundary",), content=b"--x\r\n\r\n",
                    headers={"Content-Type": "multipart/form-data"}),
        HostileCase("messages of wrong types", CHAT, ("messages",), json={"model": MODEL, "messages": [{"role": 7}]}),
        HostileCase("unknown content part type", CHAT, ("type",), json=chat_body({"type": "video_url", "x": 1})),
        HostileCase("max_tokens beyond the context", CHAT, ("max_tokens",), json=chat_body(max_tokens=10**9)),
        HostileCase("negative temperature", CHAT, ("temperature",), json=chat_body(temperature=-1)),
        HostileCase("n=2 with greedy sampling", CHAT, ("n must be 1 when temperature is 0",),
                    json=chat_body(n=2, temperature=0)),
        HostileCase("min_tokens above max_tokens", CHAT, ("min_tokens",), json=chat_body(min_tokens=50)),
        HostileCase("unknown model", CHAT, ("does not exist",), json={**chat_body(), "model": "gpt-9"}),
        HostileCase("audio chat messages field of invalid JSON", "/v1/audio/chat", ("messages",),
                    files={"file": ("a.wav", CLIP, "audio/wav")}, data={"messages": "[{\"role\": "}),
    ]
    return cases
