"""Running a conversation through a Job and answering as JSON or as an SSE stream.

Shared by /v1/chat/completions, /v1/audio/chat and /v1/audio/transcriptions. The
admission ticket is held until the last byte: released here for JSON answers and in the
stream's `finally` for SSE answers.
"""

import logging
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request, Response

from mdlserve.server.admission import Ticket, request_weight
from mdlserve.server.errors import ApiError
from mdlserve.server.generation import Conversation, Delta, Job
from mdlserve.server.schemas import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChoiceDelta, ChunkChoice,
    ErrorBody, ErrorResponse, SamplingFields, Usage,
)  # fmt: skip
from mdlserve.server.state import GatewayState
from mdlserve.server.streaming import CLIENT_CLOSED, ClientDisconnected, SSEResponse, sse_event, unless_disconnected

logger = logging.getLogger("mdlserve.server")
DONE = "data: [DONE]\n\n"


def check_model(state: GatewayState, model: str | None) -> str:
    served = state.settings.served_model_name
    if model is not None and model != served:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served!r}", param="model",
                       code="model_not_found")
    return served


async def start_job(
    request: Request, state: GatewayState, conversation: Conversation, fields: SamplingFields, prefix: str
) -> tuple[Job, Ticket, list[Delta]] | Response:
    """Admit, prepare and submit; returns the running job, or a 499 response when the
    client went away meanwhile. Every failure releases the admission ticket."""
    reservation = getattr(request.state, "admission_reservation", None)  # from AdmissionGateMiddleware
    ticket = state.admission.admit(request_weight(len(conversation.audio), fields.n), reserved=reservation)
    job = Job(state, f"{prefix}-{uuid.uuid4().hex}")
    logger.info("request %s -> engine request %s (%d clips)", request.state.request_id, job.request_id,
                len(conversation.audio))

    async def begin() -> list[Delta]:
        prepared = await job.prepare(conversation)
        return await job.start(prepared, job.sampling_params(fields, prepared))

    try:
        first = await unless_disconnected(request, begin())
    except ClientDisconnected:
        ticket.release()
        await job.close()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        ticket.release()
        await job.close()
        raise
    return job, ticket, first


async def finish_job(request: Request, job: Job, ticket: Ticket) -> Response | None:
    """Collect the remaining outputs of a non-streaming request; None when complete."""

    async def drain() -> None:
        async for _ in job.rest():
            pass

    try:
        await unless_disconnected(request, drain())
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        ticket.release()
        await job.close()
    return None


def usage_of(job: Job) -> Usage:
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                 total_tokens=job.prompt_tokens + job.completion_tokens)


async def respond_chat(
    request: Request, state: GatewayState, conversation: Conversation, fields: SamplingFields, *,
    model: str, stream: bool, include_usage: bool,
) -> Response | ChatCompletionResponse:
    started = await start_job(request, state, conversation, fields, "chatcmpl")
    if isinstance(started, Response):
        return started
    job, ticket, first = started
    if stream:
        return SSEResponse(_chat_events(job, ticket, first, model, include_usage))
    closed = await finish_job(request, job, ticket)
    if closed is not None:
        return closed
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
        for i, c in sorted(job.choices.items())
    ]
    return ChatCompletionResponse(id=job.request_id, created=job.created, model=model, choices=choices,
                                  usage=usage_of(job))


async def _chat_events(job: Job, ticket: Ticket, first: list[Delta], model: str, include_usage: bool):
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(ChatCompletionChunk(id=job.request_id, created=job.created, model=model,
                                             choices=choices, usage=usage))

    def delta_chunk(deltas: list[Delta]) -> str:
        return chunk([ChunkChoice(index=d.index, delta=ChoiceDelta(content=d.text), finish_reason=d.finish_reason)
                      for d in deltas])

    async def events() -> AsyncIterator[str]:
        yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))
                     for i in range(job.n)])
        if first:
            yield delta_chunk(first)
        async for deltas in job.rest():
            if deltas:
                yield delta_chunk(deltas)
        if include_usage:
            yield chunk([], usage_of(job))

    async for event in stream_with_errors(job, ticket, events()):
        yield event


async def stream_with_errors(job: Job, ticket: Ticket, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Relay `events`, then `[DONE]`. Errors after the stream began (headers are sent) are
    reported as a final `data: {"error": ...}` event; the ticket and engine request are
    released however the stream ends (including client disconnects)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        try:
            async for event in events:
                yield event
        except ApiError as exc:
            if exc.reason:
                job.state.metrics.rejections.labels(reason=exc.reason).inc()
            yield sse_event(ErrorResponse(error=ErrorBody(message=exc.message, type=exc.type, code=exc.code)))
        except EngineDeadError:
            yield sse_event(ErrorResponse(error=ErrorBody(message="the engine stopped", type="server_error",
                                                          code="engine_unavailable")))
        yield DONE
    finally:
        ticket.release()
        await job.close()


def text_events(job: Job, ticket: Ticket, first: list[Delta], make_delta: Callable[[str], str],
                make_done: Callable[[], str]) -> AsyncIterator[str]:
    """SSE events for single-choice text endpoints (transcriptions)."""

    async def events() -> AsyncIterator[str]:
        for d in first:
            if d.text:
                yield make_delta(d.text)
        async for deltas in job.rest():
            for d in deltas:
                if d.text:
                    yield make_delta(d.text)
        yield make_done()

    return stream_with_errors(job, ticket, events())
