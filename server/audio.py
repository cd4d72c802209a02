"""Audio decoding: any common container/codec, any rate and channel count -> 16 kHz mono.

16-bit PCM that is already 16 kHz mono (most uploads: what `arecord`, `sox` and the
benchmarks write) stays int16, the form the model plugin takes without conversion (half
the bytes of float32 for vLLM to hash, send to the engine and copy to the GPU); every
other source is float32 in [-1, 1]. Both hold the same samples: int16 x is x / 32768.

A canonical WAV of it (a plain PCM `fmt ` chunk, the samples in a `data` chunk that ends
the file) is not decoded at all: its samples are the `data` chunk's bytes, returned as a
numpy view of the upload (`_canonical_pcm16`), the same int16 values libsndfile reads. A
30 s clip is 960 kB, which libsndfile's virtual IO, its blocks and their concatenation
copied three times. Every other file, and any WAV that is odd in any way, takes the
soundfile/PyAV path as before.
"""

import asyncio
import binascii
import io
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pybase64
import soundfile
import soxr

from mdlserve.model_plugin.processing import PCM16_SCALE, SAMPLE_RATE, sample_range_problem


class AudioDecodeError(ValueError):
    """The bytes are not audio we can decode; the message names the problem."""


class InvalidBase64(ValueError):
    """Text given as base64 audio is not valid base64."""


# Sample rates outside this range are corrupt or hostile headers: resampling 1 Hz audio to
# 16 kHz multiplies its size by 16000 (a 200 kB WAV became gigabytes and crashed soxr).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
# More channels than any real recording; a WAV header may declare 65535, and one block of
# 65536 frames of that would be 17 GB.
MAX_CHANNELS = 64
# Samples (frames x channels) per decoded block: bounds the memory of one block.
BLOCK_SAMPLES = 1 << 17

# The `fmt ` chunk's first 16 bytes of 16 kHz mono 16-bit WAVE_FORMAT_PCM: format tag 1,
# 1 channel, 16000 Hz, 32000 bytes a second, 2 bytes a frame, 16 bits a sample.
_CANONICAL_FMT = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
# Chunks libsndfile skips without reading them: they may stand before `data` on the fast
# path. Any other chunk (`fact`, `PEAK`, `bext`, `cue `...) is parsed by libsndfile, which
# may refuse the file over it, so such a file takes libsndfile's path.
_SKIPPED_CHUNKS = frozenset({b"JUNK", b"PAD ", b"FLLR"})
# LIST subchunk ids libsndfile reads other than as id, size and payload (a `labl` shorter
# than 4 bytes has it read past the subchunk's end).
_SPECIAL_LIST_IDS = frozenset({b"INFO", b"adtl", b"exif", b"data", b"labl"})
# First bytes of a `data` chunk that libsndfile refuses as WavPack or Ogg inside a WAV.
_REFUSED_DATA_MARKERS = (b"wvpk", b"OggS")
# Chunks (or LIST subchunks) walked at most before giving the file to libsndfile: real
# files have a handful, and a file of millions of tiny chunks must not cost a Python loop.
_MAX_CHUNKS = 64
_U32 = struct.Struct("<I")


def decode_audio(data: bytes | bytearray, max_seconds: float | None = None) -> np.ndarray:
    """Decode to 16 kHz mono: int16 for 16-bit PCM at 16 kHz mono, float32 otherwise.
    A canonical 16 kHz mono 16-bit WAV's samples as they lie in `data`, then soundfile
    (libsndfile), then PyAV (ffmpeg).

    Decoding stops as soon as the audio passes `max_seconds`, so memory is bounded by the
    limit and not by what a tiny compressed file (hours of FLAC silence) decodes to.

    The result is always writable (torch.from_numpy warns on a read-only array): for a
    canonical WAV in a bytearray it is a view of `data` itself, for one in bytes a copy of
    its samples.
    """
    if (samples := _canonical_pcm16(data, max_seconds)) is not None:
        return samples
    return _decode_file(bytes(data), max_seconds)


def _decode_file(data: bytes, max_seconds: float | None) -> np.ndarray:
    """soundfile (libsndfile) first, PyAV (ffmpeg) second: any file but a canonical WAV
    (never empty). Bytes, not a bytearray: io.BytesIO reads bytes in place and would copy
    a bytearray."""
    if not data:
        raise AudioDecodeError("the audio is empty (0 bytes)")
    try:
        mono = _decode_with_soundfile(data, max_seconds)
    except AudioDecodeError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        mono = _decode_with_av(data, max_seconds)
    if mono.size == 0:
        raise AudioDecodeError("the audio decodes to zero samples")
    if mono.dtype == np.int16:
        return mono  # every int16 value is a valid sample
    if (problem := sample_range_problem(mono)) is not None:
        raise AudioDecodeError(problem)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _canonical_pcm16(data: bytes | bytearray, max_seconds: float | None) -> np.ndarray | None:
    """The samples of a canonical 16 kHz mono 16-bit WAV without decoding, or None for any
    other file. Bytes cannot back a writable array, so for them the samples are copied
    once (a view would make torch.from_numpy warn in the model plugin)."""
    span = _canonical_data_span(data)
    if span is None:
        return None
    offset, size = span
    limit = _frame_limit(SAMPLE_RATE, max_seconds)
    if limit is not None and size // 2 > limit:
        raise _too_long(max_seconds)
    samples = np.frombuffer(data, dtype="<i2", count=size // 2, offset=offset)
    return samples if samples.flags.writeable else samples.copy()


def _canonical_data_span(data: bytes | bytearray) -> tuple[int, int] | None:
    """(offset, size) of the `data` chunk of a canonical WAV, None for anything else.

    Canonical means what libsndfile reads as exactly these bytes: RIFF/WAVE, chunks
    walked from the start (each padded to an even length), a plain PCM 16 kHz mono 16-bit
    `fmt ` chunk before `data`, before them only chunks libsndfile skips (or an INFO
    list), and a non-empty `data` chunk of whole frames that ends the file. libsndfile
    reads on past `data` and may refuse the file over a later chunk, and it cuts a `data`
    chunk that runs past the end short: files like that keep its behaviour."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position, has_fmt = 12, False
    for _ in range(_MAX_CHUNKS):
        if position + 8 > len(data):
            return None
        chunk_id = bytes(data[position : position + 4])
        (size,) = _U32.unpack_from(data, position + 4)
        body = position + 8
        if chunk_id == b"data":
            return (body, size) if has_fmt and _whole_samples_to_the_end(data, body, size) else None
        end = _padded_end(data, body, size)
        if end is None:
            return None
        if chunk_id == b"fmt ":
            if has_fmt or size < 16 or data[body : body + 16] != _CANONICAL_FMT:
                return None  # a second `fmt ` is one libsndfile ignores: not worth the care
            has_fmt = True
        elif chunk_id not in _SKIPPED_CHUNKS and not (chunk_id == b"LIST" and _is_plain_info_list(data, body, size)):
            return None
        position = end
    return None


def _padded_end(data: bytes | bytearray, body: int, size: int) -> int | None:
    """Where a chunk ends with its pad byte, or None if it runs past the end of `data` or
    its pad byte is not the zero RIFF prescribes (older libsndfile releases skip some odd
    chunks without their pad byte and find the next chunk again only past a zero)."""
    end = body + size + (size & 1)
    if end > len(data) or (size & 1 and data[end - 1] != 0):
        return None
    return end


def _whole_samples_to_the_end(data: bytes | bytearray, body: int, size: int) -> bool:
    """Whether a `data` chunk holds whole 16-bit samples, at least one, up to the last
    byte of the file, and does not start like the WavPack or Ogg stream libsndfile refuses
    to read (those files go to PyAV)."""
    return (
        size > 0
        and size % 2 == 0
        and body + size == len(data)
        and bytes(data[body : body + 4]) not in _REFUSED_DATA_MARKERS
    )


def _is_plain_info_list(data: bytes | bytearray, body: int, size: int) -> bool:
    """Whether a LIST chunk is an INFO list (what ffmpeg writes before `data`) whose
    subchunks fill it exactly. libsndfile reads a LIST subchunk by subchunk; only for such
    a list does it end where the chunk ends, so anything else takes its path."""
    end = body + size
    if size < 4 or data[body : body + 4] != b"INFO":
        return False
    position = body + 4
    for _ in range(_MAX_CHUNKS):
        if position == end:
            return True
        if position + 8 > end or bytes(data[position : position + 4]) in _SPECIAL_LIST_IDS:
            return False
        (sub_size,) = _U32.unpack_from(data, position + 4)
        position += 8 + sub_size + (sub_size & 1)
    return False


class _To16k:
    """Collects mono blocks at the source rate as 16 kHz samples, resampling block by block
    (soxr HQ, streaming): memory holds the 16 kHz result and one block, never the whole
    clip at its source rate (716 s at 768 kHz would be 2.2 GB)."""

    def __init__(self, rate: int):
        self.stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, quality="HQ")
        self.chunks: list[np.ndarray] = []

    def add(self, mono: np.ndarray) -> None:
        self.chunks.append(mono if self.stream is None else self.stream.resample_chunk(mono))

    def result(self) -> np.ndarray:
        if self.stream is not None:
            self.chunks.append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


def _rate_problem(rate: int) -> str | None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        return f"sample rate {rate} Hz is outside the supported range {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
    return None


def _channels_problem(channels: int) -> str | None:
    if not 1 <= channels <= MAX_CHANNELS:
        return f"{channels} channels is outside the supported range 1-{MAX_CHANNELS}"
    return None


def _check_rate(rate: int) -> None:
    if (problem := _rate_problem(rate)) is not None:
        raise AudioDecodeError(problem)


def _frame_limit(rate: int, max_seconds: float | None) -> int | None:
    return None if max_seconds is None else int(max_seconds * rate)


def _check_channels(channels: int) -> None:
    if (problem := _channels_problem(channels)) is not None:
        raise AudioDecodeError(problem)


def _too_long(max_seconds: float | None) -> AudioDecodeError:
    return AudioDecodeError(f"the audio is longer than the limit of {max_seconds:g} s (--max-audio-seconds)")


def _decode_with_soundfile(data: bytes, max_seconds: float | None) -> np.ndarray:
    """Block by block, each block mixed down and resampled at once (memory: the 16 kHz
    mono samples only)."""
    frames = 0
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        _check_rate(rate)
        _check_channels(f.channels)
        limit = _frame_limit(rate, max_seconds)
        if limit is not None and f.frames > limit and f.seekable():
            # The header says how long it is: refused before decoding anything. (A header
            # may also lie; the frame count below stops the decode either way.)
            raise _too_long(max_seconds)
        # 16-bit PCM (most uploads) is read as integers: libsndfile's int16 -> float
        # conversion takes longer than the rest of the decode, and x * 2**-15 gives its
        # samples bit for bit. At 16 kHz mono the integers are the result as they are.
        pcm16 = f.subtype == "PCM_16"
        keep_pcm16 = pcm16 and rate == SAMPLE_RATE and f.channels == 1
        blocksize = max(1, BLOCK_SAMPLES // f.channels)
        out = _To16k(rate)
        for block in f.blocks(blocksize=blocksize, dtype="int16" if pcm16 else "float32", always_2d=True):
            frames += block.shape[0]
            if limit is not None and frames > limit:
                raise _too_long(max_seconds)
            if keep_pcm16:
                out.add(block[:, 0])
            else:
                out.add(_mix_down(block.astype(np.float32)) * PCM16_SCALE if pcm16 else _mix_down(block))
    return out.result()


def _mix_down(block: np.ndarray) -> np.ndarray:
    """frames x channels -> frames, the channel mean (a matrix-vector product: numpy's
    mean over a short axis is ten times slower)."""
    if block.shape[1] == 1:
        return block[:, 0]
    return block @ np.full(block.shape[1], 1 / block.shape[1], np.float32)


def _decode_with_av(data: bytes, max_seconds: float | None) -> np.ndarray:
    import av

    collected, frames = None, 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono")
            rate = stream.rate or stream.codec_context.sample_rate
            if rate:
                _check_rate(rate)
            if stream.codec_context.channels:
                _check_channels(stream.codec_context.channels)
            declared = stream.duration * stream.time_base if stream.duration and stream.time_base else None
            if max_seconds is not None and declared is not None and declared > max_seconds:
                raise _too_long(max_seconds)  # the container says so: nothing decoded
            for frame in container.decode(stream):
                for mono in resampler.resample(frame):
                    if collected is None:  # the first frame says the rate when the header did not
                        rate = rate or mono.sample_rate
                        _check_rate(rate)
                        collected = _To16k(rate)
                    samples = mono.to_ndarray().reshape(-1)
                    frames += samples.size
                    if max_seconds is not None and frames > max_seconds * rate:
                        raise _too_long(max_seconds)
                    collected.add(samples)
    except AudioDecodeError:
        raise
    except Exception as exc:  # PyAV raises many unrelated types for corrupt input
        raise AudioDecodeError(_wav_header_problem(data) or _undecodable(exc)) from None
    if collected is None:
        raise AudioDecodeError("the audio decodes to zero samples")
    return collected.result()


def _undecodable(exc: Exception) -> str:
    """Why neither decoder read a file, in FFmpeg's words where it gave some: never a Python
    exception's class name (PyAV fails on some nonsense with AttributeError)."""
    import av

    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return f"unrecognised or corrupt audio ({exc.strerror})"
    return "unrecognised or corrupt audio"


# WAV format tags (the `fmt ` chunk's first field) whose samples are plain numbers of
# `bits per sample` bits, and those sizes the decoders read.
_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
_PCM_BITS, _FLOAT_BITS = (8, 16, 24, 32), (32, 64)


def _wav_header_problem(data: bytes) -> str | None:
    """What is wrong with a WAV's `fmt ` chunk (0 channels, a sample rate of 0 Hz, 0 bits
    per sample...), for a file that neither decoder could read; None when the file is no
    RIFF/RF64 WAV, has no readable `fmt ` chunk or nothing in it explains the failure."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return None
    position = 12
    for _ in range(_MAX_CHUNKS):
        if position + 8 > len(data):
            return None
        chunk_id = data[position : position + 4]
        (size,) = _U32.unpack_from(data, position + 4)
        if chunk_id == b"fmt ":
            return _fmt_problem(data[position + 8 : position + 8 + size])
        if chunk_id == b"data":
            return None
        position += 8 + size + (size & 1)
    return None


def _fmt_problem(fmt: bytes) -> str | None:
    if len(fmt) < 16:
        return f"corrupt WAV: its fmt chunk holds {len(fmt)} bytes, fewer than the 16 every WAV has"
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if (problem := _channels_problem(channels) or _rate_problem(rate)) is not None:
        return f"unsupported WAV: {problem}"
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
        (tag,) = struct.unpack_from("<H", fmt, 24)  # the first two bytes of the SubFormat GUID
    if tag == _WAVE_FORMAT_PCM and bits not in _PCM_BITS:
        return f"unsupported WAV: {bits} bits per sample (PCM: 8, 16, 24 or 32)"
    if tag == _WAVE_FORMAT_FLOAT and bits not in _FLOAT_BITS:
        return f"unsupported WAV: {bits} bits per sample (float: 32 or 64)"
    if tag == 0:
        return "unsupported WAV: format tag 0 (WAVE_FORMAT_UNKNOWN)"
    if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT):
        return f"unsupported or corrupt WAV (format tag 0x{tag:04X})"
    return None


def decode_input(data: bytes | str, max_seconds: float | None) -> np.ndarray:
    """`decode_audio` of a file's bytes, or of a file sent as base64 text (a `str`: an
    `input_audio` part's `data`): what a decode pool's worker runs."""
    if not isinstance(data, str):
        return decode_audio(data, max_seconds)
    decoded = _from_base64(data)
    if (samples := _canonical_pcm16(decoded, max_seconds)) is not None:
        return samples
    file = bytes(decoded)
    del decoded  # one copy of the file while it decodes, as when base64 decoded to bytes
    return _decode_file(file, max_seconds)


def _from_base64(text: str) -> bytearray:
    """A bytearray rather than bytes: a canonical WAV's samples are then a writable view of
    it, not a copy (`_canonical_pcm16`)."""
    try:
        return pybase64.b64decode_as_bytearray(text, validate=True)
    except (binascii.Error, ValueError):
        wrapped = any(ch in text for ch in "\n\r ")  # GNU base64 wraps at 76 columns unless -w0
        hint = ": it holds line breaks or spaces; send it unwrapped (base64 -w0)" if wrapped else ""
        raise InvalidBase64("not valid base64" + hint) from None


class DecodePool:
    """Runs `decode_input` off the event loop on a pool of threads.

    Threads rather than processes: libsndfile (via cffi), FFmpeg (PyAV) and soxr release
    the GIL while they work, and threads avoid pickling the file bytes in and the samples
    out (see benchmarks/decode_pool.py and docs/gateway.md for the measurement).
    """

    def __init__(self, workers: int, on_decoded: Callable[[float, float], None] | None = None):
        """`on_decoded(decode_seconds, audio_seconds)` is called on the event loop per clip."""
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audio-decode")
        self._on_decoded = on_decoded

    async def decode(self, data: bytes | str, max_seconds: float | None = None) -> np.ndarray:
        """`data` as text is base64, decoded in the same worker thread as the audio (one
        hand-off between threads per clip instead of two: on the H200 host the API
        processes' CPU per request set how close HTTP came to offline throughput)."""

        def timed() -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            samples = decode_input(data, max_seconds)
            return samples, time.perf_counter() - start

        samples, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        if self._on_decoded is not None:
            self._on_decoded(seconds, samples.size / SAMPLE_RATE)
        return samples

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
