"""POST /v1/audio/transcriptions and POST /v1/audio/translations (OpenAI's multipart shape).

Transcription is speech recognition with the authors' ASR prompt (tasks.asr_instruction),
`prompt` going in as a system message of context. The upload is decoded once and cut into
windows (transcripts.py); each window is one engine request, all submitted together, so
every segment has its own start and end and vLLM batches the windows of a long file.

The windows are admitted together, at the request's whole weight, once the decode has
counted them: admitted one by one, a long file could be refused (429) after some of its
windows were in the engine, or could never fit and still be told to retry.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import PlainTextResponse

from mdlserve.model_plugin.processing import SAMPLE_RATE
from mdlserve.server.admission import request_weight
from mdlserve.server.deps import State, single_valued_form
from mdlserve.server.errors import bad_request
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
from mdlserve.server.transcripts import WINDOW_SECONDS, Segment, Window, joined, srt, vtt, windows

router = APIRouter(dependencies=[Depends(single_valued_form)])

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
    """The runs of one upload's windows, in order."""

    def __init__(self, parts: list[Window], runs: list[Run]):
        self.parts = parts
        self.runs = runs

    def segments(self) -> list[Segment]:
        return [Segment(w.start, w.end, r.text()) for w, r in zip(self.parts, self.runs, strict=True)]

    def usage(self) -> TranscriptionUsage:
        prompt = sum(r.prompt_tokens for r in self.runs)
        completion = sum(r.completion_tokens for r in self.runs)
        return TranscriptionUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)

    async def close(self) -> None:
        for run in self.runs:
            await run.close()

    async def events(self) -> AsyncIterator[str]:
        """Each window's text deltas in order (a space between windows), then the done event."""
        try:
            for i, run in enumerate(self.runs):
                if i and self.runs[i - 1].text().strip():
                    yield sse_event(TranscriptDelta(delta=" "))
                for d in run.first:
                    if d.text:
                        yield sse_event(TranscriptDelta(delta=d.text))
                async for deltas in run.rest():
                    for d in deltas:
                        if d.text:
                            yield sse_event(TranscriptDelta(delta=d.text))
            yield sse_event(TranscriptDone(text=self.text(), usage=self.usage()))
        finally:
            await self.close()

    def text(self) -> str:
        return joined(self.segments()) if len(self.runs) > 1 else self.runs[0].text()


async def _start(request: Request, state: State, form: SpeechForm, instruction: str) -> Transcript:
    check_model(state, form.model)
    if form.stream and form.response_format not in STREAMABLE_FORMATS:
        raise bad_request(
            f"stream=true sends transcript events; response_format must be json or text, not {form.response_format}",
            param="response_format",
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
    started = await asyncio.gather(
        *(
            state.session.start(request, conversation, sampling, "trsc", stream=form.stream, ticket=share)
            for conversation, share in zip(conversations, tickets, strict=True)
        ),
        return_exceptions=True,
    )
    runs = [r for r in started if isinstance(r, Run)]
    failed = [r for r in started if not isinstance(r, Run)]
    if failed:
        for run in runs:
            await run.close()
        for ticket in tickets:
            ticket.release()
        raise failed[0]
    return Transcript(parts, runs)


async def _answer(request: Request, state: State, form: SpeechForm, transcript: Transcript, task: str, language: str):
    if form.stream:
        return SSEResponse(transcript.runs[0], transcript.events)
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
