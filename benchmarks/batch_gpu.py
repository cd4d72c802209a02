"""Batch-job throughput on a GPU next to `bench throughput` at the same batch, one session.

    python -m mdlserve.benchmarks.batch_gpu --out DIR [--clips 512] [--clip-s 30] [--out-tokens 100]
        [--model CKPT] [--no-compare] [--batch-arg=--flag ...]

1. writes `--clips` fresh WAV files (16-bit PCM, 16 kHz, `--clip-s` long, a seed per run so
   no clip repeats an earlier run's) into DIR/clips;
2. runs `mdl-serve batch DIR/clips --max-in-flight N --min-tokens T --max-tokens T` on the
   `7b` preset with random weights (`--load-format dummy`; the checkpoint is generated
   into DIR/ckpt-7b unless --model names one): every clip in the engine at once, exactly
   T output tokens each, as `bench throughput` does;
3. unless --no-compare, runs `mdl-serve bench throughput --batches N` on the same checkpoint;
4. writes DIR/summary.json: the batch job's summary, bench's samples/s, and their ratio
   (batch clips/s over the engine's run time, which includes reading and decoding the
   files, / bench samples/s, which starts from arrays in memory). The issue's goal is
   a ratio ≥ 0.95.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import make_clip, wav_bytes


def write_clips(folder: Path, count: int, seconds: float, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"clip{i:05d}.wav").write_bytes(wav_bytes(make_clip(seconds, (seed, i))))


def mdl_serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "mdlserve.server.cli", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mdlserve.benchmarks.batch_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="working and results directory")
    parser.add_argument("--clips", type=int, default=512, help="clips, all in flight at once")
    parser.add_argument("--clip-s", type=float, default=30.0)
    parser.add_argument("--out-tokens", type=int, default=100)
    parser.add_argument("--model", default=None, help="checkpoint (default: the 7b preset, generated)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--no-compare", action="store_true", help="skip `bench throughput`")
    parser.add_argument("--batch-arg", action="append", default=[], help="extra flag for mdl-serve batch")
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(out / "ckpt-7b")
    if args.model is None and not (out / "ckpt-7b" / "config.json").exists():
        subprocess.run(mdl_serve("make-checkpoint", "--preset", "7b", "--out", model), check=True)
    seed = time.time_ns() % (1 << 31)
    clips = out / f"clips-{seed}"
    write_clips(clips, args.clips, args.clip_s, seed)

    tokens = str(args.out_tokens)
    batch_summary = out / "batch-summary.json"
    batch = subprocess.run(mdl_serve(
        "batch", str(clips), "--output", str(out / f"batch-{seed}.jsonl"), "--model", model, "--load-format", "dummy",
        "--max-in-flight", str(args.clips), "--max-tokens", tokens, "--min-tokens", tokens,
        "--max-model-len", str(args.max_model_len), "--progress", "log", "--log-interval", "5",
        "--summary", str(batch_summary), *args.batch_arg,
    ))  # fmt: skip
    result = {"clips": args.clips, "clip_s": args.clip_s, "out_tokens": args.out_tokens, "seed": seed,
              "batch_exit_code": batch.returncode,
              "batch": json.loads(batch_summary.read_text()) if batch_summary.exists() else None}  # fmt: skip
    if not args.no_compare:
        subprocess.run(mdl_serve(
            "bench", "throughput", "--model", model, "--dummy", "--batches", str(args.clips), "--clip-s",
            str(args.clip_s), "--out-tokens", tokens, "--max-model-len", str(args.max_model_len), "--out",
            str(out / "bench"),
        ))  # fmt: skip
        bench_summary = out / "bench" / "summary.json"
        points = json.loads(bench_summary.read_text())["throughput"] if bench_summary.exists() else []
        bench_rate = next((p["samples_per_s"] for p in points if p["batch"] == args.clips), None)
        batch_rate = (result["batch"] or {}).get("clips_per_s")
        result["bench_samples_per_s"] = bench_rate
        result["batch_over_bench"] = round(batch_rate / bench_rate, 4) if batch_rate and bench_rate else None
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return batch.returncode


if __name__ == "__main__":
    sys.exit(main())
