"""The engine the gateway drives: a small protocol, vLLM's AsyncLLM behind it, and the
life cycle (load in the background, watch, stop) around any engine.

`Engine` is all the session needs; `VllmEngine` implements it with vLLM's in-process
AsyncLLM, and tests pass a fake that implements the same protocol to `create_app` for
behaviour the model does not affect (timeouts, disconnects, engine death, backpressure).

The engine loads in a worker thread after the HTTP server is already listening, so that
/health/live answers during the (minutes-long, for 7B) load and /health/ready says 503
until the engine is up.
"""

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from mdlserve.model_plugin.processing import SAMPLE_RATE, num_audio_tokens
from mdlserve.server.errors import EngineAborted, EngineDead, bad_request
from mdlserve.server.metrics import GatewayMetrics, engine_stat_logger
from mdlserve.server.request import PreparedRequest, Sampling, Tokenizer
from mdlserve.server.settings import Settings

logger = logging.getLogger("mdlserve.server")
HEALTH_INTERVAL_S = 1.0
LOG_STATS_INTERVAL_S = 10.0
# xgrammar's errors begin with its log prefix, "[05:33:38] /project/cpp/regex_converter.cc:83: ":
# a time and a source line of its build, nothing the client can act on.
BACKEND_LOG_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its own bytes (`token` is vLLM's text for
    it, which cannot show part of a UTF-8 character), with the `top` alternatives asked for
    (ranked, their own `top` empty)."""

    token: str
    logprob: float
    bytes: bytes
    top: list["TokenLogprob"]


@dataclass
class Completion:
    """What one choice produced since the previous step."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


@dataclass
class Step:
    completions: list[Completion]
    prompt_tokens: int | None = None  # as the engine counted them, when it says
    # Seconds from arrival to the first token, when the engine says: a final-only request's
    # one Step comes at the end, so its TTFT cannot be read from when Steps arrive.
    first_token_s: float | None = None


class Engine(Protocol):
    """What the gateway needs of an engine.

    `generate` yields one Step per engine output (deltas; with `sampling.final_only`, one
    Step when the request ends, every choice whole); closing the iterator early
    aborts the request in the engine. Once the engine is gone, `generate`, its iterators
    and `check_health` raise `errors.EngineDead`; a request the engine ends on its own (a
    dying data-parallel replica's) raises `errors.EngineAborted` from its iterator, and
    one it ends in error raises from its iterator too (`generation_failed`), so that no
    answer carries finish reason "error"."""

    tokenizer: Tokenizer

    async def start(self) -> None: ...

    def generate(
        self, request: PreparedRequest, request_id: str, arrival_time: float
    ) -> AsyncGenerator[Step, None]: ...

    async def check_health(self) -> None: ...

    async def log_stats(self) -> None: ...

    def shutdown(self) -> None: ...


def engine_args(settings: Settings):
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mdlserve.server.platform import default_kv_cache_bytes

    kv_cache_bytes = settings.kv_cache_bytes or default_kv_cache_bytes()
    return AsyncEngineArgs(
        model=settings.model,
        served_model_name=settings.served_model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        quantization=settings.quantization,
        load_format=settings.load_format,
        enforce_eager=settings.enforce_eager,
        compilation_config=compilation_config(settings),
        stream_interval=settings.stream_interval,
        limit_mm_per_prompt={"audio": settings.max_audio_parts},
        # No multimodal processor cache. With it, the frontend marks a clip as sent to the
        # engine core once it has processed it, and later requests with the same clip send
        # only its hash; a request refused after processing (a JSON schema the grammar
        # backend cannot compile) or cancelled before reaching the engine core never sent it,
        # and every later request with that clip failed (a 500) while the mark lasted. Audio
        # is rarely sent twice; when it is, prefix caching still skips the repeated prefill.
        mm_processor_cache_gb=0,
        # response_format: no optional whitespace (xgrammar still puts one space after each
        # `,` and `:`, and none inside an object or array a const or enum gives, which it
        # writes compactly). With whitespace allowed between tokens a model can
        # pad forever ("{\r\r\r...") and never close the object within max_tokens.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes else {}),
    )


def compilation_config(settings: Settings):
    """vLLM's CompilationConfig with only what the settings choose; vLLM fills in the rest."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    chosen: dict[str, Any] = {}
    if settings.cudagraph_mode is not None:
        chosen["cudagraph_mode"] = CUDAGraphMode[settings.cudagraph_mode]
    if settings.cudagraph_capture_sizes is not None:
        chosen["cudagraph_capture_sizes"] = settings.cudagraph_capture_sizes
    return CompilationConfig(**chosen)


def audio_tokens_per_clip(settings: Settings) -> int:
    """Decoder tokens of one clip as long as --max-audio-seconds: what the engine's encoder
    budget must hold for that limit to be the real one."""
    return num_audio_tokens(int(settings.max_audio_seconds * SAMPLE_RATE))


def engine_config(settings: Settings, api_process_count: int = 1, api_process_rank: int = 0):
    """vLLM's config for the settings, its step budget chosen for throughput and its encoder
    budget sized for --max-audio-seconds. With --api-processes N the supervisor builds it
    with rank -1 and API process i with rank i, as vLLM's own multi-API-server path does.

    Unless --max-num-batched-tokens is given, tokens per engine step are vLLM's offline
    (`vllm.LLM`) default for the hardware, 16384 on an H100/H200, rather than its 2048 for
    an engine built this way: 2048 tokens admit at most eleven new 30 s clips per step, and
    on one H200 at 512 clips they gave 64.9-81.4 samples/s against 101.3-131.3 with 16384
    in the same lease (benchmarks/results/2026-12-02-h200). vLLM also sizes the encoder's
    compute budget and cache from this number, and a clip with more audio tokens than that
    is refused, so it is at least the tokens of one clip of --max-audio-seconds; given and
    too small, the engine refuses to start and says which limit to change. As vLLM's own
    defaults are, it is at most --max-num-seqs sequences of --max-model-len (Settings
    refuses a larger value given)."""
    from vllm.usage.usage_lib import UsageContext

    from mdlserve.model_plugin.model import limit_host_threads

    args = engine_args(settings)
    args._api_process_count = api_process_count
    args._api_process_rank = api_process_rank
    needed = audio_tokens_per_clip(settings)
    if settings.max_num_batched_tokens is None:
        args.max_num_batched_tokens = min(max(default_step_tokens(args), needed), settings.max_step_tokens)
    elif settings.max_num_batched_tokens < needed:
        raise ValueError(
            f"--max-num-batched-tokens {settings.max_num_batched_tokens} is below the {needed} tokens of one "
            f"{settings.max_audio_seconds:g} s clip (--max-audio-seconds): raise it or lower the audio limit"
        )
    config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    limit_host_threads(config.device_config.device_type)  # before the engine's processes start
    return config


def default_step_tokens(args) -> int:
    """vLLM's default tokens per step for `vllm.LLM` on this hardware (16384 on GPUs of 70 GiB
    and more but A100, 8192 on other GPUs, 4096 per CPU worker): the setting every offline
    figure in docs/benchmarks.md ran with, and what a server keeping hundreds of clips in
    flight needs. vLLM reads the GPU's memory through NVML, without starting CUDA here."""
    from vllm.usage.usage_lib import UsageContext

    step_tokens, _ = args.get_batch_defaults(world_size=args.tensor_parallel_size * args.pipeline_parallel_size)
    return step_tokens[UsageContext.LLM_CLASS]


def sampling_params(sampling: Sampling):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if sampling.json_schema is not None:
        structured = StructuredOutputsParams(json=sampling.json_schema)
    elif sampling.json_object:
        structured = StructuredOutputsParams(json_object=True)
    return SamplingParams(
        n=sampling.n,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop),
        min_tokens=sampling.min_tokens,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        ignore_eos=sampling.ignore_eos,
        logit_bias=sampling.logit_bias or None,
        logprobs=sampling.logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.FINAL_ONLY if sampling.final_only else RequestOutputKind.DELTA,
    )


def generation_failed(request: PreparedRequest, request_id: str) -> Exception:
    """What a choice that ended with finish reason "error" becomes: never a 200 carrying it.

    In vLLM 0.26 the engine ends a request so when its grammar fails to compile or rejects
    the sampled token (a KV-transfer failure, the third cause, needs a KV connector, which
    is never configured here). A grammar from the client's schema rejects a token only
    when it allows none: the schema admits no finite value (a `pattern` no string matches,
    say), or, on 0.26 but not 0.32, min_tokens forbids the end the schema has reached. That
    is the client's 400 (vLLM's own server answers a 500
    "Internal server error" for every cause). The json_object grammar is ours, and any
    other cause is our bug: an exception the middleware answers as a 500 naming the
    request id."""
    if request.sampling.json_schema is None:
        return RuntimeError(f"the engine ended request {request_id} with finish reason 'error'")
    logger.info("request %s: the engine could not follow its response_format schema", request_id)
    return bad_request(
        "the response_format schema could not be followed: the structured-output backend allowed no token to "
        "continue the answer (a schema, or a pattern in it, that no JSON value matches does this, as does, on "
        "some vLLM versions, a min_tokens beyond the end of every answer the schema allows)",
        param="response_format",
        code="response_format_unsatisfiable",
    )


def first_token_s(output) -> float | None:
    """Arrival to first token as vLLM's output processor timed it (from the arrival time
    the gateway passed), when it kept request statistics."""
    stats = output.metrics
    return stats.first_token_latency if stats is not None and stats.first_token_latency > 0 else None


def token_logprobs(token_ids, logprobs, top: int, token_bytes: Callable[[int, str], bytes]) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob} maps (the sampled token plus the `top` most
    likely) -> TokenLogprob, alternatives in rank order."""

    def entry(token_id: int, candidate, alternatives: list[TokenLogprob]) -> TokenLogprob:
        text = candidate.decoded_token or ""
        return TokenLogprob(text, candidate.logprob, token_bytes(token_id, text), alternatives)

    result = []
    for token_id, candidates in zip(token_ids, logprobs, strict=True):
        ranked = sorted(candidates.items(), key=lambda item: item[1].rank if item[1].rank is not None else 0)[:top]
        result.append(entry(token_id, candidates[token_id], [entry(i, c, []) for i, c in ranked]))
    return result


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte
    in a byte-level BPE vocabulary (Qwen2's) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(printable)
    return {chr(c): b for b, c in chars.items()}


class TokenBytes:
    """A token id's own bytes, for logprobs' `bytes`: read from the byte-level vocabulary
    entry, since a token holding part of a UTF-8 character decodes to "" or U+FFFD, and
    those tokens are what `bytes` is for. A vocabulary that is not byte-level BPE (no such
    entry) falls back to the UTF-8 of the token's text."""

    def __init__(self, tokenizer: Any):
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.tokenizer = tokenizer if type(decoder).__name__ == "ByteLevel" else None
        self.byte_of = _byte_of_char()

    def __call__(self, token_id: int, text: str) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id) if self.tokenizer is not None else None
        if piece and all(ch in self.byte_of for ch in piece):
            return bytes(self.byte_of[ch] for ch in piece)
        return text.encode("utf-8")


class VllmEngine:
    """vLLM's AsyncLLM in this process (its EngineCore in its own process, unless
    VLLM_ENABLE_V1_MULTIPROCESSING=0). With `client_config` (vLLM's per-API-server dict:
    client_count, client_index and the ZMQ addresses) it is a client of engine cores that
    the --api-processes supervisor started, not their owner."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics, client_config: dict[str, Any] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.client_config = client_config
        self._llm: Any = None  # vLLM's AsyncLLM once started (vLLM is imported only then)
        self.tokenizer = None
        self.token_bytes = TokenBytes(None)  # the tokenizer's, once started

    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("the engine is not running")
        return self._llm

    def _build(self) -> Any:
        """Runs in a worker thread: even vLLM's imports take seconds the event loop needs."""
        from vllm.v1.engine.async_llm import AsyncLLM

        stat_loggers = [engine_stat_logger(self.metrics)]
        if self.client_config is None:
            config = engine_config(self.settings)
            gc.enable()  # paused for the start-up's imports by `mdl-serve serve` (cli.py)
            return AsyncLLM.from_vllm_config(config, stat_loggers=stat_loggers)
        addresses = dict(self.client_config)
        count, index = addresses.pop("client_count"), addresses.pop("client_index")
        return AsyncLLM.from_vllm_config(
            engine_config(self.settings, count, index),
            stat_loggers=stat_loggers,
            client_addresses=addresses,
            client_count=count,
            client_index=index,
        )

    async def start(self) -> None:
        self._llm = await asyncio.to_thread(self._build)
        self.tokenizer = self.llm.get_tokenizer()
        self.token_bytes = TokenBytes(self.tokenizer)

    async def generate(
        self, request: PreparedRequest, request_id: str, arrival_time: float
    ) -> AsyncGenerator[Step, None]:
        """vLLM's multimodal processing (waveform checks, hashing, placeholder expansion) runs
        in its renderer's worker thread, not on this event loop. A ValueError from vLLM's own
        input checks is not caught: the request builder refuses what vLLM would refuse, so
        one reaching here is our bug (a 500), not the client's."""
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = {"prompt_token_ids": request.token_ids, "multi_modal_data": {"audio": request.clips}}
        try:
            engine_input = await self.llm.renderer.process_for_engine_async(prompt, arrival_time)
            stream = self.llm.generate(engine_input, sampling_params(request.sampling), request_id)
            top = request.sampling.logprobs

            def step(output) -> Step:
                if any(c.finish_reason == "abort" for c in output.outputs):
                    raise EngineAborted()  # vLLM ended it; the caller did not (it closes the iterator)
                if any(c.finish_reason == "error" for c in output.outputs):
                    raise generation_failed(request, request_id)
                return Step(
                    [
                        Completion(
                            c.index,
                            c.text,
                            len(c.token_ids),
                            c.finish_reason,
                            None if top is None else token_logprobs(c.token_ids, c.logprobs, top, self.token_bytes),
                        )
                        for c in output.outputs
                    ],
                    len(output.prompt_token_ids) if output.prompt_token_ids else None,
                    first_token_s(output) if request.sampling.final_only else None,
                )

            try:
                yield step(await self._first(stream, request.sampling))
                async for output in stream:
                    yield step(output)
            finally:
                await stream.aclose()  # aborts the request in vLLM if it is still running
        except EngineDeadError:
            raise EngineDead() from None

    @staticmethod
    async def _first(stream, sampling: Sampling):
        """The first output. A JSON schema that passed our check (a valid JSON Schema) can
        still use a feature the structured-output backend lacks; vLLM refuses it with a
        VLLMValidationError (a ValueError up to 0.26, not since 0.32) before the request
        enters the engine: the client's 400, and the only such error from vLLM we pass on
        as one."""
        from vllm.exceptions import VLLMValidationError

        try:
            return await anext(stream)
        except (ValueError, VLLMValidationError) as exc:
            if sampling.json_schema is None:
                raise
            raise bad_request(
                "response_format.json_schema.schema is not supported by the structured-output backend: "
                + BACKEND_LOG_PREFIX.sub("", str(exc)).strip(),
                param="response_format.json_schema.schema",
            ) from None

    async def check_health(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise EngineDead() from exc

    async def log_stats(self) -> None:
        await self.llm.do_log_stats()

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


class EngineState(StrEnum):
    LOADING = "loading"
    UP = "up"
    FAILED = "failed"  # never came up
    DEAD = "dead"  # came up, then died
    STOPPED = "stopped"


class EngineHandle:
    """Starts an Engine in the background, watches its health, stops it."""

    def __init__(self, engine: Engine, metrics: GatewayMetrics, model: str):
        self.engine = engine
        self.metrics = metrics
        self.model = model
        self.state = EngineState.LOADING
        self.started_at: float | None = None
        self._start_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._on_failure: Callable[[], None] = lambda: None
        # Set when the engine dies after coming up: requests still preparing (decoding,
        # fetching, processing) end at once with a 503 instead of when the server exits.
        self.died = asyncio.Event()
        metrics.engine_up.set(0)

    @property
    def up(self) -> bool:
        return self.state is EngineState.UP

    @property
    def gone(self) -> bool:
        return self.state in (EngineState.DEAD, EngineState.FAILED)

    def start(self, on_failure: Callable[[], None]) -> None:
        """Begin loading; `on_failure()` is called if the engine cannot start or dies."""
        self._on_failure = on_failure
        self._start_task = asyncio.create_task(self._start(), name="engine-start")

    async def _start(self) -> None:
        started = time.perf_counter()
        try:
            await self.engine.start()
        except Exception:
            logger.exception("the engine failed to start")
            self.state = EngineState.FAILED
            self._on_failure()
            return
        if self.state is not EngineState.LOADING:  # stop() was called while loading
            return
        self.state = EngineState.UP
        self.started_at = time.time()
        self.metrics.engine_up.set(1)
        logger.info("engine up in %.1f s (model %s)", time.perf_counter() - started, self.model)
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    def mark_dead(self) -> None:
        """Called by the health watch, and by the session as soon as a request sees the
        engine gone (readiness turns false without waiting for the next health check)."""
        if self.state is EngineState.UP:
            logger.error("the engine died; readiness is now false")
            self.state = EngineState.DEAD
            self.metrics.engine_up.set(0)
            self.died.set()
            self._on_failure()

    async def _watch(self) -> None:
        """Flags the engine dead as soon as it stops answering; drives vLLM's periodic
        stats log line."""
        last_log = time.monotonic()
        while self.state is EngineState.UP:
            try:
                await self.engine.check_health()
            except EngineDead:
                self.mark_dead()
                return
            if time.monotonic() - last_log >= LOG_STATS_INTERVAL_S:
                last_log = time.monotonic()
                await self.engine.log_stats()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def stop(self) -> None:
        previous = self.state
        if not self.gone:  # keep the cause: serve() exits 1 on it
            self.state = EngineState.STOPPED
        self.metrics.engine_up.set(0)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._start_task is not None and previous is EngineState.LOADING:
            logger.info("waiting for the engine to finish loading before stopping it")
            await asyncio.shield(self._start_task)
        self.engine.shutdown()
