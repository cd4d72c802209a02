"""The gateway's contract as far as deployment depends on it (docs of issue 5), and a small
PromQL scanner that lists the metric names an expression reads."""

import re

from mdlserve.server.settings import Settings

HISTOGRAMS = {
    "mdl_request_duration_seconds", "mdl_ttft_seconds", "mdl_time_to_engine_seconds", "mdl_queue_wait_seconds",
    "mdl_decode_seconds", "mdl_audio_decode_seconds",
}
METRICS = HISTOGRAMS | {
    "mdl_requests_total", "mdl_audio_seconds_total", "mdl_clips_in_flight", "mdl_queue_length",
    "mdl_rejections_total", "mdl_engine_running_requests", "mdl_engine_waiting_requests",
    "mdl_engine_kv_cache_usage_ratio", "mdl_engine_up",
}
SERIES = METRICS | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
REJECTION_REASONS = {"queue_full", "unauthorized", "payload_too_large", "bad_request", "draining", "timeout"}
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEM_COPY_UTIL"}
# Series Prometheus itself provides.
BUILTIN = {"up"}

# `mdl-serve serve` settings as MDL_* variables, from the one settings object (every field
# is one; the CLI-less ones are environment-only).
ENV_VARS = {"MDL_" + name.upper() for name in Settings.model_fields}

_FUNCS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group",
    "count_values", "rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "abs", "clamp_min",
    "clamp_max", "absent", "absent_over_time", "avg_over_time", "max_over_time", "min_over_time",
    "sum_over_time", "label_replace", "vector", "scalar", "time", "round", "ceil", "floor", "changes",
    "resets", "sort", "sort_desc", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names read by a PromQL expression (label matchers, grouping lists, strings,
    ranges and Grafana variables removed first)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)
    words = re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", e)
    return {w for w in words if w not in _FUNCS}


def unknown_metrics(expr: str) -> set[str]:
    return metric_names(expr) - SERIES - DCGM - BUILTIN


def label_values(expr: str, label: str) -> set[str]:
    """Values a selector compares `label` to with = or =~ (alternatives split)."""
    out = set()
    for m in re.finditer(label + r'\s*=~?\s*"([^"]*)"', expr):
        out.update(m.group(1).split("|"))
    return out
