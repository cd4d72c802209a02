"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono fp32."""

import asyncio
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile
import soxr

from mdlserve.model_plugin.processing import SAMPLE_RATE


class AudioDecodeError(ValueError):
    """The bytes are not audio we can decode; the message names the problem."""


def decode_audio(data: bytes) -> np.ndarray:
    """Decode to 16 kHz mono float32. soundfile (libsndfile) first, PyAV (ffmpeg) second."""
    if not data:
        raise AudioDecodeError("the audio is empty (0 bytes)")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        samples, rate = _decode_with_av(data)
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if mono.size == 0:
        raise AudioDecodeError("the audio decodes to zero samples")
    if not np.isfinite(mono).all():
        raise AudioDecodeError("the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_with_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono")
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            rate = stream.rate or stream.codec_context.sample_rate
    except AudioDecodeError:
        raise
    except Exception as exc:  # PyAV raises many unrelated types for corrupt input
        raise AudioDecodeError(f"unrecognised or corrupt audio ({type(exc).__name__})") from None
    if not chunks or not rate:
        raise AudioDecodeError("the audio decodes to zero samples")
    return np.concatenate(chunks)[:, None], int(rate)


class DecodePool:
    """Runs `decode_audio` off the event loop on a pool of threads.

    Threads rather than processes: libsndfile (via cffi), FFmpeg (PyAV) and soxr release
    the GIL while they work, and threads avoid pickling the file bytes in and the samples
    out (see server/bench_decode_pool.py and docs/gateway.md for the measurement).
    """

    def __init__(self, workers: int, on_decoded: Callable[[float, float], None] | None = None):
        """`on_decoded(decode_seconds, audio_seconds)` is called on the event loop per clip."""
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audio-decode")
        self._on_decoded = on_decoded

    async def decode(self, data: bytes) -> np.ndarray:
        def timed() -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            samples = decode_audio(data)
            return samples, time.perf_counter() - start

        samples, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        if self._on_decoded is not None:
            self._on_decoded(seconds, samples.size / SAMPLE_RATE)
        return samples

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
