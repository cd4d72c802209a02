"""summary.md: a run's summary.json as Markdown tables (also the compact stdout table)."""

import json

from . import reference
from .common import series
from .offline import TTFT_PARTS

IMPL_ORDER = ["plugin", "builtin"]


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _impls(rows: list[dict]) -> list[str]:
    present = {series(r) for r in rows}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def throughput_table(summary: dict) -> str:
    rows = [r for r in summary.get("throughput", []) if r.get("via", "engine") == "engine"]
    if not rows:
        return ""
    impls = _impls(rows)
    value = {(series(r), r["batch"]): r for r in rows}
    header = ["batch"] + [f"{i} samples/s" for i in impls] + [f"{i} out tok/s" for i in impls]
    if len(impls) == 2:
        header.append(f"{impls[0]}/{impls[1]}")
    header += ["authors README", "authors report"]
    table = []
    for batch in sorted({r["batch"] for r in rows}):
        sps = [value.get((i, batch), {}).get("samples_per_s") for i in impls]
        line = [batch] + sps + [value.get((i, batch), {}).get("output_tokens_per_s") for i in impls]
        if len(impls) == 2:
            line.append(sps[0] / sps[1] if sps[0] and sps[1] else None)
        line += [reference.README_SAMPLES_PER_S.get(batch), reference.REPORT_SAMPLES_PER_S.get(batch)]
        table.append(line)
    first = rows[0]
    return (f"### Throughput ({first['clip_s']:g} s clips, {first['out_tokens_per_clip']} output tokens each)\n\n"
            + _table(header, table))  # fmt: skip


def ttft_table(summary: dict) -> str:
    rows = [r for r in summary.get("ttft", []) if r.get("via", "engine") == "engine"]
    if not rows:
        return ""
    impls = _impls(rows)
    value = {(series(r), r["clip_s"]): r for r in rows}
    header = ["clip s"] + [f"{i} {p} ms" for i in impls for p in ("median", "p90")]
    if len(impls) == 2:
        header.append(f"{impls[1]}/{impls[0]} median")
    # The median TTFT's parts (benchmarks/offline.py, `ttft_parts`), where recorded.
    parts = [f"{i} {p} ms" for i in impls for p in TTFT_PARTS]
    with_parts = any(r.get("engine_step_median_ms") is not None for r in rows)
    header += parts if with_parts else []
    table = []
    for clip_s in sorted({r["clip_s"] for r in rows}):
        line = [clip_s] + [value.get((i, clip_s), {}).get(k) for i in impls for k in ("median_ms", "p90_ms")]
        if len(impls) == 2:
            a, b = line[1], line[3]
            line.append(b / a if a and b else None)
        if with_parts:
            line += [value.get((i, clip_s), {}).get(f"{k}_median_ms") for i in impls for k in TTFT_PARTS]
        table.append(line)
    lo, hi = reference.TTFT_RANGE_MS["MiDashengLM"]
    return (f"### TTFT at batch 1 (authors' figure: MiDashengLM {lo:g}–{hi:g} ms over 2–32 s)\n\n"
            + _table(header, table))  # fmt: skip


def offline_tables(summary: dict) -> str:
    return "\n\n".join(t for t in (throughput_table(summary), ttft_table(summary)) if t)


def serve_table(summary: dict) -> str:
    rows = summary.get("serve", [])
    if not rows:
        return ""
    header = ["mode", "level", "procs", "requests", "ok", "errors", "window s", "req/s", "total req/s",
              "steady req/s", "Little req/s", "client in flight", "out tok/s",
              "TTFT p50/p90/p99 ms", "first token p50 ms", "TPOT p50 ms", "ITL p50 ms", "E2E p50/p90/p99 ms",
              "gateway in flight",
              "engine running", "engine waiting", "gateway → engine / TTFT ms", "loadgen cores",
              "API ms/req (+children)"]  # fmt: skip
    table = []
    for r in rows:
        level = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['request_rate']:g} req/s"
        gauges = r.get("server_in_flight") or {}
        api = r.get("api_cpu") or {}
        api_ms = f"{_fmt(api['cpu_ms_per_request'])} ({_fmt(api['with_children_cpu_ms_per_request'])})" if api else "–"
        table.append([r["mode"], level, r.get("processes", 1), r["requests"], r["ok"], _errors(r["errors"]),
                      r.get("window_s"), r["request_throughput"], r.get("total_request_throughput"),
                      r.get("steady_request_throughput"), r.get("littles_law_throughput"), r.get("mean_in_flight"),
                      r["output_tokens_per_s"],
                      _pcts(r["ttft_ms"]), (r.get("first_token_ms") or {}).get("median"), r["tpot_ms"]["median"],
                      r["itl_ms"]["median"], _pcts(r["e2e_ms"]),
                      _gauge(gauges, "mdl_clips_in_flight"),
                      _gauge(gauges, "vllm:num_requests_running", "mdl_engine_running_requests"),
                      _gauge(gauges, "vllm:num_requests_waiting", "mdl_engine_waiting_requests"),
                      _stages(r.get("server_stage_ms") or {}), (r.get("loadgen_cpu") or {}).get("cores"),
                      api_ms])  # fmt: skip
    return "### HTTP load\n\n" + _table(header, table)


def _stages(stages: dict) -> str:
    if not stages:
        return "–"
    return f"{_fmt(stages.get('time_to_engine'))} / {_fmt(stages.get('ttft'))}"


def _gauge(gauges: dict, *names: str) -> str:
    """median (min–max) of the first of `names` that the server reported during the window."""
    for name in names:
        if name in gauges:
            g = gauges[name]
            return f"{_fmt(g['median'], 0)} ({_fmt(g['min'], 0)}–{_fmt(g['max'], 0)})"
    return "–"


def loadtest_section(summary: dict) -> str:
    lt = summary.get("loadtest")
    if not lt:
        return ""
    o = lt["overall"]
    parts = [f"### Load test `{lt['scenario']['name']}` ({lt['duration_s']:.0f} s)\n",
             _table(["requests", "ok", "error rate", "errors", "req/s", "TTFT p50/p90/p99 ms", "E2E p50/p90/p99 ms"],
                    [[o["requests"], o["ok"], o["error_rate"], _errors(o["errors"]), o["request_throughput"],
                      _pcts(o["ttft_ms"]), _pcts(o["e2e_ms"])]])]  # fmt: skip
    d = lt["drift"]
    parts.append(f"\nDrift over steady state: E2E p50 {_fmt(d['e2e_p50_first_ms'], 0)} -> "
                 f"{_fmt(d['e2e_p50_last_ms'], 0)} ms (x{_fmt(d['e2e_p50_ratio'])}), "
                 f"error rate {_fmt(d['error_rate_first'], 3)} -> {_fmt(d['error_rate_last'], 3)}\n")  # fmt: skip
    parts.append(_table(["window start s", "requests", "error rate", "TTFT p50 ms", "E2E p50 ms", "E2E p90 ms"],
                        [[w["start_s"], w["requests"], w["error_rate"], w["ttft_p50_ms"], w["e2e_p50_ms"],
                          w["e2e_p90_ms"]] for w in lt["windows"]]))  # fmt: skip
    return "\n".join(parts)


def _pcts(stats: dict) -> str:
    return "/".join(_fmt(stats[k], 0) for k in ("median", "p90", "p99"))


def _errors(errors: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"


def markdown(summary: dict) -> str:
    meta = [[k, summary.get(k)] for k in ("gpu", "vllm", "torch", "commit", "date", "preset", "dtype", "quantization")]
    parts = [f"## Benchmark `{summary.get('mode', '?')}` on {summary.get('gpu')}", _table(["", ""], meta),
             "Engine arguments: `" + json.dumps(summary.get("engine_args", {}), sort_keys=True) + "`"]  # fmt: skip
    impls = summary.get("impls") or {}
    for impl, info in impls.items():
        parts.append(f"- {impl}: `{info.get('model_class')}`, engine start {_fmt(info.get('startup_s'), 1)} s")
    parts += [s for s in (offline_tables(summary), serve_table(summary), loadtest_section(summary)) if s]
    errors = summary.get("errors") or []
    if errors:
        parts.append("### Errors and skipped points\n\n" + "\n".join(f"- `{json.dumps(e)}`" for e in errors))
    return "\n\n".join(parts) + "\n"
