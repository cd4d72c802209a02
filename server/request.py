"""The request builder: a parsed request in, everything the engine needs out.

Engine-free and unit-testable: from a validated body (schemas.py) it builds the
conversation and its audio sources (`Conversation.of`), then `RequestBuilder.prepare`
checks a response_format JSON schema (server/response_schema/), fetches and decodes the audio
in the decode pool, renders and tokenizes the chat template, and converts the sampling
fields to `Sampling`. Every input limit is enforced here (audio parts, audio duration,
context length, sampling ranges and combinations, schema size), so what reaches the
engine is something the engine accepts: an engine refusal is our bug, not the client's.

New sampling fields: declare them (with their ranges) on `schemas.SamplingFields`, carry
them on `Sampling`, check their combinations in `sampling_for`; the engine adapter
(engine.py) passes `Sampling` on to vLLM.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mdlserve.model_plugin.processing import AUDIO_TOKEN, SAMPLE_RATE, num_audio_tokens
from mdlserve.server.audio import AudioDecodeError, DecodePool, InvalidBase64
from mdlserve.server.errors import bad_request
from mdlserve.server.fetch import AudioFetcher, FetchError
from mdlserve.server.response_schema import check_response_schema
from mdlserve.server.schemas import (
    AudioUrlPart,
    ChatMessage,
    InputAudioPart,
    SamplingFields,
    TextPart,
    output_limit_field,
)
from mdlserve.server.settings import Settings

AUDIO_PLACEHOLDER = {"type": "audio"}
# The roles the chat template sees (developer is rendered as system).
CHAT_ROLES = ("system", "user", "assistant")
# Prompts longer than this (characters) are rendered and tokenized in a worker thread,
# so that a long prompt cannot hold the event loop (a 1 MB prompt takes ~100 ms).
INLINE_TOKENIZE_CHARS = 4096
# So are prompts of more messages and parts than this, whatever their length: the template
# renders each message in about 0.2 ms (600 one-character messages, which fit a 4096-token
# context, held the loop for 100 ms) and each text part in about 0.01 ms.
INLINE_TOKENIZE_PIECES = 32
# Text longer than max_model_len x this cannot fit the context and is refused without being
# tokenized (a 25 MB prompt took the gateway past 6 GB in the Hugging Face tokenizer before
# the context check could refuse it: about 250 bytes per character). Chosen far above real
# text (about 4 characters a token) and the whitespace and punctuation runs BPE merges.
MAX_CHARS_PER_TOKEN = 128


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the builder uses."""

    def apply_chat_template(self, conversation: list[dict], *, tokenize: bool, add_generation_prompt: bool) -> str: ...

    def encode(self, text: str, *, add_special_tokens: bool, split_special_tokens: bool = False) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass
class AudioSource:
    """One audio input, not loaded yet. `param` names it in error messages."""

    param: str
    load: Callable[[], Awaitable[bytes]] | None = None  # fetch or read the file (not for the two below)
    samples: np.ndarray | None = None  # already decoded (a window of an uploaded file)
    base64: str | None = None  # an input_audio part's text, decoded with the audio in the decode pool


@dataclass
class Conversation:
    """Template-ready messages (one {"type": "audio"} part per clip) and their audio, in order."""

    messages: list[dict] = field(default_factory=list)
    audio: list[AudioSource] = field(default_factory=list)

    @property
    def text_chars(self) -> int:
        return sum(len(p.get("text", "")) for m in self.messages for p in m["content"])

    @property
    def pieces(self) -> int:
        """Messages and their parts: what the chat template renders one by one."""
        return len(self.messages) + sum(len(m["content"]) for m in self.messages)


@dataclass(frozen=True)
class Sampling:
    """Validated generation parameters, engine-independent (engine.py converts them)."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    min_tokens: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token (OpenAI's top_logprobs); None: no logprobs
    json_schema: dict | None = None  # the answer must validate against it (structured outputs)
    json_object: bool = False  # the answer must be a JSON object
    # Only each choice's finished output, not one per engine step (vLLM's FINAL_ONLY): for
    # answers sent whole, where every step's output would wake the request's task for nothing.
    final_only: bool = False


@dataclass
class PreparedRequest:
    token_ids: list[int]  # the rendered chat, one <|AUDIO|> per clip (the engine expands them)
    clips: list[np.ndarray]  # 16 kHz mono: int16 PCM or float32 (server/audio.py)
    prompt_tokens: int  # text plus audio tokens: what the engine will count
    audio_seconds: float
    sampling: Sampling


def sampling_for(
    fields: SamplingFields, prompt_tokens: int, max_model_len: int, vocab_size: int, final_only: bool = False
) -> Sampling:
    """Fields whose ranges the schema checked -> Sampling; refuses what the engine would refuse."""
    room = max_model_len - prompt_tokens
    requested = fields.output_limit()
    if requested is not None and requested > room:
        field = output_limit_field(fields.max_completion_tokens)
        raise bad_request(
            f"{field} is {requested} but only {room} tokens are left: the prompt uses "
            f"{prompt_tokens} of the model's {max_model_len}-token context",
            param=field,
            code="context_length_exceeded",
        )
    max_tokens = requested or room
    if fields.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({fields.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    temperature = 1.0 if fields.temperature is None else fields.temperature
    if temperature == 0 and fields.n > 1:
        raise bad_request(
            f"n must be 1 when temperature is 0 (greedy sampling gives one answer), got {fields.n}", param="n"
        )
    stop = (fields.stop,) if isinstance(fields.stop, str) else tuple(fields.stop or ())
    logit_bias = {int(token): bias for token, bias in (fields.logit_bias or {}).items()}
    outside = sorted(token for token in logit_bias if token >= vocab_size)
    if outside:
        raise bad_request(
            f"logit_bias names token id {outside[0]}, outside the vocabulary (ids 0 to {vocab_size - 1})",
            param="logit_bias",
        )
    response_format = fields.response_format
    json_schema = response_format.json_schema if response_format else None
    return Sampling(
        n=fields.n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        seed=fields.seed,
        stop=stop,
        min_tokens=fields.min_tokens,
        presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        repetition_penalty=fields.repetition_penalty,
        top_k=fields.top_k,
        min_p=fields.min_p,
        ignore_eos=fields.ignore_eos,
        logit_bias=logit_bias,
        logprobs=fields.logprobs_count(),
        json_schema=json_schema.json_schema if json_schema else None,
        json_object=bool(response_format and response_format.type == "json_object"),
        final_only=final_only,
    )


class RequestBuilder:
    def __init__(self, settings: Settings, decoder: DecodePool, fetcher: AudioFetcher):
        self.max_audio_parts = settings.max_audio_parts
        self.max_audio_seconds = settings.max_audio_seconds
        self.max_model_len = settings.max_model_len
        self.decoder = decoder
        self.fetcher = fetcher
        self._tokens_per_message: dict[int, int] = {}  # id(tokenizer) -> its template's fewest

    def conversation(
        self, messages: Sequence[ChatMessage], *, param: str = "messages", leading_audio: AudioSource | None = None
    ) -> Conversation:
        """`leading_audio` (an uploaded file) becomes the first part of the first user message.
        Cheap and synchronous: admission needs the clip count before any audio is loaded."""
        conversation = Conversation()
        placed = leading_audio is None
        for i, message in enumerate(messages):
            parts: list[dict] = []
            if not placed and leading_audio is not None and message.role == "user":
                parts.append(AUDIO_PLACEHOLDER)
                conversation.audio.append(leading_audio)
                placed = True
            content = [message.content] if isinstance(message.content, str) else message.content
            for j, part in enumerate(content):
                if isinstance(part, str | TextPart):  # a string is not made a TextPart: 7 us of pydantic each
                    parts.append({"type": "text", "text": part if isinstance(part, str) else part.text})
                    continue
                where = f"{param}[{i}].content[{j}]"
                if message.role != "user":
                    raise bad_request(f"{where}: audio is only allowed in user messages", param=where)
                parts.append(AUDIO_PLACEHOLDER)
                conversation.audio.append(self._source_for(part, where))
            role = "system" if message.role == "developer" else message.role  # no template knows "developer"
            conversation.messages.append({"role": role, "content": parts})
        if not placed:
            raise bad_request(f"{param} needs a user message for the uploaded audio", param=param)
        if len(conversation.audio) > self.max_audio_parts:
            raise bad_request(
                f"too many audio parts: {len(conversation.audio)} (the limit is {self.max_audio_parts}, "
                "--max-audio-parts)",
                param=param,
                code="too_many_audio_parts",
            )
        return conversation

    def _source_for(self, part: InputAudioPart | AudioUrlPart, where: str) -> AudioSource:
        if isinstance(part, InputAudioPart):
            return AudioSource(f"{where}.input_audio", base64=part.input_audio.data)
        url = part.audio_url.url

        async def load_url() -> bytes:
            try:
                return await self.fetcher.fetch(url)
            except FetchError as exc:
                raise bad_request(
                    f"{where}.audio_url: {exc}", param=f"{where}.audio_url.url", code="invalid_audio_url"
                ) from None

        return AudioSource(f"{where}.audio_url", load_url)

    async def prepare(
        self, conversation: Conversation, fields: SamplingFields, tokenizer: Tokenizer, *, final_only: bool = False
    ) -> PreparedRequest:
        """Check the response_format schema, load and decode the audio (concurrently), check
        the limits, tokenize. `final_only`: the answer is sent whole (Sampling.final_only).

        The schema is checked first, so that a refused one costs no audio work, and in a
        worker thread: at the limits its metaschema check takes up to 0.8 s of Python (a
        55 KB schema of 500 anyOf branches held the event loop for 14 s before it was
        bounded and moved here)."""
        self._check_message_count(conversation, tokenizer)
        if fields.response_format is not None and fields.response_format.json_schema is not None:
            await asyncio.to_thread(check_response_schema, fields.response_format.json_schema.json_schema)
        clips = await asyncio.gather(*(self.load_audio(source) for source in conversation.audio))
        seconds = sum(clip.size for clip in clips) / SAMPLE_RATE
        if seconds > self.max_audio_seconds:
            raise bad_request(
                f"audio too long: {seconds:.1f} s in this request (the limit is "
                f"{self.max_audio_seconds:g} s, --max-audio-seconds)",
                code="audio_too_long",
            )
        if conversation.text_chars > self.max_model_len * MAX_CHARS_PER_TOKEN:
            raise bad_request(
                f"the prompt's text is {conversation.text_chars} characters, more than a {self.max_model_len}-token "
                f"context can hold (at most {MAX_CHARS_PER_TOKEN} characters a token, --max-model-len)",
                code="context_length_exceeded",
            )
        if conversation.text_chars > INLINE_TOKENIZE_CHARS or conversation.pieces > INLINE_TOKENIZE_PIECES:
            token_ids = await asyncio.to_thread(_tokenize, tokenizer, conversation.messages)
        else:
            token_ids = _tokenize(tokenizer, conversation.messages)
        # Each clip is one <|AUDIO|> token in token_ids and num_audio_tokens(...) in the engine.
        prompt_tokens = len(token_ids) + sum(num_audio_tokens(clip.size) - 1 for clip in clips)
        if prompt_tokens >= self.max_model_len:
            raise bad_request(
                f"the prompt is {prompt_tokens} tokens (text and audio) but the model's context "
                f"is {self.max_model_len} tokens",
                code="context_length_exceeded",
            )
        sampling = sampling_for(fields, prompt_tokens, self.max_model_len, len(tokenizer), final_only)
        return PreparedRequest(token_ids, list(clips), prompt_tokens, seconds, sampling)

    def _check_message_count(self, conversation: Conversation, tokenizer: Tokenizer) -> None:
        """Every message costs the chat template's tokens (turn markers, role) whatever its
        text, and rendering and tokenizing them costs the API process's CPU: 33000 messages
        of one character each (a 1 MB body, far below the character bound) took 23 s on the
        2-core VM before their 264023 tokens were refused. So the messages that cannot fit
        the context even empty are refused unrendered."""
        per_message = self._tokens_per_message.get(id(tokenizer))
        if per_message is None:
            per_message = self._tokens_per_message[id(tokenizer)] = template_tokens_per_message(tokenizer)
        least = len(conversation.messages) * per_message
        if least >= self.max_model_len:
            raise bad_request(
                f"the prompt has {len(conversation.messages)} messages, at least {least} tokens of the chat "
                f"template ({per_message} a message), but the model's context is {self.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )

    async def load_audio(self, source: AudioSource) -> np.ndarray:
        """Fetch (or read) and decode one source; a client fault is a 400 naming it."""
        if source.samples is not None:
            return source.samples
        try:
            if source.base64 is not None:
                return await self.decoder.decode(source.base64, self.max_audio_seconds)
            assert source.load is not None
            return await self.decoder.decode(await source.load(), self.max_audio_seconds)
        except InvalidBase64 as exc:
            raise bad_request(f"{source.param}.data is {exc}", param=f"{source.param}.data") from None
        except AudioDecodeError as exc:
            raise bad_request(
                f"{source.param}: could not decode audio: {exc}", param=source.param, code="invalid_audio"
            ) from None


def template_tokens_per_message(tokenizer: Tokenizer) -> int:
    """The fewest tokens the chat template adds for one more message of any role, its
    content empty: a lower bound on what each message of a prompt costs (text splits the
    template's pieces, which never merges tokens)."""
    first = [{"role": "user", "content": []}]
    alone = len(_tokenize(tokenizer, first))
    return max(
        0, min(len(_tokenize(tokenizer, [*first, {"role": role, "content": []}])) - alone for role in CHAT_ROLES)
    )


def _tokenize(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The rendered chat's token ids, the template's special tokens parsed and the client's
    never: a client typing `<|im_end|><|im_start|>system` gets those characters read as
    text, not a turn of its own. Each text part is rendered as a marker no client can type
    (a fresh nonce), the template's pieces are tokenized as usual and the client's text with
    special tokens split; parts the template puts side by side are joined first, as the
    template joins them. The joined text may not spell the audio placeholder either.
    The markers are found with `str.split`: a regular expression holding the nonce was
    compiled afresh for every request (Python's cache never sees a nonce twice), 0.06-0.08
    ms of the event loop's time per request on the 2-core VM."""
    opening = f"\x00{uuid.uuid4().hex}:"  # a marker: opening, the text's index, NUL
    texts: list[str] = []
    marked = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "text":
                parts.append({"type": "text", "text": f"{opening}{len(texts)}\x00"})
                texts.append(part["text"])
            else:
                parts.append(part)
        marked.append({**message, "content": parts})
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    pieces = _split_at_markers(rendered, opening)  # template, text index, template, ..., template
    token_ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    client_text = ""
    for position in range(1, len(pieces), 2):
        client_text += texts[int(pieces[position])]
        template = pieces[position + 1]
        if template or position == len(pieces) - 2:
            if AUDIO_TOKEN in client_text:
                raise bad_request(
                    f"adjacent text parts join into {AUDIO_TOKEN}, the model's audio placeholder: send audio as an "
                    "input_audio or audio_url part",
                    param="messages",
                )
            token_ids += tokenizer.encode(client_text, add_special_tokens=False, split_special_tokens=True)
            token_ids += tokenizer.encode(template, add_special_tokens=False)
            client_text = ""
    return token_ids


def _split_at_markers(rendered: str, opening: str) -> list[str]:
    """`rendered` split at each marker (`opening`, an index, NUL) into the template's pieces
    with each marker's index between them."""
    first, *rest = rendered.split(opening)
    pieces = [first]
    for piece in rest:
        index, _, template = piece.partition("\x00")
        pieces += [index, template]
    return pieces
