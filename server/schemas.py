"""Request and response bodies (OpenAI's wire format, the subset this model supports)."""

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from mdlserve.model_plugin.processing import AUDIO_TOKEN
from mdlserve.server.tasks import ISO_639_1, Task

# The engine seeds a torch.Generator: a signed 64-bit integer (-1: unseeded in vLLM, so 0 up).
SEED_MIN, SEED_MAX = 0, (1 << 63) - 1
MAX_STOP_CHARS = 256
# OpenAI's limits: top_logprobs 0..20, logit_bias values -100..100 (we also bound the entries).
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOKEN_ID_DIGITS = 9  # vocabularies hold hundreds of thousands of tokens
# input_audio.format values we accept. The bytes are decoded by content sniffing; the
# format only has to name something we can decode.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "oga", "webm", "m4a", "mp4", "aac", "aiff", "aif")


def _refuse_lone_surrogates(value: object) -> object:
    """JSON may escape lone surrogates (`"\\ud800"`); such text cannot be encoded as UTF-8,
    so a tokenizer (or a log line) would fail on it later as our 500 instead of their 400."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and not text.isascii():  # isascii: O(1), no copy of a 25 MB prompt
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"text must be valid Unicode: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
                ) from None
    return value


def _refuse_audio_placeholder(text: str | None) -> str | None:
    """Prompt text is tokenized with the chat template, special tokens included: an audio
    placeholder typed into it would ask the engine for a clip nobody sent."""
    if text is not None and AUDIO_TOKEN in text:
        raise ValueError(
            f"text must not contain {AUDIO_TOKEN}, the model's audio placeholder: "
            "send audio as an input_audio or audio_url part"
        )
    return text


class _Body(BaseModel):
    # Unknown fields are ignored (OpenAI clients send some we do not use); wrong types fail.
    # NaN and infinities (JSON's NaN/Infinity, which Python's clients send) are refused as
    # not finite, not as out of range: NaN compares false with every bound.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        return _refuse_lone_surrogates(value)


class _JsonBody(_Body):
    """An object inside a JSON request: strict as the request is (`"include_usage": "yes"`
    is a 400, not a guess), and keys it does not declare land in `model_extra`, where
    chat_fields.check_extra_fields refuses them by their path, as it does the top level's."""

    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_JsonBody):
    type: Literal["text"]
    text: str

    _no_audio_placeholder = field_validator("text")(_refuse_audio_placeholder)


class InputAudio(_JsonBody):
    data: str = Field(description="base64-encoded audio file")
    format: str | None = Field(None, description="container/codec name, e.g. wav or mp3")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in AUDIO_FORMATS:
            raise ValueError(f"unsupported audio format {value!r}; supported: {', '.join(AUDIO_FORMATS)}")
        return value


class InputAudioPart(_JsonBody):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioUrl(_JsonBody):
    url: str = Field(description="https/http URL, data: URL, or file:// under --media-dir")


class AudioUrlPart(_JsonBody):
    type: Literal["audio_url"]
    audio_url: AudioUrl


ContentPart = Annotated[TextPart | InputAudioPart | AudioUrlPart, Field(discriminator="type")]


class ChatMessage(_JsonBody):
    """`developer` is OpenAI's newer name for `system`; the chat template sees `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _no_audio_placeholder(cls, content: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(content, str):
            _refuse_audio_placeholder(content)
        return content


ChatMessages = TypeAdapter(list[ChatMessage])


class StreamOptions(_JsonBody):
    include_usage: bool = False


def output_limit_field(max_completion_tokens: int | None) -> str:
    """The field the output limit comes from, as the client sent it (max_completion_tokens
    wins; the forms have no max_tokens): errors about the limit name it."""
    return "max_completion_tokens" if max_completion_tokens else "max_tokens"


class GenerationFields(_Body):
    """Generation parameters shared by every endpoint, multipart forms included (scalars only)."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no end-of-sequence before this many tokens")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2, description="vLLM extension: 1 is off")
    top_k: int = Field(0, ge=-1, le=1_000_000, description="vLLM extension: 0 or -1 is off")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM extension: 0 is off")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence")

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        for stop in [value] if isinstance(value, str) else value or []:
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        """A field's validator (the fields it reads come before it) so the 400 names min_tokens."""
        name = output_limit_field(info.data.get("max_completion_tokens"))
        limit = info.data.get(name)
        if limit is not None and value > limit:
            raise ValueError(f"min_tokens ({value}) must not exceed {name} ({limit})")
        return value

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class JsonSchemaFormat(_JsonBody):
    """The schema itself is checked by the request builder (server/response_schema/), off the
    event loop: at the size limits, jsonschema's metaschema check alone takes up to 0.8 s."""

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="a JSON Schema the answer must validate against")
    strict: bool | None = None


class ResponseFormat(_JsonBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only with it")
        return self


class SamplingFields(GenerationFields):
    """Every generation parameter; the JSON-only ones (objects, logprobs) on top of the form-friendly ones."""

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if len(key) > MAX_TOKEN_ID_DIGITS:  # before int(): Python refuses to parse past 4300 digits
                raise ValueError(
                    f"keys must be token ids of at most {MAX_TOKEN_ID_DIGITS} digits, got {len(key)} digits"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100], got {bias}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return value

    def logprobs_count(self) -> int | None:
        """vLLM's `logprobs`: how many alternatives per token (the sampled one comes on top); None: off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatCompletionRequest(SamplingFields):
    """Fields not declared here land in `model_extra`: the route refuses them by name
    (chat_fields.py), so none is silently dropped. Strict, as OpenAI's API is: JSON has
    types, so `"max_tokens": "3"`, `true` or `3.0` and `"stream": "true"` are 400s naming
    the field, not guesses (an integer is still a number). The multipart forms, whose
    values are all text, convert."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="end-user id, written to the access log")

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        """OpenAI's rule: options of a stream that will not be sent are a mistake, not a no-op."""
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value


class SpeechForm(_Body):
    """multipart/form-data of POST /v1/audio/translations, and the base of transcriptions'
    (OpenAI's fields, plus max_completion_tokens to bound the answer and seed). Unknown
    form fields are kept for check_extra_fields, which refuses them by name as in a JSON
    body (or lets --accept-unknown-fields ignore them)."""

    model_config = ConfigDict(extra="allow")

    file: UploadFile
    model: str
    prompt: str | None = Field(None, description="context (names, spelling) for the recogniser, as a system message")
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] = "json"
    temperature: float | None = Field(None, ge=0, le=2, description="default 0")
    stream: bool = Field(False, description="server-sent transcript.text.delta events, then transcript.text.done")
    timestamp_granularities: list[Literal["segment"]] | None = Field(
        None, alias="timestamp_granularities[]", description="segment only (one segment per 30 s window)"
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="output limit per 30 s window")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)

    _no_audio_placeholder = field_validator("prompt")(_refuse_audio_placeholder)

    def sampling(self) -> SamplingFields:
        """OpenAI's transcription default is temperature 0 (greedy), unlike chat's 1."""
        temperature = 0.0 if self.temperature is None else self.temperature
        return SamplingFields(temperature=temperature, max_completion_tokens=self.max_completion_tokens, seed=self.seed)


class TranscriptionForm(SpeechForm):
    """multipart/form-data of POST /v1/audio/transcriptions."""

    language: str | None = Field(None, description="ISO-639-1 code of the speech (en, zh, ...): selects the <|xx|> tag")

    @field_validator("language")
    @classmethod
    def _iso_639_1(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ISO_639_1:
            raise ValueError(f"language must be an ISO-639-1 code such as 'en' or 'zh', got {value!r}")
        return None if value is None else value.lower()


class AudioChatForm(GenerationFields):
    """multipart/form-data of POST /v1/audio/analysis (alias /v1/audio/chat): an audio file
    plus either `messages` (a JSON list of chat messages), or `task` (a preset of the
    authors' evaluation prompts) and/or `prompt` (one user question). Unknown form fields
    are kept for check_extra_fields, as SpeechForm's."""

    model_config = ConfigDict(extra="allow")

    file: UploadFile
    model: str | None = None
    messages: str | None = Field(None, description="JSON list of chat messages")
    task: Task | None = Field(None, description="preset instruction (docs/gateway.md lists them)")
    prompt: str | None = Field(None, description="the question; with task qa or multiple_choice, fills its slot")
    stream: bool = False
    include_usage: bool = False

    @field_validator("include_usage")
    @classmethod
    def _usage_needs_stream(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("stream"):
            raise ValueError(
                "include_usage is only allowed with stream: true (an answer that is not streamed has usage)"
            )
        return value

    _no_audio_placeholder = field_validator("prompt")(_refuse_audio_placeholder)

    def sampling(self) -> SamplingFields:
        return SamplingFields.model_validate(self.model_dump(include=set(GenerationFields.model_fields)))


# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's `choices[].logprobs` (chat completions and their chunks)."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class TranscriptionUsage(BaseModel):
    """OpenAI's token usage shape for audio endpoints."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int


class TranscriptionResponse(BaseModel):
    text: str
    usage: TranscriptionUsage


class TranscriptionSegment(BaseModel):
    """One window of the audio, transcribed on its own (transcripts.WINDOW_SECONDS)."""

    id: int
    seek: int = Field(description="start of the window in 10 ms frames")
    start: float
    end: float
    text: str
    temperature: float


class TranscriptionVerboseResponse(BaseModel):
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str = Field("unknown", description="the request's language (english for translations), else 'unknown'")
    duration: float
    text: str
    segments: list[TranscriptionSegment] = Field(default_factory=list)
    usage: TranscriptionUsage


class TranscriptDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TranscriptionUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "midashenglm-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionInfo(BaseModel):
    version: str = Field(description="midashenglm-serve")
    vllm: str = Field(description="the vLLM the engine runs on")


class HealthStatus(BaseModel):
    status: str
    detail: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
