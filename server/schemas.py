"""Request and response bodies (OpenAI's wire format, the subset this model supports)."""

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# input_audio.format values we accept. The bytes are decoded by content sniffing; the
# format only has to name something we can decode.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "oga", "webm", "m4a", "mp4", "aac", "aiff", "aif")


def _refuse_lone_surrogates(value: object) -> object:
    """JSON may escape lone surrogates (`"\\ud800"`); such text cannot be encoded as UTF-8,
    so a tokenizer (or a log line) would fail on it later as our 500 instead of their 400."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"text must be valid Unicode: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
                ) from None
    return value


class _Body(BaseModel):
    # Unknown fields are ignored (OpenAI clients send some we do not use); wrong types fail.
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        return _refuse_lone_surrogates(value)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class InputAudio(_Body):
    data: str = Field(description="base64-encoded audio file")
    format: str | None = Field(None, description="container/codec name, e.g. wav or mp3")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in AUDIO_FORMATS:
            raise ValueError(f"unsupported audio format {value!r}; supported: {', '.join(AUDIO_FORMATS)}")
        return value


class InputAudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioUrl(_Body):
    url: str = Field(description="https/http URL, data: URL, or file:// under --media-dir")


class AudioUrlPart(_Body):
    type: Literal["audio_url"]
    audio_url: AudioUrl


ContentPart = Annotated[TextPart | InputAudioPart | AudioUrlPart, Field(discriminator="type")]
AudioPart = InputAudioPart | AudioUrlPart


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


ChatMessages = TypeAdapter(list[ChatMessage])


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Generation parameters shared by every endpoint."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no end-of-sequence before this many tokens")

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingFields":
        limit = self.output_limit()
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class TranscriptionForm(_Body):
    """multipart/form-data of POST /v1/audio/transcriptions (OpenAI's fields, plus
    max_completion_tokens to bound the answer)."""

    file: UploadFile
    model: str
    prompt: str | None = Field(None, description="instruction; default: the captioning prompt")
    response_format: Literal["json", "text", "verbose_json"] = "json"
    temperature: float | None = Field(None, ge=0, le=2, description="default 0")
    stream: bool = False
    language: str | None = Field(None, description="accepted for compatibility and ignored")
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None

    def sampling(self) -> SamplingFields:
        """OpenAI's transcription default is temperature 0 (greedy), unlike chat's 1."""
        temperature = 0.0 if self.temperature is None else self.temperature
        return SamplingFields(temperature=temperature, max_completion_tokens=self.max_completion_tokens, seed=self.seed)


class AudioChatForm(SamplingFields):
    """multipart/form-data of POST /v1/audio/chat: an audio file plus either `messages`
    (a JSON list of chat messages) or `prompt` (one user question)."""

    file: UploadFile
    model: str | None = None
    messages: str | None = Field(None, description="JSON list of chat messages")
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False

    def sampling(self) -> SamplingFields:
        return SamplingFields.model_validate(self.model_dump(include=set(SamplingFields.model_fields)))


# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


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
    logprobs: None = None


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


class TranscriptionVerboseResponse(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str = Field("unknown", description="not detected: the model captions, it does not identify languages")
    duration: float
    text: str
    segments: list = Field(default_factory=list)
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
