"""Summarise a PyTorch profiler trace of an engine run: how busy the GPU was, where it
waited, and which kernels took the time.

`python -m mdlserve.benchmarks.trace_summary TRACE.json[.gz] [--out summary.json]`

vLLM writes one Chrome trace per worker when the engine runs with a torch
`profiler_config` (see `bench throughput --profile-dir`). Device activity is the union of
the events in the kernel, memcpy and memset categories; the busy fraction is that union
over the span from the first device event to the last. Idle gaps between device events
are where the GPU waited on the host (scheduling, input preparation, Python); the
largest ones are listed. Each gap is also
placed on the timeline (`at_ms` from the span's start) and attributed to what the host
thread that launched the next device event was doing at the gap's midpoint: its stack of
profiler events (vLLM's annotations, torch ops, CUDA runtime calls), innermost last, and
`idle_by_host_op` sums the gaps by that innermost event ("(python)" where no event was
open: plain Python such as the scheduler). Kernels are grouped into coarse families by
name so that a bf16 and an FP8 run can be compared at a glance.
"""

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"}
NO_HOST_EVENT = "(python)"
NO_LAUNCHER = "(launch not in trace)"
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


def load_trace(path: Path) -> tuple[list[dict], list[dict]]:
    """The trace's complete events: (device events, host events)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X" and "dur" in e]
    return ([e for e in events if e.get("cat") in DEVICE_CATEGORIES],
            [e for e in events if e.get("cat") in HOST_CATEGORIES])  # fmt: skip


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


def _correlation(event: dict) -> object:
    return (event.get("args") or {}).get("correlation")


def _end(event: dict) -> float:
    return float(event["ts"]) + float(event["dur"])


def host_stacks_at(host: list[dict], points: list[tuple[object, float]]) -> list[list[str]]:
    """For each (thread, time): the names of that thread's host events open at that time,
    outermost first. One sweep per thread: a thread's events nest, so a stack of open
    events, popped as they end, is the call stack at each point."""
    by_thread: dict[object, list[dict]] = defaultdict(list)
    for e in host:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    stacks: list[list[str]] = [[] for _ in points]
    wanted: dict[object, list[tuple[float, int]]] = defaultdict(list)
    for index, (thread, at) in enumerate(points):
        wanted[thread].append((at, index))
    for thread, queries in wanted.items():
        events = sorted(by_thread.get(thread, []), key=lambda e: (float(e["ts"]), -float(e["dur"])))
        open_events: list[dict] = []
        position = 0
        for at, index in sorted(queries):
            while position < len(events) and float(events[position]["ts"]) <= at:
                event = events[position]
                while open_events and _end(open_events[-1]) <= float(event["ts"]):
                    open_events.pop()
                open_events.append(event)
                position += 1
            while open_events and _end(open_events[-1]) <= at:
                open_events.pop()
            stacks[index] = [e["name"] for e in open_events if _end(e) > at]
    return stacks


def idle_gaps(events: list[dict]) -> list[tuple[float, float, dict]]:
    """(start, end, the device event that ends it) of every stretch of at least
    GAP_REPORT_US µs in which no device event ran."""
    ordered = sorted(events, key=lambda e: float(e["ts"]))
    gaps = []
    busy_until = float(ordered[0]["ts"])
    for e in ordered:
        start = float(e["ts"])
        if start - busy_until >= GAP_REPORT_US:
            gaps.append((busy_until, start, e))
        busy_until = max(busy_until, _end(e))
    return gaps


def gap_attribution(gaps: list[tuple[float, float, dict]], host: list[dict], span_start: float, top: int) -> dict:
    """Where each gap falls and what the launching host thread was doing (see the module
    docstring)."""
    launcher = {_correlation(e): (e.get("pid"), e.get("tid")) for e in host
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and _correlation(e) is not None}  # fmt: skip
    threads = [launcher.get(_correlation(nxt)) for _, _, nxt in gaps]
    stacks = host_stacks_at(host, [(thread, (s + e) / 2) for thread, (s, e, _) in zip(threads, gaps)])
    stacks = [stack if thread else [NO_LAUNCHER] for thread, stack in zip(threads, stacks)]
    by_op: dict[str, float] = defaultdict(float)
    for (start, end, _), stack in zip(gaps, stacks):
        by_op[stack[-1] if stack else NO_HOST_EVENT] += end - start
    largest = sorted(zip(gaps, stacks), key=lambda gs: gs[0][0] - gs[0][1])[:top]
    by_op_ms = {name[:120]: us / 1000 for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]}
    return {
        "idle_by_host_op_ms": by_op_ms,
        "largest_gaps": [{"at_ms": (s - span_start) / 1000, "ms": (e - s) / 1000, "next": nxt["name"][:80],
                          "host_stack": [name[:80] for name in stack[-6:]]}
                         for (s, e, nxt), stack in largest],
    }  # fmt: skip


def summarize(events: list[dict], top: int = 15, host: list[dict] | None = None) -> dict:
    if not events:
        return {"device_events": 0}
    intervals = busy_intervals(events)
    span_us = intervals[-1][1] - intervals[0][0]
    busy_us = sum(e - s for s, e in intervals)
    gaps = idle_gaps(events)
    large = sorted((end - start for start, end, _ in gaps), reverse=True)
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
        **gap_attribution(gaps, host or [], intervals[0][0], top),
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
    idle = summary["idle_by_host_op_ms"]
    lines.append("idle by host event: " + ", ".join(f"{k} {v:.1f} ms" for k, v in idle.items()))
    for gap in summary["largest_gaps"][:5]:
        stack = " > ".join(gap["host_stack"]) or NO_HOST_EVENT
        lines.append(f"  gap {gap['ms']:.2f} ms at {gap['at_ms']:.1f} ms: {stack}")
    for k in summary["top_kernels"]:
        lines.append(f"  {k['total_ms']:9.1f} ms {k['share']:6.1%} x{k['count']:<6} [{k['family']}] {k['name'][:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    device, host = load_trace(args.trace)
    summary = {"trace": args.trace.name, **summarize(device, args.top, host)}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(table(summary))


if __name__ == "__main__":
    main()
