"""Every field of a chat completions request: OpenAI's and vLLM's extras, each honoured
or refused by name.

`HONOURED` maps each field `schemas.ChatCompletionRequest` declares to how it is
honoured; `REFUSED` maps every other field OpenAI or vLLM define to why it is refused.
docs/gateway.md's field table is compared with both by a test, and another test checks
that every field of vLLM's own `ChatCompletionRequest` is in one of them, so a vLLM
upgrade that adds a field fails a test instead of the field being dropped silently.

A refused field sent as `null` counts as absent (OpenAI's meaning of null). Fields no
one defines are refused as unknown unless --accept-unknown-fields, which also lets the
`IGNORABLE` ones through: bookkeeping fields that do not change the answer.
"""

from collections.abc import Iterator

from pydantic import BaseModel

from mdlserve.server.errors import bad_request

HONOURED = {
    "model": "must be the served model name (404 `model_not_found` otherwise)",
    "messages": "roles system, developer (rendered as system), user, assistant; text, `input_audio` and "
    "`audio_url` parts; audio in any user turn",
    "max_tokens": "output limit (vLLM `max_tokens`); default: the rest of the context",
    "max_completion_tokens": "same as max_tokens; wins when both are sent",
    "n": "choices per request, 1 to 16 (each counts against admission)",
    "temperature": "0 to 2; default 1",
    "top_p": "(0, 1]; default 1",
    "seed": "0 to 2^63-1: the same seed and inputs give the same answer",
    "stop": "up to 4 strings of 1 to 256 characters; the stop string is not returned",
    "presence_penalty": "-2 to 2 (vLLM `presence_penalty`)",
    "frequency_penalty": "-2 to 2 (vLLM `frequency_penalty`)",
    "logit_bias": "token id (string key) -> bias in [-100, 100]; ids outside the vocabulary are a 400",
    "logprobs": "per-token log-probabilities in OpenAI's `choices[].logprobs.content` shape, streamed too; "
    "`bytes` are the token's own, also for a token holding part of a UTF-8 character",
    "top_logprobs": "0 to 20 alternatives per token; needs `logprobs: true`",
    "response_format": "`text`; `json_object` and `json_schema` through vLLM's structured outputs (the answer "
    "is JSON, and validates against the schema); a schema is bounded and checked first (Structured outputs, below)",
    "stream": "server-sent `chat.completion.chunk` events, then `[DONE]`",
    "stream_options": "`include_usage`: a last chunk with `usage` and no choices",
    "user": "written to the access log with the request id; not stored",
    "top_k": "vLLM extra: 0 or -1 is off",
    "min_p": "vLLM extra: 0 to 1, 0 is off",
    "repetition_penalty": "vLLM extra: (0, 2], 1 is off",
    "min_tokens": "vLLM extra: no end-of-sequence (nor stop string) before this many tokens",
    "ignore_eos": "vLLM extra: generate past end-of-sequence up to max_tokens (the benchmarks use it)",
}

_NO_TOOLS = "tools and function calling are not supported: the checkpoint's chat template has no tool format"
_NO_AUDIO_OUT = "the model answers in text only"
_ENGINE_INTERNAL = "a vLLM engine control the gateway does not expose"

REFUSED = {
    # OpenAI
    "tools": _NO_TOOLS,
    "tool_choice": _NO_TOOLS,
    "parallel_tool_calls": _NO_TOOLS,
    "functions": _NO_TOOLS,
    "function_call": _NO_TOOLS,
    "audio": _NO_AUDIO_OUT,
    "modalities": _NO_AUDIO_OUT,
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "the model has no reasoning mode",
    "verbosity": "the model has no verbosity control",
    "store": "completions are not stored",
    "metadata": "completions are not stored, so there is nothing to tag",
    "service_tier": "there is one service tier",
    "prompt_cache_key": "vLLM's prefix cache needs no key",
    "safety_identifier": "there is no abuse monitoring to feed; use `user` for the access log",
    # vLLM extras
    "use_beam_search": "beam search is not exposed",
    "length_penalty": "applies to beam search only, which is not exposed",
    "include_reasoning": "the model has no reasoning mode",
    "thinking_token_budget": "the model has no reasoning mode",
    "stop_token_ids": "use `stop` strings",
    "include_stop_str_in_output": "stop strings are never returned",
    "skip_special_tokens": "special tokens are always skipped",
    "spaces_between_special_tokens": "special tokens are always skipped",
    "truncate_prompt_tokens": "prompts are never truncated: a prompt too long is a 400",
    "truncation_side": "prompts are never truncated: a prompt too long is a 400",
    "prompt_logprobs": "prompt log-probabilities are not returned",
    "logprob_token_ids": "use `top_logprobs`",
    "allowed_token_ids": "use `logit_bias` or `response_format`",
    "bad_words": "use `logit_bias`",
    "echo": "the prompt is not echoed",
    "add_generation_prompt": "the gateway renders the chat template itself",
    "continue_final_message": "the gateway renders the chat template itself",
    "add_special_tokens": "the gateway renders the chat template itself",
    "documents": "the chat template has no document format",
    "chat_template": "the checkpoint's chat template is used",
    "chat_template_kwargs": "the checkpoint's chat template is used",
    "media_io_kwargs": "audio is decoded by the gateway (16 kHz mono)",
    "mm_processor_kwargs": "audio is decoded by the gateway (16 kHz mono)",
    "structured_outputs": "use `response_format`",
    "guided_json": "use `response_format`",
    "guided_regex": "use `response_format`",
    "guided_choice": "use `response_format`",
    "guided_grammar": "use `response_format`",
    "priority": "requests are served first come, first served",
    "request_id": "the gateway assigns request ids (X-Request-ID)",
    "return_tokens_as_token_ids": "tokens are returned as text",
    "return_token_ids": "tokens are returned as text",
    "return_token_offsets": "tokens are returned as text",
    "return_prompt_text": "the prompt is not echoed",
    "return_assistant_tokens_mask": _ENGINE_INTERNAL,
    "cache_salt": _ENGINE_INTERNAL,
    "kv_transfer_params": _ENGINE_INTERNAL,
    "ec_transfer_params": _ENGINE_INTERNAL,
    "vllm_xargs": _ENGINE_INTERNAL,
    "repetition_detection": _ENGINE_INTERNAL,
    # vLLM 0.32 extras
    "routed_experts_prompt_start": _ENGINE_INTERNAL,
    "stream_interval": "the server's `--stream-interval` sets it for every stream",
    "return_mm_kwargs": _ENGINE_INTERNAL,
    "session_id": _ENGINE_INTERNAL,
    "mm_payload": "audio comes as `input_audio` or `audio_url` parts",
    "watermarking": "outputs are not watermarked",
}

# Refused by default, let through by --accept-unknown-fields: they do not change the answer.
IGNORABLE = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})


# Fields OpenAI or vLLM define inside the request's objects, refused by name like the top
# level's: by the object they are in (the last named step of their path) and their name.
NESTED_REFUSED = {
    "messages": {
        "name": "the checkpoint's chat template has no place for participant names",
        "tool_calls": _NO_TOOLS,
        "tool_call_id": _NO_TOOLS,
        "function_call": _NO_TOOLS,
        "audio": _NO_AUDIO_OUT,
        "refusal": "an assistant turn is its `content`",
        "reasoning_content": "the model has no reasoning mode",
    },
    "stream_options": {
        "continuous_usage_stats": "usage comes once, in the last chunk (`include_usage`)",
        "include_obfuscation": "stream events carry no obfuscation padding",
    },
}
# Let through by --accept-unknown-fields as well: they do not change the answer.
NESTED_IGNORABLE = frozenset({("messages", "name"), ("stream_options", "include_obfuscation")})


def extra_fields(model: BaseModel, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(object, name, path) of every key the request sent that no model declares, nested
    ones included: `messages[0].content[1].foo` is `foo` in object `content` ("" for the
    top level). A null counts as absent (OpenAI's meaning of null)."""
    container = path.rsplit(".", 1)[-1].split("[")[0]
    for name, value in (model.model_extra or {}).items():
        if value is not None:
            yield container, name, f"{path}.{name}" if path else name
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        step = f"{path}.{field.alias or name}" if path else field.alias or name
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, BaseModel):
                yield from extra_fields(item, step if index is None else f"{step}[{index}]")


def check_extra_fields(body: BaseModel, *, accept_unknown: bool, path: str = "") -> None:
    """Raise a 400 naming the first field the gateway does not honour, at any depth
    (`path`: where `body` is in the request, for an object below its top level)."""
    for container, name, where in extra_fields(body, path):
        refused = REFUSED if not container else NESTED_REFUSED.get(container, {})
        ignorable = name in IGNORABLE if not container else (container, name) in NESTED_IGNORABLE
        if name in refused and not (accept_unknown and ignorable):
            raise bad_request(f"{where} is not supported: {refused[name]}", param=where, code="unsupported_field")
        if name not in refused and not accept_unknown:
            raise bad_request(
                f"unknown field {where!r} (the server refuses fields it does not know; --accept-unknown-fields "
                "ignores them)",
                param=where,
                code="unknown_field",
            )
