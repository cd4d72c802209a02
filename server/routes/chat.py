"""POST /v1/chat/completions, and the chat answer (JSON or SSE chunks) that
/v1/audio/chat shares."""

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from mdlserve.server.chat_fields import check_extra_fields
from mdlserve.server.deps import State
from mdlserve.server.engine import TokenLogprob
from mdlserve.server.errors import ApiError
from mdlserve.server.jsonbody import BoundedJsonRoute, body_elements, run_for_elements
from mdlserve.server.request import Conversation
from mdlserve.server.routes import CHAT_COMPLETIONS
from mdlserve.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTokenLogprob,
    ChatTopLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    SamplingFields,
    Usage,
)  # fmt: skip
from mdlserve.server.session import Delta, Run, SSEResponse, sse_event
from mdlserve.server.state import GatewayState

logger = logging.getLogger("mdlserve.server")
router = APIRouter(route_class=BoundedJsonRoute)
# OpenAI's stand-in for the log-probability of a token that could not be sampled (-inf).
MIN_LOGPROB = -9999.0
# stream=true answers with server-sent chunks, for the OpenAPI document.
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string", "description": "chat.completion.chunk SSE"}}}}
}


def check_model(state: GatewayState, model: str | None) -> str:
    served = state.settings.served_model_name
    if model is not None and model != served:
        raise ApiError(
            404, f"model {model!r} does not exist; this server serves {served!r}", param="model", code="model_not_found"
        )
    return served


@router.post(CHAT_COMPLETIONS, response_model=ChatCompletionResponse, responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: State):
    model = check_model(state, body.model)
    conversation = await run_for_elements(body_elements(request), checked_conversation, body, state)
    if body.user is not None:
        logger.info("request %s from user %r", request.state.request_id, body.user)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await answer_chat(
        request, state, conversation, body, model=model, stream=body.stream, include_usage=include_usage
    )


def checked_conversation(body: ChatCompletionRequest, state: GatewayState) -> Conversation:
    """The fields checked, the conversation built: work over every element of the body."""
    check_extra_fields(body, accept_unknown=state.settings.accept_unknown_fields)
    return state.builder.conversation(body.messages)


async def answer_chat(
    request: Request,
    state: GatewayState,
    conversation: Conversation,
    fields: SamplingFields,
    *,
    model: str,
    stream: bool,
    include_usage: bool,
) -> SSEResponse | ChatCompletionResponse:
    run = await state.session.start(request, conversation, fields, "chatcmpl", stream=stream)
    if stream:
        return SSEResponse(run, lambda: _chunks(run, model, include_usage, fields.logprobs))
    await state.session.finish(request, run)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=choice_logprobs(c.logprobs) if fields.logprobs else None,
        )
        for i, c in sorted(run.choices.items())
    ]
    return ChatCompletionResponse(
        id=run.request_id, created=run.created, model=model, choices=choices, usage=usage_of(run)
    )


def usage_of(run: Run) -> Usage:
    return Usage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        total_tokens=run.prompt_tokens + run.completion_tokens,
    )


def choice_logprobs(tokens: list[TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's shape: each token with its own bytes (those of part of a character too) and
    its alternatives."""

    def top(t: TokenLogprob) -> ChatTopLogprob:
        return ChatTopLogprob(token=t.token, logprob=max(t.logprob, MIN_LOGPROB), bytes=list(t.bytes))

    return ChoiceLogprobs(
        content=[ChatTokenLogprob(**top(t).model_dump(), top_logprobs=[top(alt) for alt in t.top]) for t in tokens]
    )


async def _chunks(run: Run, model: str, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(id=run.request_id, created=run.created, model=model, choices=choices, usage=usage)
        )

    def delta_chunk(deltas: list[Delta]) -> str:
        return chunk(
            [
                ChunkChoice(
                    index=d.index,
                    delta=ChoiceDelta(content=d.text),
                    finish_reason=d.finish_reason,
                    logprobs=choice_logprobs(d.logprobs or []) if logprobs else None,
                )
                for d in deltas
            ]
        )

    yield chunk([ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content="")) for i in range(run.n)])
    if run.first:
        yield delta_chunk(run.first)
    async for deltas in run.rest():
        if deltas:
            yield delta_chunk(deltas)
    if include_usage:
        yield chunk([], usage_of(run))
