"""PNG plots of a run's summary (matplotlib, Agg backend: no display needed).

throughput.png: samples/s vs batch, per implementation, with the authors' README and
report numbers as reference lines. ttft.png: TTFT vs audio length, with the authors'
reported ranges as bands. serve_latency.png: latency percentiles vs concurrency (closed
loop) and vs request rate (open loop). loadtest_drift.png: latency and error rate over time.
"""

from pathlib import Path

from . import reference
from .common import series

COLORS = {"plugin": "tab:blue", "builtin": "tab:orange"}
PERCENTILES = [("median", "p50"), ("p90", "p90"), ("p99", "p99")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_impl(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(series(r), []).append(r)
    return out


def plot_throughput(summary: dict, path: Path) -> Path | None:
    rows = [r for r in summary.get("throughput", []) if r.get("via", "engine") == "engine"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, impl_rows in _by_impl(rows).items():
        impl_rows.sort(key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in impl_rows], [r["samples_per_s"] for r in impl_rows], "o-",
                color=COLORS.get(impl), label=f"{impl} ({summary.get('gpu')})")  # fmt: skip
    for name, ref, style in (("authors README", reference.README_SAMPLES_PER_S, "k--"),
                             ("authors report", reference.REPORT_SAMPLES_PER_S, "k:")):  # fmt: skip
        ax.plot(list(ref), list(ref.values()), style, alpha=0.6, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (clips processed together)")
    ax.set_ylabel("samples/s")
    ax.set_title(f"Throughput, {rows[0]['clip_s']:g} s clips, {rows[0]['out_tokens_per_clip']} output tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_ttft(summary: dict, path: Path) -> Path | None:
    rows = [r for r in summary.get("ttft", []) if r.get("via", "engine") == "engine"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, impl_rows in _by_impl(rows).items():
        impl_rows.sort(key=lambda r: r["clip_s"])
        x = [r["clip_s"] for r in impl_rows]
        ax.plot(x, [r["median_ms"] for r in impl_rows], "o-", color=COLORS.get(impl), label=f"{impl} median")
        ax.plot(x, [r["p90_ms"] for r in impl_rows], ":", color=COLORS.get(impl), label=f"{impl} p90")
    for (name, (lo, hi)), color in zip(reference.TTFT_RANGE_MS.items(), ("tab:green", "tab:red")):
        ax.axhspan(lo, hi, color=color, alpha=0.15, label=f"authors: {name} {lo:g}–{hi:g} ms")
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token, batch 1")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_serve(summary: dict, path: Path) -> Path | None:
    rows = summary.get("serve", [])
    if not rows:
        return None
    plt = _pyplot()
    modes = [m for m in ("closed", "open") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for axrow, mode in zip(axes, modes):
        level = "concurrency" if mode == "closed" else "request_rate"
        mode_rows = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r[level])
        x = [r[level] for r in mode_rows]
        for ax, metric in zip(axrow, ("ttft_ms", "e2e_ms")):
            for key, label in PERCENTILES:
                ax.plot(x, [r[metric][key] for r in mode_rows], "o-", label=label)
            ax.set_xlabel("concurrency (closed loop)" if mode == "closed" else "request rate (req/s, Poisson)")
            ax.set_ylabel({"ttft_ms": "TTFT (ms)", "e2e_ms": "E2E latency (ms)"}[metric])
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(f"HTTP latency percentiles ({summary.get('target_url', '')})")
    return _save(fig, path)


def plot_loadtest(summary: dict, path: Path) -> Path | None:
    lt = summary.get("loadtest")
    if not lt or not lt["windows"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    windows = lt["windows"]
    x = [w["start_s"] for w in windows]
    for key, label in (("e2e_p50_ms", "E2E p50"), ("e2e_p90_ms", "E2E p90"), ("ttft_p50_ms", "TTFT p50")):
        ax.plot(x, [w[key] for w in windows], "o-", label=label)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    errors = ax.twinx()
    errors.plot(x, [w["error_rate"] for w in windows], "r--", label="error rate")
    errors.set_ylabel("error rate")
    errors.set_ylim(0, 1)
    ax.legend(loc="upper left")
    errors.legend(loc="upper right")
    ax.set_title(f"Load test `{lt['scenario']['name']}`: latency and errors over time")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_all(summary: dict, out_dir: Path) -> list[Path]:
    made = [plot_throughput(summary, out_dir / "throughput.png"), plot_ttft(summary, out_dir / "ttft.png"),
            plot_serve(summary, out_dir / "serve_latency.png"),
            plot_loadtest(summary, out_dir / "loadtest_drift.png")]  # fmt: skip
    return [p for p in made if p is not None]
