"""From validated request bodies to engine outputs: audio loading, prompt, limits, engine.

Every endpoint goes through the same steps:
  1. `Conversation.from_messages`: template-ready messages plus the audio sources, in order.
  2. admission (one unit reserved by AdmissionGateMiddleware when the headers arrive,
     `Admission.admit` by the route at the real weight) before any expensive work.
  3. `Job.prepare`: fetch/decode audio in the decode pool, check duration and context
     limits, render the chat template.
  4. `Job.start`: submit to the engine and wait for the first output, so that everything
     that can fail for a client reason fails before a response (or SSE stream) starts.
  5. `Job.rest`: the remaining outputs (deltas), with the request deadline applied.
"""

import asyncio
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pybase64

from mdlserve.model_plugin.processing import SAMPLE_RATE, num_audio_tokens
from mdlserve.server.audio import AudioDecodeError
from mdlserve.server.errors import ApiError, bad_request
from mdlserve.server.fetch import FetchError
from mdlserve.server.schemas import AudioUrlPart, ChatMessage, InputAudioPart, SamplingFields, TextPart
from mdlserve.server.state import GatewayState

logger = logging.getLogger("mdlserve.server")

AUDIO_PLACEHOLDER = {"type": "audio"}


@dataclass
class AudioSource:
    """One audio input, not loaded yet. `param` names it in error messages."""

    param: str
    load: Callable[[], Awaitable[bytes]]


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)
    audio: list[AudioSource] = field(default_factory=list)

    @classmethod
    def from_messages(
        cls, messages: list[ChatMessage], state: GatewayState, *, param: str = "messages",
        leading_audio: AudioSource | None = None,
    ) -> "Conversation":
        """`leading_audio` (an uploaded file) becomes the first part of the first user message."""
        conversation = cls()
        placed = leading_audio is None
        for i, message in enumerate(messages):
            parts: list[dict] = []
            if not placed and message.role == "user":
                parts.append(AUDIO_PLACEHOLDER)
                conversation.audio.append(leading_audio)
                placed = True
            content = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content
            for j, part in enumerate(content):
                where = f"{param}[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                if message.role != "user":
                    raise bad_request(f"{where}: audio is only allowed in user messages", param=where)
                parts.append(AUDIO_PLACEHOLDER)
                conversation.audio.append(_source_for(part, where, state))
            conversation.messages.append({"role": message.role, "content": parts})
        if not placed:
            raise bad_request(f"{param} needs a user message for the uploaded audio", param=param)
        limit = state.settings.max_audio_parts
        if len(conversation.audio) > limit:
            raise bad_request(
                f"too many audio parts: {len(conversation.audio)} (the limit is {limit}, --max-audio-parts)",
                param=param, code="too_many_audio_parts",
            )
        return conversation


def _source_for(part: InputAudioPart | AudioUrlPart, where: str, state: GatewayState) -> AudioSource:
    if isinstance(part, InputAudioPart):
        data = part.input_audio.data

        async def load_base64() -> bytes:
            try:
                return await asyncio.to_thread(pybase64.b64decode, data, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{where}.input_audio.data is not valid base64",
                                  param=f"{where}.input_audio.data") from None

        return AudioSource(f"{where}.input_audio", load_base64)
    url = part.audio_url.url

    async def load_url() -> bytes:
        try:
            return await state.fetcher.fetch(url)
        except FetchError as exc:
            raise bad_request(f"{where}.audio_url: {exc}", param=f"{where}.audio_url.url",
                              code="invalid_audio_url") from None

    return AudioSource(f"{where}.audio_url", load_url)


@dataclass
class PreparedPrompt:
    token_ids: list[int]  # the rendered chat, one <|AUDIO|> per clip (the engine expands them)
    clips: list[np.ndarray]
    prompt_tokens: int
    audio_seconds: float


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None


class Job:
    """One request's trip through the engine, with its deadline and latency metrics."""

    def __init__(self, state: GatewayState, request_id: str):
        self.state = state
        self.request_id = request_id
        self.arrival = time.perf_counter()
        self.deadline = asyncio.get_running_loop().time() + state.settings.request_timeout
        self.arrival_time = time.time()
        self.created = int(self.arrival_time)
        self.prompt_tokens = 0
        self.audio_seconds = 0.0
        self.n = 1
        self.choices: dict[int, Choice] = {}
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._stream = None

    def timed_out(self) -> ApiError:
        return ApiError(504, f"request timed out after {self.state.settings.request_timeout:g} s "
                             "(--request-timeout)", code="timeout")

    async def prepare(self, conversation: Conversation) -> PreparedPrompt:
        try:
            async with asyncio.timeout_at(self.deadline):
                clips = await asyncio.gather(*(self._load(source) for source in conversation.audio))
        except TimeoutError:
            raise self.timed_out() from None
        seconds = self.audio_seconds = sum(clip.size for clip in clips) / SAMPLE_RATE
        limit = self.state.settings.max_audio_seconds
        if seconds > limit:
            raise bad_request(f"audio too long: {seconds:.1f} s in this request (the limit is {limit:g} s, "
                              "--max-audio-seconds)", code="audio_too_long")
        tokenizer = self.state.engine.tokenizer
        prompt = tokenizer.apply_chat_template(conversation.messages, tokenize=False, add_generation_prompt=True)
        # Tokenized once, here: the engine takes the ids and does not tokenize again. Each clip
        # is one <|AUDIO|> token here and num_audio_tokens(...) in the engine.
        token_ids = tokenizer.encode(prompt, add_special_tokens=False)
        prompt_tokens = len(token_ids) + sum(num_audio_tokens(clip.size) - 1 for clip in clips)
        max_len = self.state.settings.max_model_len
        if prompt_tokens >= max_len:
            raise bad_request(f"the prompt is {prompt_tokens} tokens (text and audio) but the model's context "
                              f"is {max_len} tokens", code="context_length_exceeded")
        return PreparedPrompt(token_ids, list(clips), prompt_tokens, seconds)

    async def _load(self, source: AudioSource) -> np.ndarray:
        data = await source.load()
        try:
            return await self.state.decoder.decode(data, self.state.settings.max_audio_seconds)
        except AudioDecodeError as exc:
            raise bad_request(f"{source.param}: could not decode audio: {exc}", param=source.param,
                              code="invalid_audio") from None

    def sampling_params(self, fields: SamplingFields, prepared: PreparedPrompt):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.state.settings.max_model_len - prepared.prompt_tokens
        requested = fields.output_limit()
        if requested is not None and requested > room:
            raise bad_request(
                f"max_tokens is {requested} but only {room} tokens are left: the prompt uses "
                f"{prepared.prompt_tokens} of the model's {self.state.settings.max_model_len}-token context",
                param="max_tokens", code="context_length_exceeded",
            )
        self.n = fields.n
        try:
            return SamplingParams(
                n=fields.n,
                max_tokens=requested or room,
                temperature=1.0 if fields.temperature is None else fields.temperature,
                top_p=1.0 if fields.top_p is None else fields.top_p,
                seed=fields.seed,
                stop=fields.stop,
                min_tokens=fields.min_tokens,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:  # vLLM's own checks, e.g. "n must be 1 when using greedy sampling"
            raise bad_request(f"invalid sampling parameters: {exc}") from None

    async def start(self, prepared: PreparedPrompt, params) -> list[Delta]:
        """Submit and wait for the first output; returns its deltas.
        Client-caused engine rejections (vLLM input validation) become 400s here.

        vLLM's multimodal processing (waveform checks, hashing, placeholder expansion) runs
        in its renderer's worker thread, not on this event loop, which every other request
        and stream shares."""
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self.state.engine.engine
        prompt = {"prompt_token_ids": prepared.token_ids, "multi_modal_data": {"audio": prepared.clips}}
        self.prompt_tokens = prepared.prompt_tokens
        try:
            engine_input = await engine.renderer.process_for_engine_async(prompt, self.arrival_time)
            self._stream = engine.generate(engine_input, params, self.request_id)
            return await self._next()
        except ValueError as exc:  # vLLM raises ValueError for requests it cannot take
            await self.close()
            logger.info("engine refused the request: %s", exc)
            raise bad_request(f"the engine refused the request: {exc}") from None
        except EngineDeadError:
            await self.close()
            raise ApiError(503, "the engine is not running", code="engine_unavailable", reason=None) from None
        except StopAsyncIteration:
            return []

    async def rest(self) -> AsyncIterator[list[Delta]]:
        """Remaining deltas until every choice finished. Raises ApiError(504) at the deadline."""
        while not self.finished:
            try:
                deltas = await self._next()
            except StopAsyncIteration:
                return
            yield deltas

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices.values())

    async def _next(self) -> list[Delta]:
        try:
            async with asyncio.timeout_at(self.deadline):
                output = await anext(self._stream)
        except TimeoutError:
            raise self.timed_out() from None
        now = time.perf_counter()
        if output.prompt_token_ids:
            self.prompt_tokens = len(output.prompt_token_ids)
        deltas = []
        for completion in output.outputs:
            choice = self.choices.setdefault(completion.index, Choice())
            if completion.token_ids:
                if self._first_token_at is None:
                    self._first_token_at = now
                    self.state.metrics.ttft.observe(now - self.arrival)
                self._last_token_at = now
            choice.tokens += len(completion.token_ids)
            choice.text += completion.text
            if completion.finish_reason is not None:
                choice.finish_reason = completion.finish_reason
            deltas.append(Delta(completion.index, completion.text, completion.finish_reason))
        if self.finished:
            self._observe_decode()
        return deltas

    def _observe_decode(self) -> None:
        tokens = max((c.tokens for c in self.choices.values()), default=0)
        if tokens >= 2 and self._first_token_at is not None:
            self.state.metrics.decode.observe((self._last_token_at - self._first_token_at) / (tokens - 1))

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    async def close(self) -> None:
        """Abort in the engine if still running (vLLM aborts when its generator is closed)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
