"""Offline measurements in one vllm.LLM engine: TTFT at batch 1, then throughput per batch.

Runs as a worker process, one per implementation (`python -m mdlserve.benchmarks.offline
SPEC.json RESULT.json`): plugin registration is process-global, and a fresh process
gives the GPU memory back between implementations. The engine starts once and serves
every point, because an engine start on an H100 takes minutes. The result file is
rewritten after every point, so a worker killed by the time budget or a crash still
leaves what it measured.

Definitions:
- throughput: `batch` fresh clips submitted in one `LLM.generate` call with exactly
  `out_tokens` output tokens each (min_tokens = max_tokens, ignore_eos); wall time of
  that call, which includes audio preprocessing; samples/s = batch / wall.
- TTFT: one fresh clip, `max_tokens=1`; the engine's own per-request metric
  `RequestOutput.metrics.first_token_latency` (vLLM 0.26, populated with
  `disable_log_stats=False`): from the request's arrival (before audio preprocessing)
  to the first output token reaching the frontend. The wall time of the call is
  recorded next to it (`wall_ms`) and stands in only if the metric is missing.
  Each TTFT is split in three from the request's engine-core timestamps (`ttft_parts`):
  `queued` (in the scheduler's queue), `engine_step` (scheduled to the first token's
  output: the prefill step, encoder included) and `frontend` (the rest: preprocessing,
  hashing, the hand-over to the engine core and back, output processing), so that what
  a lone request waits on is known without a profiler.
"""

import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import make_clip, percentile, runtime_versions, write_json

ARCHITECTURE = "MiDashengLMModel"
# VLLM_PLUGINS allowlist per implementation: ours only, or none (vLLM's built-in class).
PLUGIN_ALLOWLIST = {"plugin": "midashenglm", "builtin": "none"}
EXPECTED_MODULE_PREFIX = {"plugin": "mdlserve.", "builtin": "vllm."}
# Key spaces of make_clip, so that no two requests of a run share a clip.
WARMUP_KEY, TTFT_KEY, THROUGHPUT_KEY, PROFILE_KEY = 1, 2, 3, 4


@dataclass
class EngineOptions:
    """The engine flags a run exposes and records; `extra` holds --engine-arg KEY=VALUE."""

    dtype: str = "auto"
    quantization: str | None = None
    max_model_len: int = 1024
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    def llm_kwargs(self) -> dict:
        """Arguments for vllm.LLM: the flags that are set, then `extra` (which wins)."""
        fixed = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        return {**fixed, **self.extra}


@dataclass
class OfflineWorkload:
    impl: str  # "plugin" | "builtin"
    model: str
    load_format: str
    engine: EngineOptions
    batches: list[int]
    clip_s: float
    out_tokens: int
    ttft_clip_s: list[float]
    ttft_repeats: int
    prompt: str
    seed: int
    deadline: float | None = None  # unix time after which no new point starts
    profile_dir: str | None = None  # profile a largest batch and a TTFT request (vLLM's torch profiler)
    # Each point runs once per form: "float32" clips, or "pcm16" (the clip as 16-bit PCM:
    # int16 for our plugin, as the gateway passes a 16-bit WAV; its float32 samples for
    # the built-in, which takes floats only).
    sample_formats: list[str] = field(default_factory=lambda: ["float32"])

    @classmethod
    def from_json(cls, data: dict) -> "OfflineWorkload":
        return cls(**{**data, "engine": EngineOptions(**data["engine"])})


TTFT_PARTS = ("queued", "engine_step", "frontend")


def ttft_parts(metrics) -> dict:
    """A request's TTFT split by its engine-core timestamps (monotonic, one clock): queued to
    scheduled, scheduled to first token, and the frontend's remainder of the TTFT."""
    ttft = getattr(metrics, "first_token_latency", 0.0)
    queued, scheduled, first = (getattr(metrics, k, 0.0) for k in ("queued_ts", "scheduled_ts", "first_token_ts"))
    if not (ttft > 0 and 0 < queued <= scheduled <= first):
        return {}
    return {"queued_ms": (scheduled - queued) * 1000, "engine_step_ms": (first - scheduled) * 1000,
            "frontend_ms": (ttft - (first - queued)) * 1000}  # fmt: skip


def worker_env(impl: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["VLLM_PLUGINS"] = PLUGIN_ALLOWLIST[impl]
    return env


class PinnedHostProbe:
    """Mixed into vLLM's worker (`worker_extension_cls`), so that the bench reads the engine
    process's pinned host allocator by name through `LLM.collective_rpc`. Each time that
    cache grows (cudaHostAlloc), the engine's host thread waits and the GPU can idle."""

    def pinned_host_stats(self) -> dict[str, float]:
        import torch

        if not torch.cuda.is_available():
            return {}
        stats = torch.cuda.host_memory_stats()
        return {"allocs": stats.get("num_host_alloc", 0), "alloc_ms": stats.get("host_alloc_time.total", 0) / 1000,
                "frees": stats.get("num_host_free", 0), "bytes": stats.get("allocated_bytes.current", 0)}  # fmt: skip


def pinned_host_growth(before: dict, after: dict) -> dict:
    """What the engine's pinned host cache grew by between two PinnedHostProbe readings
    (`frees`: cached blocks handed back to CUDA, to be pinned again when next needed)."""
    if not before or not after:
        return {}
    return {"pinned_host_allocs": after["allocs"] - before["allocs"],
            "pinned_host_alloc_ms": after["alloc_ms"] - before["alloc_ms"],
            "pinned_host_frees": after["frees"] - before["frees"],
            "pinned_host_bytes": after["bytes"]}  # fmt: skip


def llm_kwargs(work: OfflineWorkload) -> dict:
    kwargs = {
        "model": work.model,
        "load_format": work.load_format,
        "max_num_seqs": max(work.batches + [1]),
        "seed": work.seed,
        "disable_log_stats": False,  # populates RequestOutput.metrics (TTFT)
        "worker_extension_cls": f"{__name__}.{PinnedHostProbe.__name__}",
    }
    if work.impl == "builtin":
        kwargs["trust_remote_code"] = True  # the built-in loads the checkpoint's processor module
    if work.profile_dir:
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(Path(work.profile_dir).resolve()),
                                     "torch_profiler_with_stack": False}  # fmt: skip
    kwargs.update(work.engine.llm_kwargs())
    if kwargs.get("kv_cache_memory_bytes") is None:
        from mdlserve.server.platform import default_kv_cache_bytes

        if default_kv_cache_bytes() is not None:
            kwargs["kv_cache_memory_bytes"] = default_kv_cache_bytes()
    return kwargs


def loaded_model_class() -> str:
    """'module:Class' that vLLM's registry resolves MiDashengLMModel to in this process."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _LazyRegisteredModel, _RegisteredModel

    entry = ModelRegistry.models[ARCHITECTURE]
    if isinstance(entry, _LazyRegisteredModel):
        return f"{entry.module_name}:{entry.class_name}"
    assert isinstance(entry, _RegisteredModel), type(entry)
    return f"{entry.model_cls.__module__}:{entry.model_cls.__name__}"


def effective_engine_config(llm) -> dict:
    """What the engine actually runs with, including vLLM's defaults."""
    cfg = llm.llm_engine.vllm_config
    fields = {
        "max_num_seqs": lambda: cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": lambda: cfg.scheduler_config.max_num_batched_tokens,
        "max_model_len": lambda: cfg.model_config.max_model_len,
        "dtype": lambda: str(cfg.model_config.dtype).removeprefix("torch."),
        "quantization": lambda: cfg.model_config.quantization,
        "enforce_eager": lambda: cfg.model_config.enforce_eager,
        "gpu_memory_utilization": lambda: cfg.cache_config.gpu_memory_utilization,
        "kv_cache_memory_bytes": lambda: cfg.cache_config.kv_cache_memory_bytes,
        "num_gpu_blocks": lambda: cfg.cache_config.num_gpu_blocks,
        "enable_prefix_caching": lambda: cfg.cache_config.enable_prefix_caching,
    }
    out = {}
    for name, get in fields.items():
        try:
            value = get()
            out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        except AttributeError:
            continue
    return out


class OfflineRunner:
    def __init__(self, work: OfflineWorkload, result_path: Path):
        self.work = work
        self.result_path = result_path
        self.result: dict[str, Any] = {"impl": work.impl, "versions": {}, "model_class": None, "engine_args": {},
                       "engine_effective": {}, "throughput": [], "ttft": [], "requests": [],
                       "errors": [], "done": False}  # fmt: skip

    def save(self) -> None:
        write_json(self.result_path, self.result)

    def log(self, message: str) -> None:
        print(f"[{self.work.impl}] {message}", flush=True)

    def out_of_time(self, estimate_s: float = 0.0) -> bool:
        return self.work.deadline is not None and time.time() + estimate_s > self.work.deadline

    def skip(self, stage: str, point: dict) -> None:
        self.result["errors"].append({"impl": self.work.impl, "stage": stage, **point, "error": "skipped: time budget"})

    # ------------------------------------------------------------ engine

    def start_engine(self):
        import torch
        from vllm import LLM

        from mdlserve.model_plugin.model import limit_host_threads

        kwargs = llm_kwargs(self.work)
        self.result["engine_args"] = kwargs
        # As the gateway and the batch job do: both implementations run under the same rule.
        limit_host_threads("cuda" if torch.cuda.is_available() else "cpu")
        start = time.perf_counter()
        llm = LLM(**kwargs)
        self.result["startup_s"] = time.perf_counter() - start
        self.result["versions"] = runtime_versions()
        self.result["model_class"] = loaded_model_class()
        self.result["engine_effective"] = effective_engine_config(llm)
        self.result["engine_effective"]["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        self.result["pinned_host_after_start"] = self.pinned_host_stats(llm)
        if not self.result["model_class"].startswith(EXPECTED_MODULE_PREFIX[self.work.impl]):
            raise RuntimeError(f"{self.work.impl} run resolved {ARCHITECTURE} to {self.result['model_class']}; "
                               f"check VLLM_PLUGINS and that midashenglm-serve is installed")  # fmt: skip
        tokenizer = llm.get_tokenizer()
        conversation = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "clip"}},
                                                     {"type": "text", "text": self.work.prompt}]}]  # fmt: skip
        self.prompt_text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        self.log(f"engine up in {self.result['startup_s']:.1f} s, model class {self.result['model_class']}")
        self.save()
        return llm

    def prompts(self, seconds: float, keys: list[tuple[int, ...]], sample_format: str = "float32") -> list[dict]:
        return [{"prompt": self.prompt_text,
                 "multi_modal_data": {"audio": self.clip(seconds, (self.work.seed, *k), sample_format)}}
                for k in keys]  # fmt: skip

    def clip(self, seconds: float, key: tuple[int, ...], sample_format: str) -> np.ndarray:
        clip = make_clip(seconds, key)
        if sample_format == "float32":
            return clip
        from mdlserve.model_plugin.processing import float_samples  # transformers: only in the worker

        pcm = np.round(np.clip(clip, -1.0, 1.0) * 32767).astype(np.int16)
        return pcm if self.work.impl == "plugin" else float_samples(pcm)

    @staticmethod
    def sampling(out_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=out_tokens, min_tokens=out_tokens, ignore_eos=True, temperature=0.0)

    @staticmethod
    def pinned_host_stats(llm) -> dict:
        (stats,) = llm.collective_rpc(PinnedHostProbe.pinned_host_stats.__name__)
        return stats

    # ------------------------------------------------------------ measurements

    def warm_up(self, llm) -> None:
        """Compiles kernels and fills allocator pools before anything is timed: a single
        clip, a small batch, then the largest batch (fresh clips, at most 16 output tokens).
        Without the last, the first measured batch of that size paid for growing the
        allocator's pools and ran up to 18 samples/s slower than the second in four of five
        H200 runs with 512 clips (benchmarks/results/2026-12-01-h200-levers)."""
        seconds = self.work.clip_s if self.work.batches else max(self.work.ttft_clip_s)
        largest = max(self.work.batches + [1])
        start = time.perf_counter()
        for batch in sorted({1, min(largest, 8), largest}):
            llm.generate(self.prompts(seconds, [(WARMUP_KEY, batch, i) for i in range(batch)]),
                         self.sampling(min(self.work.out_tokens, 16)), use_tqdm=False)  # fmt: skip
        self.result["warmup_s"] = time.perf_counter() - start
        self.result["pinned_host_after_warmup"] = self.pinned_host_stats(llm)

    def measure_ttft(self, llm) -> None:
        for seconds, (form, sample_format) in itertools.product(
            self.work.ttft_clip_s, enumerate(self.work.sample_formats)
        ):
            if self.out_of_time():
                self.skip("ttft", {"clip_s": seconds, "sample_format": sample_format})
                continue
            samples = []
            for rep in range(self.work.ttft_repeats + 1):  # repetition 0 warms this length up
                key = (TTFT_KEY, int(seconds * 1000), form, rep)
                start = time.perf_counter()
                (out,) = llm.generate(self.prompts(seconds, [key], sample_format), self.sampling(1), use_tqdm=False)
                wall_ms = (time.perf_counter() - start) * 1000
                metric = getattr(out.metrics, "first_token_latency", None)
                row = {"kind": "ttft", "impl": self.work.impl, "sample_format": sample_format, "clip_s": seconds,
                       "repeat": rep, "warmup": rep == 0, "prompt_tokens": len(out.prompt_token_ids),
                       "ttft_ms": metric * 1000 if metric else wall_ms, "wall_ms": wall_ms,
                       "ttft_source": "engine_metrics" if metric else "wall",
                       **ttft_parts(out.metrics)}  # fmt: skip
                self.result["requests"].append(row)
                if rep:
                    samples.append(row)
            ttfts = [r["ttft_ms"] for r in samples]
            self.result["ttft"].append({
                "impl": self.work.impl, "sample_format": sample_format, "via": "engine", "clip_s": seconds,
                "n": len(ttfts),
                "median_ms": percentile(ttfts, 50), "p90_ms": percentile(ttfts, 90),
                "wall_median_ms": percentile([r["wall_ms"] for r in samples], 50),
                **{f"{part}_median_ms": percentile([r[f"{part}_ms"] for r in samples if f"{part}_ms" in r], 50)
                   for part in TTFT_PARTS},
                "prompt_tokens": samples[0]["prompt_tokens"] if samples else None,
                "ttft_source": samples[0]["ttft_source"] if samples else None,
            })  # fmt: skip
            self.log(f"ttft {seconds:g} s {sample_format}: median {self.result['ttft'][-1]['median_ms']:.1f} ms")
            self.save()

    def measure_throughput(self, llm) -> None:
        clip_s, out_tokens = self.work.clip_s, self.work.out_tokens
        samples_per_s = None
        pinned_before = self.pinned_host_stats(llm)
        points = itertools.product(enumerate(self.work.batches), enumerate(self.work.sample_formats))
        for (point, batch), (form, sample_format) in points:
            estimate = batch / samples_per_s if samples_per_s else 0.0
            if self.out_of_time(estimate):
                self.skip("throughput", {"batch": batch, "sample_format": sample_format})
                continue
            # the point's index is in the key: a batch size listed twice gets fresh clips
            keys: list[tuple[int, ...]] = [(THROUGHPUT_KEY, point, form, batch, i) for i in range(batch)]
            prompts = self.prompts(clip_s, keys, sample_format)
            start = time.perf_counter()
            outs = llm.generate(prompts, self.sampling(out_tokens), use_tqdm=False)
            wall = time.perf_counter() - start
            del prompts
            produced = [len(o.outputs[0].token_ids) for o in outs]
            samples_per_s = batch / wall
            for o, n in zip(outs, produced):
                first = getattr(o.metrics, "first_token_latency", None)
                self.result["requests"].append({
                    "kind": "throughput", "impl": self.work.impl, "batch": batch,
                    "prompt_tokens": len(o.prompt_token_ids), "output_tokens": n,
                    "ttft_ms": first * 1000 if first else None,
                })  # fmt: skip
            pinned = pinned_host_growth(pinned_before, pinned_before := self.pinned_host_stats(llm))
            self.result["throughput"].append({
                "impl": self.work.impl, "sample_format": sample_format, "via": "engine", "batch": batch,
                "clip_s": clip_s,
                "out_tokens_per_clip": out_tokens, "samples_per_s": samples_per_s, "wall_s": wall,
                "output_tokens": sum(produced), "output_tokens_per_s": sum(produced) / wall,
                "prompt_tokens_per_clip": sum(len(o.prompt_token_ids) for o in outs) / batch,
                **pinned,
            })  # fmt: skip
            grown = f", pinned host cache +{pinned['pinned_host_allocs']} blocks" if pinned else ""
            self.log(f"batch {batch} {sample_format}: {samples_per_s:.2f} samples/s ({wall:.1f} s){grown}")
            self.save()

    def profile(self, llm) -> None:
        """Under vLLM's torch profiler (traces and kernel tables go to `profile_dir`): one
        more fresh batch of the largest size, then one fresh clip with a single output token
        (the TTFT path). Profiling slows both, so they are recorded apart from the rows."""
        batch = max(self.work.batches)
        runs = {f"batch{batch}": (batch, self.work.out_tokens), "ttft": (1, 1)}
        self.result["profile"] = {"dir": self.work.profile_dir}
        for run, (name, (size, out_tokens)) in enumerate(runs.items()):
            prompts = self.prompts(self.work.clip_s, [(PROFILE_KEY, run, size, i) for i in range(size)])
            llm.start_profile(profile_prefix=name)
            start = time.perf_counter()
            llm.generate(prompts, self.sampling(out_tokens), use_tqdm=False)
            wall = time.perf_counter() - start
            llm.stop_profile()
            self.result["profile"][name] = {"batch": size, "out_tokens": out_tokens, "wall_s": wall}
            self.log(f"profiled {name}: {wall:.2f} s")
            self.save()

    def run(self) -> None:
        stage = "startup"
        try:
            llm = self.start_engine()
            stage = "warmup"
            self.warm_up(llm)
            stage = "ttft"
            self.measure_ttft(llm)
            stage = "throughput"
            self.measure_throughput(llm)
            if self.work.profile_dir and self.work.batches:
                stage = "profile"
                self.profile(llm)
        except Exception as exc:  # record and stop: after a CUDA error the engine is unreliable
            traceback.print_exc()
            self.result["errors"].append({"impl": self.work.impl, "stage": stage,
                                          "error": f"{type(exc).__name__}: {exc}"[:2000]})  # fmt: skip
        self.result["done"] = True
        self.save()


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    work = OfflineWorkload.from_json(json.loads(spec_path.read_text()))
    runner = OfflineRunner(work, result_path)
    runner.run()
    return 1 if runner.result["errors"] and not (runner.result["throughput"] or runner.result["ttft"]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
