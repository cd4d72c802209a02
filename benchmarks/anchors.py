"""Our HTTP load generator (`bench serve`) beside the two anchors issue 13 names, vLLM's own
`vllm bench serve` and locust, on the same server: the same levels, clip length and output
tokens, so that a bias in ours shows as a gap between them.

    python -m mdlserve.benchmarks.anchors --url URL --tokenizer CHECKPOINT
        [--tools vllm,locust] [--concurrency 1,4,16] [--num-requests 64] [--clip-s 30]
        [--out-tokens 100] [--rounds 2] [--model-name NAME] [--api-key KEY] [--seed N] --out DIR

vLLM's tool can send audio: its `custom_audio` dataset reads a JSONL of prompts and audio
files and, with `--enable-multimodal-chat`, sends each file as a base64 WAV `input_audio`
part to /v1/chat/completions, streaming. Locust sends what its locustfile says: here
(benchmarks/locustfile.py) the very request bodies `bench serve` would send, built before
the run, non-streaming, one user per request in flight. What neither can do (several load
processes holding exactly N requests, the server's in-flight gauges and CPU, TTFT beside
non-streaming throughput) is why ours exists; where they measure the same, they should
agree.

For every round, level and anchor, the anchor and ours in the anchor's mode (streaming
beside vLLM's tool, non-streaming beside locust) run back to back, in alternating order
(ours first in even rounds, the anchor in odd ones), each with clips no run has sent
before: vLLM's multimodal and prefix caches make a repeated clip nearly free. The anchors'
clips are written here as 16-bit WAV (the format ours sends), one per request; vLLM's
ready check and warm-ups are off (`bench serve` has already warmed the server, and a
warm-up would send the first clip twice). All ask for exactly `--out-tokens` tokens
(`ignore_eos`, and `min_tokens` as ours sends it) at temperature 0, one load process each.
Reported per run: requests per second (completed requests over the time from the first
send to the last completion, vLLM's definition), the requests held in flight (Little's
law), TTFT, TPOT (streaming only) and end-to-end latency medians; per level and anchor,
ours over the anchor's. vLLM's benchmark needs pandas for its JSONL reader, and locust
must be installed (both in the `bench` and `dev` extras).
"""

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import make_clip, parse_int_list, wav_bytes, write_json
from .http_load import ChatClient, RequestSpec, base_url, encode_body

PROMPT = "Caption the audio."
STATISTICS = ("request_throughput", "in_flight", "ttft_median_ms", "tpot_median_ms", "e2e_median_ms", "send_burst")
# Sends closer together than this are one burst (send_burst).
BURST_GAP_S = 0.005
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def vllm_command() -> list[str]:
    """vLLM's CLI: its console script when installed, else the module it runs."""
    script = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    return [script] if Path(script).exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def run_logged(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """One tool's run, its output (both streams) in `log_path`; a tool that fails stops the
    comparison."""
    with open(log_path, "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


async def ready_model(args) -> str:
    """Wait until the server answers a warm-up request (a clip of this run's own); the
    model name to send, given or the first of /v1/models."""
    async with ChatClient(args.url, args.api_key, 600.0, args.model_name, seed=args.seed) as client:
        return client.ready_model


def write_vllm_dataset(directory: Path, keys: Sequence[tuple[int, ...]], args) -> Path:
    """One WAV per request and the JSONL that vLLM's `custom_audio` dataset reads."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, key in enumerate(keys):
        path = directory / f"{i:05d}.wav"
        path.write_bytes(wav_bytes(make_clip(args.clip_s, key)))
        rows.append({"prompt": PROMPT, "audio": str(path)})
    dataset = directory / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return dataset


def run_vllm(args, dataset: Path, concurrency: int, out_dir: Path, name: str) -> dict:
    """`vllm bench serve` at one concurrency; its result, in the fields compared here."""
    command = [
        *vllm_command(), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", base_url(args.url), "--model", args.model_name, "--tokenizer", args.tokenizer,
        "--dataset-name", "custom_audio", "--dataset-path", str(dataset), "--enable-multimodal-chat",
        "--disable-shuffle", "--num-prompts", str(args.num_requests), "--max-concurrency", str(concurrency),
        "--custom-output-len", str(args.out_tokens), "--ignore-eos", "--temperature", "0",
        "--extra-body", json.dumps({"min_tokens": args.out_tokens}),
        "--ready-check-timeout-sec", "0", "--num-warmups", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{name}.json",
    ]  # fmt: skip
    env = dict(os.environ, **({"OPENAI_API_KEY": args.api_key} if args.api_key else {}))  # its bearer token
    run_logged(command, out_dir / f"{name}.log", env)
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
        "send_burst": None,  # its result file keeps no send times
    })  # fmt: skip


def write_locust_bodies(directory: Path, keys: Sequence[tuple[int, ...]], args) -> Path:
    """One request body per line, exactly as `bench serve` encodes a non-streaming request."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = directory / "bodies.jsonl"
    with open(bodies, "wb") as out:
        for key in keys:
            spec = RequestSpec(key=key, clip_s=args.clip_s, prompt=PROMPT, max_tokens=args.out_tokens, stream=False,
                               exact_tokens=True)  # fmt: skip
            out.write(encode_body(spec, args.model_name) + b"\n")
    return bodies


def run_locust(args, bodies: Path, concurrency: int, out_dir: Path, name: str) -> dict:
    """Locust, headless, `concurrency` users started at once, until every body is answered;
    its result, in the fields compared here. A failed request is counted, not fatal."""
    record = out_dir / f"{name}.json"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(concurrency),
        "--spawn-rate", str(concurrency), "--host", base_url(args.url), "--only-summary", "--exit-code-on-error", "0",
    ]  # fmt: skip
    env = dict(os.environ, ANCHOR_BODIES=str(bodies), ANCHOR_RECORD=str(record))
    if args.api_key:
        env["ANCHOR_API_KEY"] = args.api_key
    run_logged(command, out_dir / f"{name}.log", env)
    return locust_result(record)


def locust_result(path: Path) -> dict:
    """The fields compared here, from the record the locustfile writes as locust quits
    (locust's own request statistics, the answers' output tokens, every send time and the
    last answer)."""
    record = json.loads(path.read_text())
    ok = record["num_requests"] - record["num_failures"]
    window_s = record["last_answer"] - min(record["send_times"])
    return with_in_flight({
        "requests": record["num_requests"],
        "ok": ok,
        "errors": record["num_failures"],
        "output_tokens": record["output_tokens"],
        "request_throughput": ok / window_s if window_s > 0 else None,
        "ttft_median_ms": None,
        "tpot_median_ms": None,
        "e2e_median_ms": record["median_response_time_ms"],
        "e2e_mean_ms": record["avg_response_time_ms"],
        "send_burst": send_burst(record["send_times"]),
    })  # fmt: skip


def run_ours(args, concurrency: int, seed: int, stream: bool, out_dir: Path, name: str) -> dict:
    """`bench serve` at one concurrency (its own fresh clips, from `seed`)."""
    command = [
        sys.executable, "-m", "mdlserve.benchmarks", "serve", "--url", args.url, "--model-name", args.model_name,
        "--concurrency", str(concurrency), "--request-rate", "", "--num-requests", str(args.num_requests),
        "--clip-s", str(args.clip_s), "--out-tokens", str(args.out_tokens), "--prompt", PROMPT,
        "--seed", str(seed), "--out", str(out_dir / name), *(["--api-key", args.api_key] if args.api_key else []),
        *([] if stream else ["--no-stream"]),
    ]  # fmt: skip
    run_logged(command, out_dir / f"{name}.log")
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
        "send_burst": send_burst([r["start_s"] for r in requests]),
    })  # fmt: skip


def send_burst(send_times: Sequence[float]) -> float | None:
    """With how many requests (itself included) a request was sent, on average: sends less
    than BURST_GAP_S apart form one burst. Near the concurrency when the users re-send in
    step (answers of equal length end in the same engine step and every user sends again at
    once), near 1 when they drift apart. The server prefills a burst's clips together."""
    if not send_times:
        return None
    times = sorted(send_times)
    sizes, size = [], 1
    for earlier, later in zip(times, times[1:]):
        if later - earlier < BURST_GAP_S:
            size += 1
        else:
            sizes.append(size)
            size = 1
    sizes.append(size)
    return sum(size * size for size in sizes) / len(times)


def with_in_flight(run: dict) -> dict:
    """`in_flight`: the requests the tool kept open on average, by Little's law from its own
    figures (throughput times mean latency); below the concurrency when the client was slow
    to send the next request after a completion."""
    rate, latency = run["request_throughput"], run["e2e_mean_ms"]
    return {**run, "in_flight": rate * latency / 1000 if rate is not None and latency is not None else None}


@dataclass(frozen=True)
class Anchor:
    name: str  # its runs' `tool`
    label: str  # its rows in the table
    possessive: str  # "ours / vLLM's"
    stream: bool  # the mode it sends in, and ours beside it
    clip_key: int  # its clips: (seed, clip_key, round, level, request); ours are keyed by `bench serve`
    write_inputs: Callable[[Path, Sequence[tuple[int, ...]], argparse.Namespace], Path]
    run: Callable[[argparse.Namespace, Path, int, Path, str], dict]


ANCHORS = {
    "vllm": Anchor("vllm", "vllm bench serve", "vLLM's", True, 47, write_vllm_dataset, run_vllm),
    "locust": Anchor("locust", "locust", "locust's", False, 48, write_locust_bodies, run_locust),
}


def ratio(ours: float | None, anchor: float | None) -> float | None:
    return ours / anchor if ours is not None and anchor else None


def mean_of(rows: list[dict], field: str) -> float | None:
    values = [r[field] for r in rows]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def compare(runs: list[dict]) -> list[dict]:
    """Per level and anchor: the anchor's mean over its rounds, ours (beside it, in its mode)
    likewise, and ours over the anchor's."""
    levels = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        for name in dict.fromkeys(r["beside"] for r in runs if r["concurrency"] == concurrency):
            rows = [r for r in runs if r["concurrency"] == concurrency and r["beside"] == name]
            means = {tool: {field: mean_of([r for r in rows if r["tool"] == tool], field) for field in STATISTICS}
                     for tool in ("ours", name)}  # fmt: skip
            levels.append({
                "concurrency": concurrency,
                "anchor": name,
                "stream": ANCHORS[name].stream,
                "ours": means["ours"],
                "theirs": means[name],
                "ours_over_theirs": {field: ratio(means["ours"][field], means[name][field]) for field in STATISTICS},
            })  # fmt: skip
    return levels


def markdown(summary: dict) -> str:
    def cell(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| c | tool | req/s by round | req/s | in flight | TTFT p50 ms | TPOT p50 ms | E2E p50 ms "
        "| sent in bursts of |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in summary["levels"]:
        anchor = ANCHORS[level["anchor"]]
        mode = "streaming" if anchor.stream else "non-streaming"
        for tool, label, means in (("ours", f"bench serve, {mode}", level["ours"]),
                                   (anchor.name, anchor.label, level["theirs"])):  # fmt: skip
            rounds = [
                r for r in summary["runs"]
                if (r["concurrency"], r["beside"], r["tool"]) == (level["concurrency"], anchor.name, tool)
            ]  # fmt: skip
            per_round = ", ".join(cell(r["request_throughput"]) for r in rounds)
            lines.append(
                f"| {level['concurrency']} | {label} | {per_round} | {cell(means['request_throughput'])} | "
                f"{cell(means['in_flight'])} | {cell(means['ttft_median_ms'], 1)} | {cell(means['tpot_median_ms'])} | "
                f"{cell(means['e2e_median_ms'], 1)} | {cell(means['send_burst'], 1)} |"
            )
        r = level["ours_over_theirs"]
        lines.append(
            f"| {level['concurrency']} | ours / {anchor.possessive} | | "
            + " | ".join(cell(r[field], 3) for field in STATISTICS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def parse_tools(text: str) -> list[Anchor]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ANCHORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--tools takes a comma list of {', '.join(ANCHORS)}; got {text!r}")
    return [ANCHORS[name] for name in dict.fromkeys(names)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--tokenizer", required=True, help="the checkpoint directory (vLLM's tool counts prompt tokens)")
    p.add_argument("--tools", type=parse_tools, default="vllm,locust", help="the anchors, comma list of vllm, locust")
    p.add_argument("--model-name", default=None, help="the request's `model` (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("MDL_API_KEY"), help="bearer token (default: $MDL_API_KEY)")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop levels, comma list")
    p.add_argument("--num-requests", type=int, default=64, help="requests per run")
    p.add_argument("--clip-s", type=float, default=30.0)
    p.add_argument("--out-tokens", type=int, default=100, help="exact output tokens (ignore_eos)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool per level and anchor, order alternating")
    p.add_argument("--seed", type=int, default=None, help="seed of every tool's clips (default: random per run)")
    p.add_argument("--out", required=True, help="results directory")
    args = p.parse_args(argv)
    levels = parse_int_list(args.concurrency)
    # Checked before any run: a tool given no request would wait for answers forever (locust
    # quits after its last answer), and ours refuses fewer than two requests per user.
    if not levels or min(levels) < 1:
        p.error(f"--concurrency takes levels of at least 1; got {args.concurrency!r}")
    if args.num_requests < 2 * max(levels):
        p.error(f"--num-requests {args.num_requests} is less than twice --concurrency {max(levels)}: "
                "each user needs at least two requests for a throughput window")  # fmt: skip
    if args.rounds < 1 or args.out_tokens < 1:
        p.error("--rounds and --out-tokens take at least 1")
    if args.seed is None:
        args.seed = secrets.randbelow(2**20)  # fresh clips for every run against a server that caches
    args.model_name = asyncio.run(ready_model(args))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for round_index in range(args.rounds):
        for level_index, concurrency in enumerate(levels):
            for anchor_index, anchor in enumerate(args.tools):
                order = ("ours", anchor.name) if round_index % 2 == 0 else (anchor.name, "ours")
                for tool in order:
                    if tool == "ours":
                        name = f"ours-{anchor.name}-c{concurrency}-r{round_index}"
                        seed = args.seed * 100_000 + round_index * 1000 + level_index * 10 + anchor_index
                        result = run_ours(args, concurrency, seed, anchor.stream, out_dir, name)
                    else:
                        name = f"{tool}-c{concurrency}-r{round_index}"
                        clips = out_dir / f"clips-{name}"
                        keys = [(args.seed, anchor.clip_key, round_index, level_index, i)
                                for i in range(args.num_requests)]  # fmt: skip
                        result = anchor.run(args, anchor.write_inputs(clips, keys, args), concurrency, out_dir, name)
                        shutil.rmtree(clips)
                    runs.append({"tool": tool, "beside": anchor.name, "stream": anchor.stream,
                                 "concurrency": concurrency, "round": round_index, **result})  # fmt: skip
                    print(json.dumps(runs[-1]), flush=True)
    summary = {
        "url": args.url,
        "seed": args.seed,
        "clip_s": args.clip_s,
        "out_tokens": args.out_tokens,
        "num_requests": args.num_requests,
        "tools": [anchor.name for anchor in args.tools],
        "runs": runs,
        "levels": compare(runs),
    }
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
