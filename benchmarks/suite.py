"""The offline modes (throughput, ttft, compare): one worker process per implementation.

The parent never imports torch or vLLM, so it holds no GPU memory; it hands each
worker a share of the time budget, follows its result file for the progress bar, and
merges the rows into one summary. `compare` reports, per row, plugin over built-in
speed-up: samples/s ratio for throughput, built-in / plugin milliseconds for TTFT
(above 1: the plugin is faster in both).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .common import base_summary, series, write_results
from .offline import OfflineWorkload, worker_env

# Seconds a worker may run past its deadline (finishing a point, shutting down) before it is killed.
GRACE_S = 60.0
# Seconds a worker that has written its final result may take to exit (engine shutdown).
EXIT_WAIT_S = 30.0
LOG_TAIL_LINES = 40


def run_worker(work: OfflineWorkload, out_dir: Path, kill_after_s: float | None) -> dict:
    """Run one implementation's worker; return its (possibly partial) result."""
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    result_path = out_dir / "logs" / f"{work.impl}.result.json"
    log_path = logs / f"{work.impl}.log"
    result_path.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump(asdict(work), spec)
    total = len(work.ttft_clip_s) + len(work.batches)
    start = time.time()
    finished_at = None
    with open(log_path, "w") as log, tqdm(total=total, desc=f"{work.impl}", unit="point") as bar:
        # Own process group: stopping the worker also stops vLLM's engine-core process,
        # which would otherwise keep the GPU memory the next implementation needs.
        proc = subprocess.Popen([sys.executable, "-m", "mdlserve.benchmarks.offline", spec.name, str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=worker_env(work.impl),
                                start_new_session=True)  # fmt: skip
        bar.set_postfix_str("starting engine")
        while proc.poll() is None:
            time.sleep(2.0)
            partial = _read(result_path)
            done = len(partial.get("ttft", [])) + len(partial.get("throughput", [])) + _skipped(partial)
            if partial.get("model_class") and bar.postfix != "engine up":
                bar.set_postfix_str("engine up")
            if done > bar.n:
                bar.update(min(done, total) - bar.n)
            if partial.get("done") and finished_at is None:
                finished_at = time.time()
            over_time = kill_after_s is not None and time.time() - start > kill_after_s
            hung_on_exit = finished_at is not None and time.time() - finished_at > EXIT_WAIT_S
            if over_time or hung_on_exit:
                _stop_group(proc)
                break
    _stop_group(proc)  # engine-core leftovers of a worker that exited by itself
    Path(spec.name).unlink(missing_ok=True)
    result = _read(result_path) or {"impl": work.impl, "throughput": [], "ttft": [], "requests": [], "errors": []}
    if not result.get("done"):
        why = "stopped: time budget" if proc.returncode in (-9, -15) else f"worker exited with code {proc.returncode}"
        result.setdefault("errors", []).append({"impl": work.impl, "stage": "worker", "error": why})
    if proc.returncode != 0 or [e for e in result.get("errors", []) if not e["error"].startswith("skipped")]:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print(f"--- {work.impl} worker log tail ({log_path}) ---\n" + "\n".join(tail), file=sys.stderr, flush=True)
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL whatever is left 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        give_up = time.time() + 10.0
        while _group_alive(proc.pid) and time.time() < give_up:
            proc.poll()  # reaps the worker itself, which otherwise keeps the group alive
            time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_for_gpu_memory_release(timeout_s: float = 90.0) -> None:
    """Before an engine starts: wait until the previous worker's GPU memory is back.
    vLLM refuses to start when free memory is below gpu_memory_utilization, and a
    killed process's memory is returned by the driver with some delay."""
    if not shutil.which("nvidia-smi"):
        return
    give_up = time.time() + timeout_s
    while time.time() < give_up:
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total",
                                    "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=30)  # fmt: skip
            used, total = (float(x) for x in query.stdout.splitlines()[0].split(","))
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return
        if used < 0.05 * total:
            return
        time.sleep(2.0)
    print(f"warning: {used:.0f} of {total:.0f} MiB GPU memory still in use", file=sys.stderr, flush=True)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _skipped(result: dict) -> int:
    return sum(1 for e in result.get("errors", []) if e.get("error", "").startswith("skipped"))


def run_offline_suite(mode: str, impls: list[str], template: OfflineWorkload, out_dir: Path,
                      *, preset: str, time_budget_s: float | None) -> dict:  # fmt: skip
    """Run `template` for each implementation in turn; write and return the summary."""
    deadline = time.time() + time_budget_s if time_budget_s else None
    results = []
    for i, impl in enumerate(impls):
        share = (deadline - time.time()) / (len(impls) - i) if deadline else None
        profile_dir = str(Path(template.profile_dir) / impl) if template.profile_dir else None
        deadline_s = time.time() + share if share else None
        work = OfflineWorkload(**{**asdict(template), "engine": template.engine, "impl": impl,
                                  "deadline": deadline_s, "profile_dir": profile_dir})  # fmt: skip
        print(f"== {mode}: {impl} ({'no time limit' if share is None else f'{share:.0f} s budget'})", flush=True)
        wait_for_gpu_memory_release()
        results.append(run_worker(work, out_dir, None if share is None else share + GRACE_S))

    versions: dict = next((r["versions"] for r in results if r.get("versions")), {})
    effective: dict = next((r["engine_effective"] for r in results if r.get("engine_effective")), {})
    summary = base_summary(preset=preset, dtype=effective.get("dtype", template.engine.dtype),
                           quantization=template.engine.quantization,
                           engine_args={**asdict(template.engine), "load_format": template.load_format,
                                        "max_num_seqs": max(template.batches + [1])},
                           versions=versions)  # fmt: skip
    summary.update({
        "mode": mode,
        "workload": {"clip_s": template.clip_s, "out_tokens": template.out_tokens, "batches": template.batches,
                     "ttft_clip_s": template.ttft_clip_s, "ttft_repeats": template.ttft_repeats,
                     "prompt": template.prompt, "seed": template.seed, "time_budget_s": time_budget_s},
        "impls": {r["impl"]: {k: r.get(k) for k in ("model_class", "engine_args", "engine_effective",
                                                    "startup_s", "warmup_s", "profile")} for r in results},
        "throughput": [row for r in results for row in r.get("throughput", [])],
        "ttft": [row for r in results for row in r.get("ttft", [])],
        "errors": [e for r in results for e in r.get("errors", [])],
    })  # fmt: skip
    if len(impls) > 1:
        summary["ratios"] = speedups(summary)
    raw = {"requests": [row for r in results for row in r.get("requests", [])]}
    write_results(out_dir, summary, raw)
    return summary


def speedups(summary: dict) -> list[dict]:
    """Plugin over built-in per matching row; above 1 means the plugin is faster."""
    out = []
    by_batch = {(series(r), r["batch"]): r["samples_per_s"] for r in summary["throughput"]}
    for batch in sorted({b for _, b in by_batch}):
        ours, theirs = by_batch.get(("plugin", batch)), by_batch.get(("builtin", batch))
        out.append({"metric": "samples_per_s", "batch": batch, "plugin": ours, "builtin": theirs,
                    "speedup": ours / theirs if ours and theirs else None})  # fmt: skip
    by_clip = {(series(r), r["clip_s"]): r["median_ms"] for r in summary["ttft"]}
    for clip_s in sorted({c for _, c in by_clip}):
        ours, theirs = by_clip.get(("plugin", clip_s)), by_clip.get(("builtin", clip_s))
        out.append({"metric": "ttft_median_ms", "clip_s": clip_s, "plugin": ours, "builtin": theirs,
                    "speedup": theirs / ours if ours and theirs else None})  # fmt: skip
    return out


def print_table(summary: dict) -> None:
    """Compact stdout table of a finished offline run."""
    from .report import offline_tables

    print(offline_tables(summary) or "no point was measured", flush=True)
    for error in summary.get("errors", []):
        where = ", ".join(f"{k} {error[k]}" for k in ("batch", "clip_s") if k in error)
        print(f"{error['impl']} {error['stage']}{' (' + where + ')' if where else ''}: {error['error']}", flush=True)
