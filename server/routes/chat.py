"""POST /v1/chat/completions."""

from fastapi import APIRouter, Request

from mdlserve.server.deps import State
from mdlserve.server.generation import Conversation
from mdlserve.server.respond import check_model, respond_chat
from mdlserve.server.schemas import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: State):
    model = check_model(state, body.model)
    conversation = Conversation.from_messages(body.messages, state)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond_chat(request, state, conversation, body, model=model, stream=body.stream,
                              include_usage=include_usage)
