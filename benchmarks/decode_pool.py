"""Measure audio decode throughput: serial vs a thread pool vs a process pool.

    python -m mdlserve.benchmarks.decode_pool [--clips 48] [--seconds 10] [--workers N]

Encodes clips in several formats (44.1 kHz stereo wav/flac/ogg, 48 kHz mp3), then decodes
them all to 16 kHz mono through `decode_audio` with each strategy and prints clips per
second. The gateway's DecodePool uses threads because of what this measures (numbers in
docs/gateway.md): libsndfile, soxr and FFmpeg release the GIL, and threads avoid copying
the bytes and the decoded samples between processes.
"""

import argparse
import io
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import soundfile

from mdlserve.server.audio import decode_audio
from mdlserve.server.settings import default_decode_workers


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Write `samples` (frames x channels float32) in `fmt`: wav, flac, ogg (vorbis) or mp3."""
    buf = io.BytesIO()
    if fmt == "mp3":
        import av

        with av.open(buf, mode="w", format="mp3") as container:
            stream = container.add_stream("libmp3lame", rate=rate, layout="stereo" if samples.shape[1] == 2 else "mono")
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples.T), format="fltp", layout=stream.layout.name
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return buf.getvalue()
    subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}[fmt]
    soundfile.write(buf, samples, rate, format=fmt.upper(), subtype=subtype)
    return buf.getvalue()


def make_clips(count: int, seconds: float) -> list[bytes]:
    rng = np.random.default_rng(0)
    formats = [("wav", 44100), ("flac", 44100), ("ogg", 44100), ("mp3", 48000)]
    clips = []
    for i in range(count):
        fmt, rate = formats[i % len(formats)]
        samples = (0.1 * rng.standard_normal((int(seconds * rate), 2))).astype(np.float32)
        clips.append(encode(samples, rate, fmt))
    return clips


def run(executor: Executor | None, clips: list[bytes]) -> float:
    start = time.perf_counter()
    if executor is None:
        for clip in clips:
            decode_audio(clip)
    else:
        list(executor.map(decode_audio, clips))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=default_decode_workers())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clips = make_clips(args.clips, args.seconds)
    total_mb = sum(map(len, clips)) / 1e6
    print(f"{args.clips} clips of {args.seconds:g} s ({total_mb:.1f} MB), {args.workers} workers")
    with ThreadPoolExecutor(args.workers) as threads, ProcessPoolExecutor(args.workers) as processes:
        for pool in (threads, processes):  # warm up: imports, worker start
            list(pool.map(decode_audio, clips[: args.workers * 2]))
        for name, executor in (("serial", None), ("threads", threads), ("processes", processes)):
            elapsed = min(run(executor, clips) for _ in range(args.repeats))
            print(f"{name:>10}: {elapsed:6.2f} s  {args.clips / elapsed:7.1f} clips/s (best of {args.repeats})")


if __name__ == "__main__":
    main()
