"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono fp32."""

import io

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
