"""Defaults that depend on the machine vLLM runs on."""


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def default_kv_cache_bytes() -> int | None:
    """vLLM's CPU backend refuses to start without an explicit KV cache size; GPUs size it
    from gpu_memory_utilization instead."""
    return 1 << 30 if is_cpu_build() else None
