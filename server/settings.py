"""The gateway's one typed configuration object.

Every field is settable by environment variable `MDL_<FIELD_IN_UPPER_SNAKE>` and, unless
marked `cli=False`, by the `mdl-serve serve --<field-in-kebab-case>` flag (flags win over
the environment). Defaults that depend on other fields (audio duration limit, decode
workers) are filled in after validation so the running server always sees concrete values.
"""

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20
# Tokens kept free for the text prompt (system prompt, question) and the answer when
# deriving the default audio duration limit from the context length.
RESERVED_TEXT_TOKENS = 512


# vLLM's CUDAGraphMode names (compilation_config.cudagraph_mode).
CudaGraphMode = Literal["FULL_AND_PIECEWISE", "FULL", "PIECEWISE", "FULL_DECODE_ONLY", "NONE"]


def default_max_audio_seconds(max_model_len: int) -> float:
    """The longest audio (per request) whose tokens leave RESERVED_TEXT_TOKENS of the
    context free: floor((max_model_len - 512) / 5) seconds, at least 1 s."""
    # Imported here, not at the top: processing imports transformers (and torch), and the
    # CLI imports this module to build its flags, so `mdl-serve ... --help` and usage errors
    # would otherwise wait seconds for imports they never use.
    from mdlserve.model_plugin.processing import SAMPLE_RATE, num_audio_tokens

    tokens_per_second = num_audio_tokens(SAMPLE_RATE)  # 5: 100 mel frames/s, 4 per patch, 5 patches per token
    budget = max(max_model_len - RESERVED_TEXT_TOKENS, tokens_per_second)
    seconds = budget // tokens_per_second
    while seconds > 1 and num_audio_tokens(seconds * SAMPLE_RATE) > budget:
        seconds -= 1
    return float(max(seconds, 1))


def default_decode_workers() -> int:
    """One decode thread per usable core, at least 2 so one slow file cannot stall all
    uploads, at most 32 (see docs/gateway.md for the thread-vs-process measurement)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(max(cores, 2), 32)


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MDL_", extra="forbid", validate_default=True)

    # Engine
    model: str = Field(".demo/tiny", description="checkpoint directory or model id")
    served_model_name: str = Field("midashenglm-7b", description="model name clients send and /v1/models lists")
    dtype: str = Field("auto", description="weights/activations dtype (auto, float32, bfloat16, float16)")
    max_model_len: int = Field(4096, ge=64, description="context length in tokens (prompt + audio + output)")
    max_num_seqs: int = Field(512, ge=1, description="sequences (clips) the engine batches at once")
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens per engine step (default: vllm.LLM's for the hardware: 16384 on an H100/H200, 8192 "
        "on other GPUs, 4096 on a CPU; at least one clip of max-audio-seconds; at most max-num-seqs x "
        "max-model-len)",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of GPU memory vLLM may use")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is sharded over")
    data_parallel_size: int = Field(
        1, ge=1, description="engine replicas in this process, one per GPU group (vLLM data parallel)"
    )
    quantization: str | None = Field(None, description="vLLM quantization method (e.g. fp8)")
    load_format: str = Field("auto", description="weight loading format ('dummy' for random weights)")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache size in bytes (CPU default: 1 GiB)")
    enforce_eager: bool = Field(False, description="skip torch.compile and CUDA graphs (faster start)")
    cudagraph_mode: CudaGraphMode | None = Field(
        None,
        description="vLLM's CUDA graph mode (default: vLLM's, FULL_AND_PIECEWISE); FULL also graphs steps "
        "with prefills, attention included (GPU only)",
    )
    cudagraph_capture_sizes: Annotated[list[int], NoDecode] | None = Field(
        None,
        description="comma-separated step sizes in tokens that vLLM captures CUDA graphs for at start "
        "(default: vLLM's: 1, 2, 4, every 8 to 248, every 16 to 512, at most twice --max-num-seqs; 51 sizes "
        "at 512 sequences); fewer sizes start faster, a step between two sizes is padded to the next (GPU only)",
    )

    stream_interval: int = Field(
        1,
        ge=1,
        le=1000,
        description="streamed responses carry the tokens of up to N engine steps per event (vLLM's "
        "stream-interval); 1: every token as it comes. The first token always goes at once; larger values "
        "cut the gateway's CPU per streamed request",
    )

    # HTTP
    api_processes: int = Field(
        1, ge=1, le=64, description="gateway processes sharing the port over one engine (vLLM's api-server-count)"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated API keys; none: no authentication"
    )
    api_key_file: Path | None = Field(None, description="file with one API key per line (added to --api-keys)")
    auth_health_metrics: bool = Field(False, description="also require an API key on /health/* and /metrics")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    accept_unknown_fields: bool = Field(
        False, description="ignore request fields the server does not know instead of answering 400"
    )

    # Admission and time limits
    max_queue: int = Field(512, ge=0, description="clips admitted beyond --max-num-seqs before answering 429")
    request_timeout: float = Field(300.0, gt=0, description="seconds before a request is aborted with 504")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")

    # Input limits
    max_upload_bytes: int = Field(25 * MiB, ge=1, description="largest request body in bytes")
    max_body_bytes_in_flight: int = Field(
        32 * MiB, ge=1, description="request-body bytes held at once by requests not yet in the engine; others wait"
    )
    max_audio_seconds: float | None = Field(
        None, gt=0, description="longest total audio per request (default derived from --max-model-len)"
    )
    max_audio_parts: int = Field(8, ge=1, description="most audio clips in one request")
    fetch_timeout: float = Field(10.0, gt=0, description="seconds to fetch one audio_url (all redirects)")
    fetch_max_bytes: int = Field(25 * MiB, ge=1, description="largest audio_url download in bytes")
    allowed_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated domains audio_url may fetch from; empty: any public host"
    )
    allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="comma-separated IP networks (CIDR) audio_url may reach although not public, e.g. an "
        "in-cluster media server; empty: public addresses only",
    )
    media_dir: Path | None = Field(None, description="directory file:// audio URLs may read from (else refused)")
    decode_workers: int | None = Field(None, ge=1, description="audio decode threads (default: one per core)")

    @field_validator("api_keys", "allowed_domains", "allowed_networks", "cudagraph_capture_sizes", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("cudagraph_capture_sizes")
    @classmethod
    def _check_capture_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one size, or leave the setting out for vLLM's sizes")
        if min(value) < 1:
            raise ValueError(f"sizes are tokens per step, at least 1 (got {min(value)})")
        return sorted(set(value))

    @field_validator("allowed_domains")
    @classmethod
    def _normalise_domains(cls, value: list[str]) -> list[str]:
        return [domain.lower().strip(".") for domain in value]

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        if self.max_audio_seconds is None:
            self.max_audio_seconds = default_max_audio_seconds(self.max_model_len)
        if self.decode_workers is None:
            self.decode_workers = default_decode_workers()
        if self.media_dir is not None:
            self.media_dir = self.media_dir.resolve()
        return self

    @model_validator(mode="after")
    def _check_step_budget(self) -> "Settings":
        """vLLM 0.26 only warns when a step may hold more tokens than --max-num-seqs sequences
        of --max-model-len, and its engine then fails on the GPU while starting (an illegal
        memory access with 1 or 2 sequences and 16384 tokens on an H200:
        benchmarks/results/2026-12-02-h200-gc). A CUDA graph size above the step's tokens
        is refused as well: vLLM drops it with only a warning."""
        limit = self.max_step_tokens
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens > limit:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is more than max_num_seqs x max_model_len "
                f"({self.max_num_seqs} x {self.max_model_len} = {limit}): a step cannot hold more tokens than "
                "its sequences; lower --max-num-batched-tokens or raise --max-num-seqs (mdl-serve batch: "
                "--max-in-flight)"
            )
        sizes, budget = self.cudagraph_capture_sizes, self.max_num_batched_tokens
        if sizes and budget is not None and sizes[-1] > budget:
            raise ValueError(
                f"cudagraph_capture_sizes has {sizes[-1]}, more than max_num_batched_tokens ({budget}): no step "
                "holds more tokens than that, so vLLM would drop the size; leave it out"
            )
        return self

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one engine step can hold: --max-num-seqs sequences of --max-model-len."""
        return self.max_num_seqs * self.max_model_len

    @property
    def admitted_running(self) -> int:
        """Clip units the engine replicas run at once: --max-num-seqs per replica."""
        return self.max_num_seqs * self.data_parallel_size

    @property
    def admitted_queued(self) -> int:
        """Clip units admitted to wait: --max-queue per replica."""
        return self.max_queue * self.data_parallel_size

    def all_api_keys(self) -> list[str]:
        """Keys from --api-keys plus --api-key-file (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
