"""Where a Python process spends its samples: py-spy's raw (collapsed) stacks, summarised.

`python -m mdlserve.benchmarks.stack_summary STACKS.txt [--top 25] [--out summary.json]`

Each line of py-spy's `--format raw` output is `frame;frame;...;leaf COUNT`, outermost
frame first, a frame being `function (file:line)`. With `py-spy record --gil`, only the
thread holding the GIL is sampled: for a gateway whose event loop and worker threads share
one GIL, the shares below are the shares of the one core it can use. Reported: samples
per leaf function (self), per function anywhere on the stack (inclusive, counted once per
sample), and per package (vllm, starlette, our server, ...) of the leaf.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
PACKAGES = ("mdlserve", "vllm", "starlette", "fastapi", "uvicorn", "h11", "httptools", "pydantic", "transformers",
            "tokenizers", "msgspec", "zmq", "numpy", "torch", "soundfile", "soxr", "prometheus_client", "asyncio",
            "json", "threading", "concurrent", "selectors", "logging")  # fmt: skip


def parse(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def function(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    short = "/".join(file.split("/site-packages/")[-1].split("/")[-3:]) if "/" in file else file
    return f"{match['func']} ({short})"


def package(frame: str) -> str:
    match = FRAME.match(frame.strip())
    file = match["file"] if match else frame
    if "/server/" in file or "/model_plugin/" in file or "/benchmarks/" in file or "mdlserve" in file:
        return "mdlserve"
    tail = file.split("/site-packages/")[-1]
    first = re.split(r"[/.]", tail.split("/lib/python3")[-1].lstrip("/0123456789."), maxsplit=1)[0]
    return next((p for p in PACKAGES if first == p or tail.startswith(p + "/")), first or "other")


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> dict:
    total = sum(count for _, count in stacks)
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, count in stacks:
        leaf[function(frames[-1])] += count
        packages[package(frames[-1])] += count
        for name in {function(f) for f in frames}:
            inclusive[name] += count

    def rows(counter: Counter) -> list[dict]:
        return [{"name": name, "samples": n, "share": n / total} for name, n in counter.most_common(top)]

    return {"samples": total, "self": rows(leaf), "inclusive": rows(inclusive), "packages": rows(packages)}


def table(summary: dict) -> str:
    lines = [f"{summary['samples']} samples"]
    for key in ("packages", "self", "inclusive"):
        lines.append(f"-- {key}")
        lines += [f"  {r['share']:6.1%}  {r['name'][:110]}" for r in summary[key]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = summarize(parse(args.stacks.read_text(errors="replace")), args.top)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(table(summary))


if __name__ == "__main__":
    main()
