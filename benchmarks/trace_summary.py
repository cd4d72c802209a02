"""Summarise a PyTorch profiler trace of an engine run: how busy the GPU was, where it
waited, and which kernels took the time.

`python -m mdlserve.benchmarks.trace_summary TRACE.json[.gz] [--out summary.json]`

vLLM writes one Chrome trace per worker when the engine runs with a torch
`profiler_config` (see `bench throughput --profile-dir`). Device activity is the union of
the events in the kernel, memcpy and memset categories; the busy fraction is that union
over the span from the first device event to the last. Idle gaps between device events
are where the GPU waited on the host (scheduling, input preparation, Python); the
largest ones are listed. Kernels are grouped into coarse families by name so that a
bf16 and an FP8 run can be compared at a glance.
"""

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# First match wins; names are lower-cased before matching.
FAMILIES = [
    ("attention", re.compile(r"flash|fmha|attn|attention|paged")),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|scaled_mm|matmul|wgmma")),
    ("quantize", re.compile(r"quant|fp8|scaled_fp8|per_token")),
    ("norm", re.compile(r"norm")),
    ("activation", re.compile(r"silu|gelu|act_and_mul|swiglu")),
    ("rotary", re.compile(r"rotary|rope")),
    ("sampling", re.compile(r"sample|topk|top_k|argmax|softmax|sort|gumbel")),
    ("fft/mel", re.compile(r"fft|stft|mel")),
    ("copy", re.compile(r"memcpy|memset|copy|cat_|index|gather|scatter|fill")),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|triton")),
]
GAP_REPORT_US = 100.0


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and "dur" in e]


def family(name: str) -> str:
    lowered = name.lower()
    return next((fam for fam, pattern in FAMILIES if pattern.search(lowered)), "other")


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """Merged [start, end) intervals (µs) during which any device event ran."""
    merged: list[list[float]] = []
    for start, end in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def summarize(events: list[dict], top: int = 15) -> dict:
    if not events:
        return {"device_events": 0}
    intervals = busy_intervals(events)
    span_us = intervals[-1][1] - intervals[0][0]
    busy_us = sum(e - s for s, e in intervals)
    gaps = [intervals[i + 1][0] - intervals[i][1] for i in range(len(intervals) - 1)]
    large = sorted((g for g in gaps if g >= GAP_REPORT_US), reverse=True)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_family: dict[str, float] = defaultdict(float)
    for e in events:
        row = by_kernel[e["name"]]
        row[0] += 1
        row[1] += float(e["dur"])
        by_family[family(e["name"])] += float(e["dur"])
    kernel_us = sum(by_family.values())
    kernels = sorted(by_kernel.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {
        "device_events": len(events),
        "span_ms": span_us / 1000,
        "busy_ms": busy_us / 1000,
        "busy_fraction": busy_us / span_us if span_us else None,
        "idle_ms": (span_us - busy_us) / 1000,
        "gaps_over_100us": {
            "count": len(large),
            "total_ms": sum(large) / 1000,
            "largest_ms": [g / 1000 for g in large[:10]],
        },  # fmt: skip
        "families_ms": {k: v / 1000 for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "families_share": {k: v / kernel_us for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "name": name[:160],
                "family": family(name),
                "count": int(n),
                "total_ms": us / 1000,
                "share": us / kernel_us,
            }
            for name, (n, us) in kernels
        ],  # fmt: skip
    }


def table(summary: dict) -> str:
    if not summary.get("device_events"):
        return "no device events in the trace"
    lines = [f"span {summary['span_ms']:.1f} ms, GPU busy {summary['busy_fraction']:.1%}, "
             f"idle {summary['idle_ms']:.1f} ms ({summary['gaps_over_100us']['count']} gaps >= 0.1 ms, "
             f"{summary['gaps_over_100us']['total_ms']:.1f} ms)"]  # fmt: skip
    lines.append("families: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["families_share"].items() if v >= 0.01))
    for k in summary["top_kernels"]:
        lines.append(f"  {k['total_ms']:9.1f} ms {k['share']:6.1%} x{k['count']:<6} [{k['family']}] {k['name'][:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    summary = {"trace": args.trace.name, **summarize(load_events(args.trace), args.top)}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(table(summary))


if __name__ == "__main__":
    main()
