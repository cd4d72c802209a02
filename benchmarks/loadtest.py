"""Scenario load tests and soak runs against a URL (local, or a Kubernetes service).

A scenario (YAML, see scenarios/mixed-traffic.yaml) describes realistic traffic: a
weighted mix of clip lengths and prompt kinds, the share of streamed requests, a
steady-state Poisson request rate reached by a linear ramp-up, and a duration. The run
is split into time windows; the drift report compares the first and last steady-state
windows (after ramp-up), which is what a soak run is for: latency that creeps up or
errors that appear only after a while.
"""

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from .common import base_summary, run_dir, write_results
from .http_load import ChatClient, RequestSpec, base_url, client_versions, summarize
from .report import loadtest_section

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
LOADTEST_KEY = 21
# --smoke: seconds of traffic, clip lengths and tokens small enough for a CPU server.
SMOKE_OVERRIDES = dict(duration_s=6.0, ramp_up_s=2.0, request_rate=2.0, max_tokens=8)
SMOKE_MAX_CLIP_S = 4.0


@dataclass
class Scenario:
    name: str
    duration_s: float
    request_rate: float
    clips: list[dict]  # {min_s, max_s, weight}
    prompts: list[dict]  # {kind, weight, texts}
    ramp_up_s: float = 0.0
    stream_share: float = 1.0
    max_tokens: int = 200
    exact_tokens: bool = False
    description: str = ""

    @classmethod
    def load(cls, name_or_path: str) -> "Scenario":
        path = Path(name_or_path)
        if not path.exists():
            path = SCENARIO_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
        data = yaml.safe_load(path.read_text())
        scenario = cls(**data)
        scenario.validate()
        return scenario

    def validate(self) -> None:
        if self.duration_s <= 0 or self.request_rate <= 0 or not 0 <= self.stream_share <= 1:
            raise ValueError(f"scenario {self.name}: duration_s and request_rate must be > 0, stream_share in [0, 1]")
        for c in self.clips:
            if not 0 < c["min_s"] <= c["max_s"] or c["weight"] <= 0:
                raise ValueError(f"scenario {self.name}: bad clip bucket {c}")
        for p in self.prompts:
            if not p["texts"] or p["weight"] <= 0:
                raise ValueError(f"scenario {self.name}: bad prompt kind {p}")

    def smoke(self) -> "Scenario":
        clips = [{**c, "min_s": min(c["min_s"], SMOKE_MAX_CLIP_S), "max_s": min(c["max_s"], SMOKE_MAX_CLIP_S)}
                 for c in self.clips]  # fmt: skip
        return Scenario(**{**asdict(self), **SMOKE_OVERRIDES, "clips": clips})

    def rate_at(self, t: float) -> float:
        return self.request_rate * (min(1.0, t / self.ramp_up_s) if self.ramp_up_s > 0 else 1.0)

    def arrivals(self, rng: np.random.Generator) -> list[float]:
        """Poisson arrival times whose rate ramps up linearly (thinning of a rate-R process)."""
        times: list[float] = []
        t = 0.0
        while True:
            t += rng.exponential(1.0 / self.request_rate)
            if t >= self.duration_s:
                return times
            if rng.random() < self.rate_at(t) / self.request_rate:
                times.append(t)

    def requests(self, seed: int) -> list[tuple[float, RequestSpec]]:
        rng = np.random.default_rng([seed, LOADTEST_KEY])
        clip_weights = np.array([c["weight"] for c in self.clips], dtype=float)
        prompt_weights = np.array([p["weight"] for p in self.prompts], dtype=float)
        out = []
        for i, at in enumerate(self.arrivals(rng)):
            bucket = self.clips[rng.choice(len(self.clips), p=clip_weights / clip_weights.sum())]
            kind = self.prompts[rng.choice(len(self.prompts), p=prompt_weights / prompt_weights.sum())]
            out.append((at, RequestSpec(
                key=(seed, LOADTEST_KEY, i), clip_s=round(float(rng.uniform(bucket["min_s"], bucket["max_s"])), 2),
                prompt=kind["texts"][rng.integers(len(kind["texts"]))], max_tokens=self.max_tokens,
                stream=bool(rng.random() < self.stream_share), exact_tokens=self.exact_tokens,
                prompt_kind=kind["kind"],
            )))  # fmt: skip
        return out


async def _run(scenario: Scenario, args) -> tuple[list, float, str | None]:
    planned = scenario.requests(args.seed)
    async with ChatClient(args.url, args.api_key, args.timeout_s, args.model_name, args.ready_timeout_s) as client:
        start = time.perf_counter()
        with tqdm(total=len(planned), desc=f"{scenario.name} ({scenario.duration_s:g} s)", unit="req",
                  mininterval=5.0) as bar:  # fmt: skip
            errors = 0

            async def one(spec: RequestSpec):
                nonlocal errors
                result = await client.send(spec, start)
                errors += not result.ok
                bar.set_postfix_str(f"errors {errors}", refresh=False)
                bar.update(1)
                return result

            tasks = []
            for at, spec in planned:
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(spec)))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start, client.model


def windows(results: list, duration_s: float, window_s: float) -> list[dict]:
    """Rows of `window_s` by request start. The last row also takes requests that started
    after the scenario's end: planned inside it, sent late by a busy load generator."""
    out = []
    starts = np.arange(0.0, duration_s, window_s)
    for start in starts:
        end = start + window_s if start < starts[-1] else float("inf")
        inside = [r for r in results if start <= r.start_s < end]
        ok = [r for r in inside if r.ok]
        e2e = [r.e2e_ms for r in ok]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        out.append({
            "start_s": float(start), "requests": len(inside), "ok": len(ok),
            "error_rate": (len(inside) - len(ok)) / len(inside) if inside else 0.0,
            "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else None,
            "e2e_p50_ms": float(np.percentile(e2e, 50)) if e2e else None,
            "e2e_p90_ms": float(np.percentile(e2e, 90)) if e2e else None,
        })  # fmt: skip
    return out


DRIFT_KEYS = ("e2e_p50_first_ms", "e2e_p50_last_ms", "e2e_p50_ratio", "ttft_p50_ratio", "e2e_p50_slope_ms_per_min",
              "error_rate_first", "error_rate_last")  # fmt: skip


def drift(window_rows: list[dict], ramp_up_s: float) -> dict:
    """First vs last steady-state window, and the E2E median's linear trend."""
    steady = [w for w in window_rows if w["start_s"] >= ramp_up_s and w["e2e_p50_ms"] is not None]
    if not steady:
        steady = [w for w in window_rows if w["e2e_p50_ms"] is not None]
    if not steady:
        return dict.fromkeys(DRIFT_KEYS)
    first, last = steady[0], steady[-1]
    slope = (float(np.polyfit([w["start_s"] for w in steady], [w["e2e_p50_ms"] for w in steady], 1)[0]) * 60
             if len(steady) > 1 else 0.0)  # fmt: skip
    ttft_ratio = (last["ttft_p50_ms"] / first["ttft_p50_ms"]
                  if first["ttft_p50_ms"] and last["ttft_p50_ms"] else None)  # fmt: skip
    return {"e2e_p50_first_ms": first["e2e_p50_ms"], "e2e_p50_last_ms": last["e2e_p50_ms"],
            "e2e_p50_ratio": last["e2e_p50_ms"] / first["e2e_p50_ms"], "ttft_p50_ratio": ttft_ratio,
            "e2e_p50_slope_ms_per_min": slope, "error_rate_first": first["error_rate"],
            "error_rate_last": last["error_rate"]}  # fmt: skip


def run_loadtest(args) -> dict:
    scenario = Scenario.load(args.scenario)
    if args.smoke:
        scenario = scenario.smoke()
    if args.duration_s:
        scenario.duration_s = args.duration_s
    window_s = args.window_s or (2.0 if args.smoke else max(5.0, scenario.duration_s / 10))
    results, elapsed, model = asyncio.run(_run(scenario, args))
    window_rows = windows(results, scenario.duration_s, window_s)
    kinds = sorted({r.prompt_kind for r in results})
    summary = base_summary(preset="remote", dtype="unknown", quantization=None, engine_args={},
                           versions=client_versions())  # fmt: skip
    summary.update(mode=args.bench_mode, target_url=base_url(args.url), model_name=model, loadtest={
        "scenario": asdict(scenario), "duration_s": elapsed, "window_s": window_s,
        "overall": summarize(results, elapsed),
        "by_prompt_kind": {k: summarize([r for r in results if r.prompt_kind == k], elapsed) for k in kinds},
        "by_stream": {str(s).lower(): summarize([r for r in results if r.stream == s], elapsed) for s in (True, False)},
        "windows": window_rows,
        "drift": drift(window_rows, scenario.ramp_up_s),
    })  # fmt: skip
    out_dir = run_dir(args.out, args.run_name, args.bench_mode, summary["gpu"])
    write_results(out_dir, summary, {"requests": [r.raw() for r in results]})
    print(loadtest_section(summary))
    print(f"results: {out_dir}")
    return summary
