"""What flows through a batch job: input rows made ready for the gateway's request builder,
and their results."""

from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from mdlserve.server.schemas import ChatMessage, SamplingFields


class RowError(Exception):
    """A row that cannot be answered (missing file, corrupt audio, too long, bad fields).
    It becomes an error row in the output and the job goes on."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class AudioRef:
    """A row's clip, not loaded yet: a local path or a URL (http(s), data:, file://)."""

    kind: Literal["path", "url"]
    value: str
    param: str = "audio"


@dataclass
class BatchItem:
    """A row ready to run. `messages` in OpenAI's shape; `audio`, when set, is placed before
    the first user message's text (as for an uploaded file), otherwise the clips are the
    messages' own audio parts. `source` is the input row, kept to shape the output row;
    `endpoint` picks the body of OpenAI batch output rows."""

    id: str
    source: dict
    messages: list[ChatMessage]
    sampling: SamplingFields
    audio: AudioRef | None = None
    endpoint: Literal["chat", "transcription", "plain"] = "plain"


@dataclass
class BadRow:
    """An input row that failed before any audio was touched (unparsable, bad fields)."""

    id: str
    source: dict
    error: RowError


@dataclass
class Completion:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class Result:
    request_id: str
    created: int
    prompt_tokens: int
    audio_seconds: float
    completions: list[Completion] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.completions)


def question(prompt: str) -> list[ChatMessage]:
    """One user turn with the instruction; the row's clip goes before it. A prompt the
    gateway would refuse (an audio placeholder typed into it) is a RowError."""
    try:
        return [ChatMessage(role="user", content=prompt)]
    except ValidationError as exc:
        raise RowError("invalid_row", f"prompt: {exc.errors()[0]['msg']}") from None
