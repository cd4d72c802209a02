"""Our HTTP load generator (`bench serve`) beside vLLM's own, `vllm bench serve`, on the same
server: the same levels, clip length and output tokens, so that a bias in ours shows as a
gap between the two.

    python -m mdlserve.benchmarks.vllm_anchor --url URL --tokenizer CHECKPOINT
        [--concurrency 1,4,16] [--num-requests 64] [--clip-s 30] [--out-tokens 100]
        [--rounds 2] [--model-name NAME] [--api-key KEY] [--seed N] --out DIR

vLLM's tool can send audio: its `custom_audio` dataset reads a JSONL of prompts and audio
files and, with `--enable-multimodal-chat`, sends each file as a base64 WAV `input_audio`
part to /v1/chat/completions, streaming. What it cannot do (several load processes
holding exactly N requests, the server's in-flight gauges and CPU, bodies built before the
clock starts) is why ours exists; where both can measure, they should agree.

For every round and level both tools run back to back, in alternating order (ours first in
even rounds, vLLM's in odd ones), each with clips no run has sent before: vLLM's
multimodal and prefix caches make a repeated clip nearly free. vLLM's clips are written
here as 16-bit WAV files (the format ours sends), one per request; its ready check and
warm-ups are off (`bench serve` has already warmed the server, and a warm-up would send
the first clip twice). Both ask for exactly `--out-tokens` tokens (`ignore_eos`, and
`min_tokens` as ours sends it) at temperature 0, one load process each. Reported per run: requests per second (completed
requests over the time from the first send to the last completion, vLLM's definition),
TTFT, TPOT and end-to-end latency medians; per level, ours over vLLM's.
vLLM's benchmark needs pandas for its JSONL reader (the `bench` and `dev` extras).
"""

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .common import make_clip, parse_int_list, wav_bytes, write_json
from .http_load import ChatClient

ANCHOR_KEY = 47  # vLLM's clips: (seed, ANCHOR_KEY, round, level, request); ours are keyed by `bench serve`
PROMPT = "Caption the audio."
STATISTICS = ("request_throughput", "in_flight", "ttft_median_ms", "tpot_median_ms", "e2e_median_ms")


def vllm_command() -> list[str]:
    """vLLM's CLI: its console script when installed, else the module it runs."""
    script = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


async def ready_model(args) -> str:
    """Wait until the server answers a warm-up request (a clip of this run's own); the
    model name to send, given or the first of /v1/models."""
    async with ChatClient(args.url, args.api_key, 600.0, args.model_name, seed=args.seed) as client:
        return client.ready_model


def write_vllm_dataset(directory: Path, keys: Sequence[tuple[int, ...]], clip_s: float) -> Path:
    """One WAV per request and the JSONL that vLLM's `custom_audio` dataset reads."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, key in enumerate(keys):
        path = directory / f"{i:05d}.wav"
        path.write_bytes(wav_bytes(make_clip(clip_s, key)))
        rows.append({"prompt": PROMPT, "audio": str(path)})
    dataset = directory / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return dataset


def run_vllm(args, dataset: Path, concurrency: int, out_dir: Path, name: str) -> dict:
    """`vllm bench serve` at one concurrency; its result, in the fields compared here."""
    command = [
        *vllm_command(), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", args.url.rstrip("/"), "--model", args.model_name, "--tokenizer", args.tokenizer,
        "--dataset-name", "custom_audio", "--dataset-path", str(dataset), "--enable-multimodal-chat",
        "--disable-shuffle", "--num-prompts", str(args.num_requests), "--max-concurrency", str(concurrency),
        "--custom-output-len", str(args.out_tokens), "--ignore-eos", "--temperature", "0",
        "--extra-body", json.dumps({"min_tokens": args.out_tokens}),
        "--ready-check-timeout-sec", "0", "--num-warmups", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    env = dict(os.environ, **({"OPENAI_API_KEY": args.api_key} if args.api_key else {}))  # its bearer token
    with open(out_dir / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return vllm_result(out_dir / f"{name}.json")


def vllm_result(path: Path) -> dict:
    """The fields compared here, from `vllm bench serve`'s result file."""
    result = json.loads(path.read_text())
    return with_in_flight({
        "requests": result["num_prompts"],
        "ok": result["completed"],
        "errors": result["failed"],
        "output_tokens": result["total_output_tokens"],
        "request_throughput": result["request_throughput"],
        "ttft_median_ms": result["median_ttft_ms"],
        "tpot_median_ms": result["median_tpot_ms"],
        "e2e_median_ms": result["median_e2el_ms"],
        "e2e_mean_ms": result["mean_e2el_ms"],
    })  # fmt: skip


def with_in_flight(run: dict) -> dict:
    """`in_flight`: the requests the tool kept open on average, by Little's law from its own
    figures (throughput times mean latency); below the concurrency when the client was slow
    to send the next request after a completion."""
    return {**run, "in_flight": run["request_throughput"] * run["e2e_mean_ms"] / 1000}


def run_ours(args, concurrency: int, seed: int, out_dir: Path, name: str) -> dict:
    """`bench serve` at one concurrency (its own fresh clips, from `seed`)."""
    command = [
        sys.executable, "-m", "mdlserve.benchmarks", "serve", "--url", args.url, "--model-name", args.model_name,
        "--concurrency", str(concurrency), "--request-rate", "", "--num-requests", str(args.num_requests),
        "--clip-s", str(args.clip_s), "--out-tokens", str(args.out_tokens), "--prompt", PROMPT,
        "--seed", str(seed), "--out", str(out_dir / name), *(["--api-key", args.api_key] if args.api_key else []),
    ]  # fmt: skip
    with open(out_dir / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return ours_result(out_dir / name)


def ours_result(directory: Path) -> dict:
    """The same fields from a `bench serve` results directory of one level."""
    (row,) = json.loads((directory / "summary.json").read_text())["serve"]
    requests = json.loads((directory / "raw.json").read_text())["requests"]
    return with_in_flight({
        "requests": row["requests"],
        "ok": row["ok"],
        "errors": row["requests"] - row["ok"],
        "output_tokens": sum(r["output_tokens"] for r in requests),
        "request_throughput": row["total_request_throughput"],
        "ttft_median_ms": row["ttft_ms"]["median"],
        "tpot_median_ms": row["tpot_ms"]["median"],
        "e2e_median_ms": row["e2e_ms"]["median"],
        "e2e_mean_ms": row["e2e_ms"]["mean"],
    })  # fmt: skip


def ratio(ours: float | None, vllm: float | None) -> float | None:
    return ours / vllm if ours is not None and vllm else None


def compare(runs: list[dict]) -> list[dict]:
    """Per level: each tool's mean over its rounds and ours over vLLM's."""
    levels = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        means = {}
        for tool in ("ours", "vllm"):
            rows = [r for r in runs if r["concurrency"] == concurrency and r["tool"] == tool]
            means[tool] = {
                field: float(np.mean([r[field] for r in rows])) if all(r[field] is not None for r in rows) else None
                for field in STATISTICS
            }
        levels.append({
            "concurrency": concurrency,
            "ours": means["ours"],
            "vllm": means["vllm"],
            "ours_over_vllm": {field: ratio(means["ours"][field], means["vllm"][field]) for field in means["ours"]},
        })  # fmt: skip
    return levels


def markdown(summary: dict) -> str:
    def cell(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| c | tool | req/s by round | req/s | in flight | TTFT p50 ms | TPOT p50 ms | E2E p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in summary["levels"]:
        for tool, label in (("ours", "bench serve"), ("vllm", "vllm bench serve")):
            m = level[tool]
            rounds = [r for r in summary["runs"] if r["concurrency"] == level["concurrency"] and r["tool"] == tool]
            per_round = ", ".join(cell(r["request_throughput"]) for r in rounds)
            lines.append(
                f"| {level['concurrency']} | {label} | {per_round} | {cell(m['request_throughput'])} | "
                f"{cell(m['in_flight'])} | {cell(m['ttft_median_ms'], 1)} | {cell(m['tpot_median_ms'])} | "
                f"{cell(m['e2e_median_ms'], 1)} |"
            )
        r = level["ours_over_vllm"]
        lines.append(
            f"| {level['concurrency']} | ours / vLLM's | | "
            + " | ".join(cell(r[field], 3) for field in STATISTICS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--tokenizer", required=True, help="the checkpoint directory (vLLM's tool counts prompt tokens)")
    p.add_argument("--model-name", default=None, help="the request's `model` (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("MDL_API_KEY"), help="bearer token (default: $MDL_API_KEY)")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop levels, comma list")
    p.add_argument("--num-requests", type=int, default=64, help="requests per run")
    p.add_argument("--clip-s", type=float, default=30.0)
    p.add_argument("--out-tokens", type=int, default=100, help="exact output tokens (ignore_eos)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool per level, order alternating")
    p.add_argument("--seed", type=int, default=None, help="seed of both tools' clips (default: random per run)")
    p.add_argument("--out", required=True, help="results directory")
    args = p.parse_args(argv)
    levels = parse_int_list(args.concurrency)
    if args.seed is None:
        args.seed = secrets.randbelow(2**20)  # fresh clips for every run against a server that caches
    args.model_name = asyncio.run(ready_model(args))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for round_index in range(args.rounds):
        for level_index, concurrency in enumerate(levels):
            order = ("ours", "vllm") if round_index % 2 == 0 else ("vllm", "ours")
            for tool in order:
                name = f"{tool}-c{concurrency}-r{round_index}"
                if tool == "vllm":
                    clips = out_dir / f"clips-{name}"
                    keys = [(args.seed, ANCHOR_KEY, round_index, level_index, i) for i in range(args.num_requests)]
                    result = run_vllm(args, write_vllm_dataset(clips, keys, args.clip_s), concurrency, out_dir, name)
                    shutil.rmtree(clips)
                else:
                    seed = args.seed * 1000 + round_index * 100 + level_index
                    result = run_ours(args, concurrency, seed, out_dir, name)
                runs.append({"tool": tool, "concurrency": concurrency, "round": round_index, **result})
                print(json.dumps(runs[-1]), flush=True)
    summary = {
        "url": args.url,
        "seed": args.seed,
        "clip_s": args.clip_s,
        "out_tokens": args.out_tokens,
        "num_requests": args.num_requests,
        "runs": runs,
        "levels": compare(runs),
    }
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
