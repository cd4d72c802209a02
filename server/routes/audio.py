"""POST /v1/audio/transcriptions (OpenAI's multipart shape) and POST /v1/audio/chat."""

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from mdlserve.model_plugin.checkpoints import CAPTION_PROMPT
from mdlserve.server.deps import State
from mdlserve.server.errors import bad_request
from mdlserve.server.generation import AudioSource, Conversation
from mdlserve.server.respond import check_model, respond_chat, start_job, finish_job, text_events
from mdlserve.server.schemas import (
    AudioChatForm, ChatCompletionResponse, ChatMessage, TranscriptDelta, TranscriptDone, TranscriptionForm,
    TranscriptionResponse, TranscriptionUsage, TranscriptionVerboseResponse, parse_messages_json,
)  # fmt: skip
from mdlserve.server.streaming import SSEResponse, sse_event

router = APIRouter()


def uploaded(form: TranscriptionForm | AudioChatForm) -> AudioSource:
    async def read() -> bytes:
        return await form.file.read()

    return AudioSource("file", read)


@router.post("/v1/audio/transcriptions", response_model=TranscriptionResponse | TranscriptionVerboseResponse)
async def create_transcription(form: Annotated[TranscriptionForm, Form()], request: Request, state: State):
    check_model(state, form.model)
    message = ChatMessage(role="user", content=form.prompt or CAPTION_PROMPT)
    conversation = Conversation.from_messages([message], state, leading_audio=uploaded(form))
    started = await start_job(request, state, conversation, form.sampling(), "trsc")
    if isinstance(started, Response):
        return started
    job, ticket, first = started

    def usage() -> TranscriptionUsage:
        return TranscriptionUsage(input_tokens=job.prompt_tokens, output_tokens=job.completion_tokens,
                                  total_tokens=job.prompt_tokens + job.completion_tokens)

    if form.stream:
        return SSEResponse(text_events(
            job, ticket, first,
            make_delta=lambda text: sse_event(TranscriptDelta(delta=text)),
            make_done=lambda: sse_event(TranscriptDone(text=job.choices[0].text, usage=usage())),
        ))  # fmt: skip
    closed = await finish_job(request, job, ticket)
    if closed is not None:
        return closed
    text = job.choices[0].text if job.choices else ""
    if form.response_format == "text":
        return PlainTextResponse(text)
    if form.response_format == "verbose_json":
        return TranscriptionVerboseResponse(duration=round(job.audio_seconds, 3), text=text, usage=usage())
    return TranscriptionResponse(text=text, usage=usage())


@router.post("/v1/audio/chat", response_model=ChatCompletionResponse)
async def create_audio_chat(form: Annotated[AudioChatForm, Form()], request: Request, state: State):
    model = check_model(state, form.model)
    if (form.messages is None) == (form.prompt is None):
        raise bad_request("send exactly one of 'messages' (JSON list of chat messages) or 'prompt'",
                          param="messages")
    if form.messages is not None:
        try:
            messages = parse_messages_json(form.messages)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise bad_request(f"invalid messages: {where}: {first['msg']}", param="messages") from None
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
    else:
        messages = [ChatMessage(role="user", content=form.prompt)]
    conversation = Conversation.from_messages(messages, state, leading_audio=uploaded(form))
    return await respond_chat(request, state, conversation, form.sampling(), model=model, stream=form.stream,
                              include_usage=form.include_usage)
