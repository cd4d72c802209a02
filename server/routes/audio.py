"""POST /v1/audio/analysis (and its old name /v1/audio/chat): one uploaded clip, and a
task preset, a question or a whole conversation about it; answered as a chat completion."""

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from pydantic import ValidationError

from mdlserve.server.chat_fields import check_extra_fields
from mdlserve.server.deps import State, single_valued_form
from mdlserve.server.errors import bad_request, problems_message, validation_problems
from mdlserve.server.formbody import CheckedFormRoute
from mdlserve.server.jsonbody import INLINE_ELEMENTS, count_elements, loads_bounded, run_for_elements
from mdlserve.server.request import AudioSource, Conversation
from mdlserve.server.routes import AUDIO_ANALYSIS, AUDIO_CHAT
from mdlserve.server.routes.chat import CHAT_RESPONSES, answer_chat, check_model
from mdlserve.server.schemas import AudioChatForm, ChatCompletionResponse, ChatMessage, ChatMessages, SpeechForm
from mdlserve.server.state import GatewayState
from mdlserve.server.tasks import TaskPromptError, task_instruction

router = APIRouter(route_class=CheckedFormRoute, dependencies=[Depends(single_valued_form)])


def form_messages(raw: str, *, accept_unknown: bool) -> list[ChatMessage]:
    """The `messages` form field of /v1/audio/chat: a JSON list of chat messages, whose
    fields are honoured or refused as in a chat completions request."""
    try:
        value = loads_bounded(raw, "messages")
    except json.JSONDecodeError as exc:
        raise bad_request(f"messages is not valid JSON ({exc.msg})", param="messages") from None
    try:
        messages = ChatMessages.validate_python(value)
    except ValidationError as exc:
        problems = validation_problems(exc.errors(), value, root="messages")
        raise bad_request(problems_message(problems), param=problems[0][0]) from None
    if not messages:
        raise bad_request("messages must not be empty", param="messages")
    for index, message in enumerate(messages):
        check_extra_fields(message, accept_unknown=accept_unknown, path=f"messages[{index}]")
    return messages


def uploaded(form: SpeechForm | AudioChatForm) -> AudioSource:
    async def read() -> bytes:
        return await form.file.read()

    return AudioSource("file", read)


def form_conversation(form: AudioChatForm, *, accept_unknown: bool) -> list[ChatMessage]:
    """`messages`, or one user turn from `task` and/or `prompt`."""
    if form.messages is not None:
        if form.task is not None or form.prompt is not None:
            raise bad_request("send either 'messages', or 'task' and/or 'prompt', not both", param="messages")
        return form_messages(form.messages, accept_unknown=accept_unknown)
    if form.task is None and form.prompt is None:
        raise bad_request("send 'task' (a preset), 'prompt' (a question) or 'messages' (a conversation)", param="task")
    try:
        text = task_instruction(form.task, form.prompt) if form.task is not None else form.prompt
    except TaskPromptError as exc:
        raise bad_request(str(exc), param="prompt") from None
    return [ChatMessage(role="user", content=text)]


def form_chat(form: AudioChatForm, state: GatewayState) -> Conversation:
    """The conversation about the uploaded clip: `messages` parsed, validated and checked,
    or the one user turn."""
    messages = form_conversation(form, accept_unknown=state.settings.accept_unknown_fields)
    return state.builder.conversation(messages, leading_audio=uploaded(form))


@router.post(
    AUDIO_ANALYSIS, response_model=ChatCompletionResponse, responses=CHAT_RESPONSES, operation_id="audio_analysis"
)
@router.post(
    AUDIO_CHAT,
    response_model=ChatCompletionResponse,
    responses=CHAT_RESPONSES,
    operation_id="audio_chat",
    deprecated=True,
)
async def create_audio_analysis(form: Annotated[AudioChatForm, Form()], request: Request, state: State):
    model = check_model(state, form.model)
    check_extra_fields(form, accept_unknown=state.settings.accept_unknown_fields)
    # `messages` is JSON of up to a form field's 1 MiB: as many elements as a chat body.
    raw = (form.messages or "").encode("utf-8", "surrogatepass")
    elements = count_elements(raw, stop_above=INLINE_ELEMENTS)
    conversation = await run_for_elements(elements, form_chat, form, state)
    return await answer_chat(
        request, state, conversation, form.sampling(), model=model, stream=form.stream, include_usage=form.include_usage
    )
