"""Shared pieces of every benchmark mode: run metadata, fresh clips, statistics, result files.

Result layout (stable; the README, plots and other tools read it): a run directory with
`summary.json`, `raw.json` (per-request data), `summary.md` and PNG plots.
"""

import datetime as _dt
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECKPOINT_CACHE = Path(os.environ.get("MDL_BENCH_CHECKPOINTS", Path.home() / ".cache" / "midashenglm-serve"))


# ---------------------------------------------------------------- clips


def make_clip(seconds: float, key: tuple[int, ...]) -> np.ndarray:
    """A 16 kHz float32 clip (a random tone over noise) that depends only on `key`.

    Every request of a run gets its own key, so no clip repeats: vLLM's prefix and
    multimodal caches would otherwise skip the audio encoder and flatter the numbers.
    """
    rng = np.random.default_rng([abs(int(k)) for k in key])
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    tone = 0.2 * np.sin(2 * np.pi * rng.uniform(100.0, 4000.0) * t, dtype=np.float32)
    return (tone + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


def series(row: dict) -> str:
    """An offline row's series in tables and plots: its implementation, and the form of its
    clips where that is not float32 ("plugin pcm16")."""
    form = row.get("sample_format", "float32")
    return row["impl"] if form == "float32" else f"{row['impl']} {form}"


def wav_bytes(clip: np.ndarray) -> bytes:
    """16-bit PCM WAV, what HTTP clients send."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.clip(clip, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------- statistics


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


def latency_stats(values) -> dict:
    """mean/median/p90/p99 of a list of milliseconds (None when empty)."""
    values = [v for v in values if v is not None]
    mean = float(np.mean(values)) if values else None
    return {"n": len(values), "mean": mean, "median": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}  # fmt: skip


def round_floats(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    return obj


# ---------------------------------------------------------------- argument parsing


def parse_int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; '' -> []."""
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def parse_seconds_list(text: str) -> list[float]:
    """'2:32:2' (inclusive range) or '2,4.5,8' -> seconds; '' -> []."""
    text = text.replace(" ", "")
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        return [round(start + i * step, 6) for i in range(n)]
    return [float(x) for x in text.split(",") if x]


def parse_engine_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE parsed as JSON when it is JSON ('true', '8192', '{"a": 1}'),
    else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


# ---------------------------------------------------------------- metadata


def git_commit() -> str:
    repo = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_name_without_cuda_context() -> str:
    """GPU name from nvidia-smi, for naming a run before any worker starts. The parent of
    the engine workers must not create a CUDA context: it would hold GPU memory all run."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return "gpu"
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "cpu"


def runtime_versions() -> dict:
    """GPU name and library versions of this process (creates a CUDA context on GPUs)."""
    info = {"gpu": "cpu", "vllm": "unknown", "torch": "unknown"}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


def base_summary(*, preset: str, dtype: str, quantization: str | None, engine_args: dict, versions: dict) -> dict:
    return {
        "gpu": versions.get("gpu", "cpu"),
        "vllm": versions.get("vllm", "unknown"),
        "torch": versions.get("torch", "unknown"),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "preset": preset,
        "dtype": dtype,
        "quantization": quantization,
        "engine_args": engine_args,
        "throughput": [],
        "ttft": [],
    }


def preset_of(model_dir: str | Path) -> str:
    """'tiny' or '7b' when the checkpoint has a preset's decoder shape, else 'custom'."""
    from mdlserve.model_plugin.checkpoints import PRESETS

    try:
        text_config = json.loads((Path(model_dir) / "config.json").read_text())["text_config"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "custom"
    for name, preset in PRESETS.items():
        if all(text_config.get(k) == v for k, v in preset.decoder.items()):
            return name
    return "custom"


def generated_checkpoint(preset: str) -> str:
    """Path of a generated checkpoint of `preset` in the cache, written if missing."""
    out = CHECKPOINT_CACHE / preset
    if not (out / "config.json").exists():
        from mdlserve.model_plugin.checkpoints import make_checkpoint

        print(f"writing the {preset} checkpoint to {out}", flush=True)
        make_checkpoint(preset, out)
    return str(out)


# ---------------------------------------------------------------- result files


def run_dir(out: str | None, run_name: str | None, mode: str, gpu: str) -> Path:
    """--out DIR wins; else benchmarks/results/<run-name>, default <date>-<gpu>-<mode>."""
    if out:
        path = Path(out)
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "cpu"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / (run_name or f"{stamp}-{slug}-{mode}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(round_floats(data), indent=2) + "\n")
    tmp.replace(path)


def write_results(out_dir: Path, summary: dict, raw: dict) -> list[Path]:
    """summary.json, raw.json, summary.md and the plots that the summary has data for."""
    from . import plots, report

    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "raw.json", raw)
    (out_dir / "summary.md").write_text(report.markdown(summary))
    return [out_dir / "summary.json", out_dir / "raw.json", out_dir / "summary.md", *plots.plot_all(summary, out_dir)]
