"""The one set of fast CPU engine settings of the test suite.

With FAST_ENV (which tests/conftest.py puts in the environment: no torch.compile, the
engine core in the calling process) and enforce_eager, a tiny engine starts in ~2 s
instead of ~30 s with identical greedy outputs. The same settings in each form a test
needs: vllm.LLM / AsyncEngineArgs keywords, gateway Settings fields, `mdl-serve` flags
(`serve` and `generate` share them) and `vllm serve` flags.
"""

FAST_ENV = {"TORCHDYNAMO_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

FAST_ENGINE_KWARGS = dict(
    dtype="float32",
    max_model_len=2048,
    enforce_eager=True,
    kv_cache_memory_bytes=256 << 20,
)

FAST_SETTINGS = dict(
    dtype=FAST_ENGINE_KWARGS["dtype"],
    max_model_len=FAST_ENGINE_KWARGS["max_model_len"],
    enforce_eager=True,
    kv_cache_bytes=FAST_ENGINE_KWARGS["kv_cache_memory_bytes"],
)

FAST_CLI_FLAGS = [
    "--enforce-eager",
    "--dtype", FAST_SETTINGS["dtype"],
    "--max-model-len", str(FAST_SETTINGS["max_model_len"]),
    "--kv-cache-bytes", str(FAST_SETTINGS["kv_cache_bytes"]),
]  # fmt: skip

# `vllm serve` spells the KV cache size differently.
FAST_VLLM_SERVE_FLAGS = [*FAST_CLI_FLAGS[:-2], "--kv-cache-memory-bytes", FAST_CLI_FLAGS[-1]]
