"""POST /v1/audio/transcriptions (OpenAI's multipart shape) and POST /v1/audio/chat."""

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from mdlserve.server.deps import State
from mdlserve.server.errors import bad_request
from mdlserve.server.jsonbody import loads_bounded
from mdlserve.server.request import DEFAULT_PROMPT, AudioSource
from mdlserve.server.routes import AUDIO_CHAT, TRANSCRIPTIONS
from mdlserve.server.routes.chat import answer_chat, check_model
from mdlserve.server.schemas import (
    AudioChatForm,
    ChatCompletionResponse,
    ChatMessage,
    ChatMessages,
    TranscriptDelta,
    TranscriptDone,
    TranscriptionForm,
    TranscriptionResponse,
    TranscriptionUsage,
    TranscriptionVerboseResponse,
)  # fmt: skip
from mdlserve.server.session import Run, SSEResponse, sse_event

router = APIRouter()


def form_messages(raw: str) -> list[ChatMessage]:
    """The `messages` form field of /v1/audio/chat: a JSON list of chat messages."""
    try:
        value = loads_bounded(raw, "messages")
    except json.JSONDecodeError as exc:
        raise bad_request(f"messages is not valid JSON ({exc.msg})", param="messages") from None
    try:
        messages = ChatMessages.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise bad_request(f"invalid messages: {where}: {first['msg']}", param="messages") from None
    if not messages:
        raise bad_request("messages must not be empty", param="messages")
    return messages


def uploaded(form: TranscriptionForm | AudioChatForm) -> AudioSource:
    async def read() -> bytes:
        return await form.file.read()

    return AudioSource("file", read)


def transcription_usage(run: Run) -> TranscriptionUsage:
    return TranscriptionUsage(
        input_tokens=run.prompt_tokens,
        output_tokens=run.completion_tokens,
        total_tokens=run.prompt_tokens + run.completion_tokens,
    )


async def transcript_events(run: Run) -> AsyncIterator[str]:
    for d in run.first:
        if d.text:
            yield sse_event(TranscriptDelta(delta=d.text))
    async for deltas in run.rest():
        for d in deltas:
            if d.text:
                yield sse_event(TranscriptDelta(delta=d.text))
    yield sse_event(TranscriptDone(text=run.text(), usage=transcription_usage(run)))


@router.post(TRANSCRIPTIONS, response_model=TranscriptionResponse | TranscriptionVerboseResponse)
async def create_transcription(form: Annotated[TranscriptionForm, Form()], request: Request, state: State):
    check_model(state, form.model)
    message = ChatMessage(role="user", content=form.prompt or DEFAULT_PROMPT)
    conversation = state.builder.conversation([message], leading_audio=uploaded(form))
    run = await state.session.start(request, conversation, form.sampling(), "trsc")
    if form.stream:
        return SSEResponse(run, lambda: transcript_events(run))
    await state.session.finish(request, run)
    if form.response_format == "text":
        return PlainTextResponse(run.text())
    if form.response_format == "verbose_json":
        return TranscriptionVerboseResponse(
            duration=round(run.audio_seconds, 3), text=run.text(), usage=transcription_usage(run)
        )
    return TranscriptionResponse(text=run.text(), usage=transcription_usage(run))


@router.post(AUDIO_CHAT, response_model=ChatCompletionResponse)
async def create_audio_chat(form: Annotated[AudioChatForm, Form()], request: Request, state: State):
    model = check_model(state, form.model)
    if (form.messages is None) == (form.prompt is None):
        raise bad_request("send exactly one of 'messages' (JSON list of chat messages) or 'prompt'", param="messages")
    messages = (
        form_messages(form.messages) if form.messages is not None else [ChatMessage(role="user", content=form.prompt)]
    )
    conversation = state.builder.conversation(messages, leading_audio=uploaded(form))
    return await answer_chat(
        request, state, conversation, form.sampling(), model=model, stream=form.stream, include_usage=form.include_usage
    )
