"""POST /v1/audio/transcriptions and POST /v1/audio/translations (OpenAI's multipart shape).

Transcription is speech recognition with the authors' ASR prompt (tasks.asr_instruction),
`prompt` going in as a system message of context. The upload is decoded once and cut into
windows (transcripts.py); each window is one engine request, all submitted together, so
every segment has its own start and end and vLLM batches the windows of a long file.

The windows are admitted together, at the request's whole weight, once the decode has
counted them: admitted one by one, a long file could be refused (429) after some of its
windows were in the engine, or could never fit and still be told to retry. Each window's
engine request runs as a task of its own, so a stream starts with the first window's text
while later windows still wait for a slot in the engine's batch.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import PlainTextResponse

from mdlserve.model_plugin.processing import SAMPLE_RATE
from mdlserve.server.admission import Ticket, request_weight
from mdlserve.server.chat_fields import check_extra_fields
from mdlserve.server.deps import State, single_valued_form
from mdlserve.server.errors import bad_request
from mdlserve.server.formbody import CheckedFormRoute
from mdlserve.server.request import AudioSource
from mdlserve.server.routes import TRANSCRIPTIONS, TRANSLATIONS
from mdlserve.server.routes.audio import uploaded
from mdlserve.server.routes.chat import check_model
from mdlserve.server.schemas import (
    ChatMessage,
    SpeechForm,
    TranscriptDelta,
    TranscriptDone,
    TranscriptionForm,
    TranscriptionResponse,
    TranscriptionSegment,
    TranscriptionUsage,
    TranscriptionVerboseResponse,
)  # fmt: skip
from mdlserve.server.session import Run, SSEResponse, sse_event
from mdlserve.server.tasks import TRANSLATION_PROMPT, asr_instruction
from mdlserve.server.transcripts import (
    WINDOW_SECONDS,
    Segment,
    StreamedJoin,
    Window,
    joined,
    srt,
    vtt,
    windows,
)

router = APIRouter(route_class=CheckedFormRoute, dependencies=[Depends(single_valued_form)])

# What the endpoints answer besides JSON, for the OpenAPI document.
SPEECH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/plain": {"schema": {"type": "string", "description": "response_format text, srt or vtt"}},
            "text/event-stream": {"schema": {"type": "string", "description": "stream=true: transcript events"}},
        }
    }
}
STREAMABLE_FORMATS = ("json", "text")


class Transcript:
    """The windows of one upload, in order, each window's engine request started as a task
    (`starts`) with its share of the request's admission units (`tickets`)."""

    def __init__(self, parts: list[Window], starts: list[asyncio.Task[Run]], tickets: list[Ticket]):
        self.parts = parts
        self.starts = starts
        self.tickets = tickets

    @property
    def first(self) -> Run:
        return self.starts[0].result()

    @property
    def runs(self) -> list[Run]:
        """Once every window has started."""
        return [start.result() for start in self.starts]

    async def started(self, count: int) -> None:
        """Wait for the first `count` windows to start; raises the first failure in window order."""
        results = await asyncio.gather(*self.starts[:count], return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def segments(self) -> list[Segment]:
        return [Segment(w.start, w.end, r.text()) for w, r in zip(self.parts, self.runs, strict=True)]

    def usage(self) -> TranscriptionUsage:
        prompt = sum(r.prompt_tokens for r in self.runs)
        completion = sum(r.completion_tokens for r in self.runs)
        return TranscriptionUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)

    async def close(self) -> None:
        """Release every window's units (a task cancelled before it ran never had the chance
        to), cancel the windows still starting and abort those started. Shielded: a stream
        whose client went away is closed from a cancelled scope, where any await would be
        cancelled again and leave the later windows running."""
        for ticket in self.tickets:
            ticket.release()
        for start in self.starts:
            start.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*self.starts, return_exceptions=True)
            for start in self.starts:
                if not start.cancelled() and start.exception() is None:
                    await start.result().close()

    async def events(self) -> AsyncIterator[str]:
        """Each window's text deltas in order, each window's as soon as it has them, then the
        done event; the deltas concatenate to exactly the done event's text (StreamedJoin:
        the windows' texts stripped, a space between windows with text, none after the last
        one). SSEResponse closes the transcript (`close`)."""
        join = StreamedJoin()
        for start in self.starts:
            run = await start
            join.next_window()
            for d in run.first:
                if piece := join.piece(d.text):
                    yield sse_event(TranscriptDelta(delta=piece))
            async for deltas in run.rest():
                for d in deltas:
                    if piece := join.piece(d.text):
                        yield sse_event(TranscriptDelta(delta=piece))
        yield sse_event(TranscriptDone(text=self.text(), usage=self.usage()))

    def text(self) -> str:
        return joined(self.segments())


async def _start(request: Request, state: State, form: SpeechForm, instruction: str) -> Transcript:
    """Decode, admit every window at once, start them all; returns once the first window (with
    `stream`) or every window has its first output, so that a failure there is an error
    response rather than an event in a 200."""
    check_model(state, form.model)
    check_extra_fields(form, accept_unknown=state.settings.accept_unknown_fields)
    if form.stream and form.response_format not in STREAMABLE_FORMATS:
        raise bad_request(
            f"stream=true sends transcript events; response_format must be json or text, not {form.response_format}",
            param="response_format",
        )
    if form.timestamp_granularities and form.response_format != "verbose_json":
        raise bad_request(
            "timestamp_granularities[] sets the timestamps of verbose_json's segments; response_format is "
            f"{form.response_format}, which has none (send response_format=verbose_json)",
            param="timestamp_granularities[]",
        )
    upload = uploaded(form)
    audio = await state.builder.load_audio(upload)
    parts = windows(audio)
    messages = [ChatMessage(role="user", content=instruction)]
    if form.prompt:
        messages.insert(0, ChatMessage(role="system", content=form.prompt))
    sampling = form.sampling()
    conversations = [
        state.builder.conversation(messages, leading_audio=AudioSource(upload.param, upload.load, w.samples))
        for w in parts
    ]
    tickets = state.session.admit(
        request,
        len(parts) * request_weight(1, sampling.n),
        slots=f"one per {WINDOW_SECONDS:g} s window of its {audio.size / SAMPLE_RATE:.1f} s of audio",
    ).split(len(parts))
    starts = [
        asyncio.ensure_future(
            state.session.start(request, conversation, sampling, "trsc", stream=form.stream, ticket=share)
        )
        for conversation, share in zip(conversations, tickets, strict=True)
    ]
    transcript = Transcript(parts, starts, tickets)
    try:
        await transcript.started(1 if form.stream else len(parts))
    except BaseException:
        await transcript.close()
        raise
    return transcript


async def _answer(request: Request, state: State, form: SpeechForm, transcript: Transcript, task: str, language: str):
    if form.stream:
        return SSEResponse(transcript.first, transcript.events, transcript.close)
    try:
        await asyncio.gather(*(state.session.finish(request, run) for run in transcript.runs))
    finally:
        await transcript.close()
    segments = transcript.segments()
    if form.response_format == "text":
        return PlainTextResponse(transcript.text())
    if form.response_format == "srt":
        return PlainTextResponse(srt(segments))
    if form.response_format == "vtt":
        return PlainTextResponse(vtt(segments))
    if form.response_format == "verbose_json":
        temperature = form.sampling().temperature or 0.0
        return TranscriptionVerboseResponse(
            task=task,
            language=language,
            duration=round(segments[-1].end, 3),
            text=transcript.text(),
            segments=[
                TranscriptionSegment(
                    id=i, seek=round(s.start * 100), start=s.start, end=s.end, text=s.text, temperature=temperature
                )
                for i, s in enumerate(segments)
            ],
            usage=transcript.usage(),
        )
    return TranscriptionResponse(text=transcript.text(), usage=transcript.usage())


@router.post(
    TRANSCRIPTIONS, response_model=TranscriptionResponse | TranscriptionVerboseResponse, responses=SPEECH_RESPONSES
)
async def create_transcription(form: Annotated[TranscriptionForm, Form()], request: Request, state: State):
    transcript = await _start(request, state, form, asr_instruction(form.language))
    return await _answer(request, state, form, transcript, "transcribe", form.language or "unknown")


@router.post(
    TRANSLATIONS, response_model=TranscriptionResponse | TranscriptionVerboseResponse, responses=SPEECH_RESPONSES
)
async def create_translation(form: Annotated[SpeechForm, Form()], request: Request, state: State):
    transcript = await _start(request, state, form, TRANSLATION_PROMPT)
    return await _answer(request, state, form, transcript, "translate", "english")
