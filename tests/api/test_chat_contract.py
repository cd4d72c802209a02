"""Chat completions through the official `openai` client on the tiny model: every honoured
field changes what comes back, logprobs in OpenAI's shape (streamed too), structured
outputs that parse and validate, and refused fields named in a 400."""

import json

import jsonschema
import openai
import pytest
from clips import SR, make_clip
from gateway.helpers import MODEL, audio_file, audio_part
from transformers import AutoTokenizer

from mdlserve.benchmarks.decode_pool import encode
from mdlserve.server.engine import TokenBytes

QUESTION = "Caption the audio."


def user(text: str = QUESTION, audio: bool = True) -> dict:
    parts = [audio_part(audio_file(seconds=1.0))] if audio else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_sampling_fields_shape_the_answer(oai):
    common = dict(model=MODEL, messages=[user()], max_completion_tokens=8, temperature=1.0, top_p=0.9)
    extras = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    first = oai.chat.completions.create(**common, n=2, seed=7, presence_penalty=0.5, frequency_penalty=0.5,
                                        user="tester-1", extra_body=extras)  # fmt: skip
    again = oai.chat.completions.create(**common, n=2, seed=7, presence_penalty=0.5, frequency_penalty=0.5,
                                        user="tester-1", extra_body=extras)  # fmt: skip
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens <= 16
    forced = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=6, temperature=0,
                                         extra_body={"min_tokens": 6, "ignore_eos": True})  # fmt: skip
    assert forced.usage.completion_tokens == 6 and forced.choices[0].finish_reason == "length"


def test_stop_string_ends_the_answer(oai):
    free = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=12, temperature=0)
    text = free.choices[0].message.content
    assert len(text) > 2
    stop = text[len(text) // 2 :][:4]
    stopped = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_logit_bias_forces_a_token(oai, tokenizer):
    token_id = tokenizer.encode(" dog", add_special_tokens=False)[0]
    token = tokenizer.decode([token_id])
    answer = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=5, temperature=0,
                                         logit_bias={str(token_id): 100})  # fmt: skip
    assert answer.choices[0].message.content == token * 5


def test_logit_bias_outside_the_vocabulary_is_a_400(oai, tokenizer):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=2, logit_bias={str(len(tokenizer)): 5})
    assert err.value.body["param"] == "logit_bias" and "outside the vocabulary" in err.value.body["message"]


@pytest.mark.parametrize("digits", [10, 4301, 100_000])
def test_logit_bias_token_id_of_many_digits_is_a_400(oai, digits):
    """Python's int() refuses more than 4300 digits: such a key was a 500."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=2, logit_bias={"7" * digits: 5})
    assert err.value.body["param"] == "logit_bias"
    assert f"at most 9 digits, got {digits} digits" in err.value.body["message"]


def _check_logprobs(content: list, text: str, top: int) -> None:
    # A token holding part of a UTF-8 character has no text of its own (vLLM's `token` is
    # "", U+FFFD or the character it completes), but its own bytes: together they spell the
    # answer, and the answer's U+FFFD stand for the bytes that are no UTF-8 character.
    spelled = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace")
    assert spelled.rstrip("\ufffd") == text.rstrip("\ufffd")
    for entry in content:
        if entry.token and "\ufffd" not in entry.token and len(entry.token.encode()) == len(entry.bytes):
            assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == top
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_token_bytes_come_from_the_vocabulary(tokenizer):
    """A byte-level vocabulary spells each byte as one character: an emoji split over four
    tokens gives each its one byte, though none decodes alone."""
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode("😊 café", add_special_tokens=False)
    spelled = [token_bytes(i, tokenizer.decode([i])) for i in ids]
    assert b"".join(spelled) == "😊 café".encode()
    assert spelled[:4] == [b"\xf0", b"\x9f", b"\x98", b"\x8a"]
    assert TokenBytes(None)(ids[0], "x") == b"x"  # no byte-level vocabulary: the text's UTF-8


def test_logprobs_in_openai_shape(oai):
    answer = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    _check_logprobs(content, answer.choices[0].message.content, 3)
    plain = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_give_the_bytes_of_part_of_a_character(oai, tokenizer):
    lead = tokenizer.encode("😊", add_special_tokens=False)[0]  # b"\xf0": no character alone
    answer = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=1, logit_bias={str(lead): 100})  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert [entry.bytes for entry in content] == [[0xF0]] * 3
    assert all(entry.top_logprobs[0].bytes for entry in content)  # ranked before the bias: other tokens


def test_logprobs_streamed(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[user()], max_tokens=6, temperature=0, stream=True, logprobs=True, top_logprobs=2,
        stream_options={"include_usage": True},
    )  # fmt: skip
    content, text, usage = [], "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                content.extend(choice.logprobs.content)
    assert usage is not None and len(content) == usage.completion_tokens == 6
    _check_logprobs(content, text, 2)


LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["dog", "cat", "car"]}, "loud": {"type": "boolean"}},
    "required": ["label", "loud"],
    "additionalProperties": False,
}


def test_json_schema_answer_parses_and_validates(oai):
    answer = oai.chat.completions.create(
        model=MODEL, messages=[user("Describe the sound as JSON.")], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "sound", "schema": LABEL_SCHEMA}},
    )  # fmt: skip
    value = json.loads(answer.choices[0].message.content)
    jsonschema.validate(value, LABEL_SCHEMA)


def test_json_schema_streamed_parses_and_validates(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[user("Describe the sound as JSON.")], max_tokens=200, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "sound", "schema": LABEL_SCHEMA}},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), LABEL_SCHEMA)


def test_json_object_answer_is_json(oai):
    answer = oai.chat.completions.create(model=MODEL, messages=[user("Answer in JSON.")], max_tokens=40,
                                         temperature=0, response_format={"type": "json_object"})  # fmt: skip
    text = answer.choices[0].message.content
    assert text.startswith("{")
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_invalid_json_schema_is_a_400(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL, messages=[user()], max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )  # fmt: skip
    assert "response_format" in err.value.body["param"] and "JSON Schema" in err.value.body["message"]


def test_a_schema_the_grammar_backend_cannot_compile_is_a_400_saying_why(oai):
    """A valid JSON Schema with a dangling $ref: the backend's own reason, without the time
    and C++ source line its message starts with."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL, messages=[user()], max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}},
        )  # fmt: skip
    assert err.value.body["param"] == "response_format.json_schema.schema"
    message = err.value.body["message"]
    assert message.startswith("response_format.json_schema.schema is not supported by the structured-output backend: ")
    assert "#/$defs/gone" in message and ".cc:" not in message and "[" not in message, message


def test_a_request_refused_after_its_audio_was_processed_leaves_that_audio_usable(oai):
    """The grammar backend refuses a schema only after vLLM has processed the request's
    audio. The same clip, never sent before, is then answered, twice: with vLLM's multimodal
    processor cache on, the first refusal marked the clip as held by the engine core, which
    never got it, and every later request with it was a 500."""
    clip = encode(make_clip(SR, seed=20261203), SR, "wav")
    messages = [{"role": "user", "content": [audio_part(clip), {"type": "text", "text": QUESTION}]}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}},
        )  # fmt: skip
    assert err.value.body["param"] == "response_format.json_schema.schema"
    for _ in range(2):
        answer = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2


@pytest.mark.parametrize(("schema", "words"), [
    ({"$ref": "#"}, "admits no JSON value: `$ref` '#' at # leads back to #"),
    ({"not": {}}, "uses `not` at #, which the structured-output backend does not enforce"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "`allOf` with more than one schema"),
    ({"enum": [f"value-{i}-xyz" for i in range(90000)]}, "has 90000 enum values in all; the limit is 1000"),
    # the backend's compile failed on these, and vLLM's 400 named neither keyword nor place
    ({"type": "integer", "minimum": 1.5}, 'has `minimum` 1.5 beside type "integer" at #, which the structured-output '
                                          'backend cannot compile (it takes only whole numbers as integer bounds)'),
    ({"type": ["integer", "null"], "minimum": 5, "maximum": 7, "multipleOf": 4},
     "has a range with no value at #: no integer satisfies `minimum` 5, `maximum` 7 and `multipleOf` 4"),
    # the backend compiled this, and let the answer start "p" and then allowed no token
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"$ref": "#/$defs/a"}}},
     "admits no finite JSON value at #/properties/p"),
])  # fmt: skip
def test_schemas_past_the_limits_or_not_enforceable_are_400s_and_structured_answers_go_on(oai, schema, words):
    """Refused before the engine: none of them ties up its grammar compiler (the 90000
    enum values held it for minutes), so a json_object request after them is answered."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL, messages=[user(audio=False)], max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )  # fmt: skip
    assert err.value.body["param"] == "response_format" and words in err.value.body["message"]
    answer = oai.chat.completions.create(model=MODEL, messages=[user("Answer in JSON.", audio=False)], max_tokens=4,
                                         temperature=0, response_format={"type": "json_object"})  # fmt: skip
    assert answer.choices[0].message.content.startswith("{")


# A pattern no character matches: the model writes `{"<the long name>": "`, some 30 tokens,
# and then the grammar allows no token, so the engine ends the request with finish reason
# "error" (as a schema that admits no value ends at its first token, but the gateway
# refuses those before the engine, when it can prove it).
DEAD_END = {"type": "object", "properties": {"a_long_property_name_written_before_the_dead_end": {
    "type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a_long_property_name_written_before_the_dead_end"]}  # fmt: skip


def schema_cannot_continue(**extra) -> dict:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": DEAD_END}}
    return {"model": MODEL, "messages": [user("Describe the sound as JSON.", audio=False)], "temperature": 0,
            "max_tokens": 200, "response_format": response_format, **extra}  # fmt: skip


def check_cannot_continue_error(error: dict) -> None:
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format", error
    assert error["code"] == "response_format_unsatisfiable"
    assert error["message"].startswith("the response_format schema could not be followed: "), error


def test_an_answer_the_schema_cannot_continue_is_a_400_not_a_200_with_finish_reason_error(http):
    response = http.post("/v1/chat/completions", json=schema_cannot_continue())
    assert response.status_code == 400, response.text
    check_cannot_continue_error(response.json()["error"])


def test_a_streamed_answer_the_schema_cannot_continue_ends_with_an_error_event(http):
    """The tokens before the failure are streamed, then the error envelope is the last
    event before [DONE]; no chunk says finish_reason "error". Were a busy machine to hand
    over the engine's first steps merged with the failure, the request would fail before
    its stream began, as a 400, which is asserted the same way."""
    with http.stream("POST", "/v1/chat/completions", json=schema_cannot_continue(stream=True)) as response:
        body = response.read().decode()
    if response.status_code == 400:
        check_cannot_continue_error(json.loads(body)["error"])
        return
    assert response.status_code == 200, body
    events = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    check_cannot_continue_error(json.loads(events[-2])["error"])
    chunks = [json.loads(event) for event in events[:-2]]
    assert all(choice["finish_reason"] is None for chunk in chunks for choice in chunk["choices"])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks).startswith('{"a_long_property_name')


def test_developer_role_and_audio_in_an_earlier_turn(oai):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        user(),
        {"role": "assistant", "content": "A dog barks."},
        user("And what else?", audio=False),
    ]
    answer = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    as_system = oai.chat.completions.create(model=MODEL, messages=[{**messages[0], "role": "system"}, *messages[1:]],
                                            max_tokens=4, temperature=0)  # fmt: skip
    assert answer.choices[0].message.content == as_system.choices[0].message.content
    # the earlier turn's audio counts: its tokens are in the prompt
    text_only = oai.chat.completions.create(model=MODEL, messages=[messages[0], user(audio=False), *messages[2:]],
                                            max_tokens=1, temperature=0)  # fmt: skip
    assert answer.usage.prompt_tokens > text_only.usage.prompt_tokens + 4


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "chat template"),
        ({"modalities": ["text", "audio"]}, "modalities", "text only"),
        ({"use_beam_search": True}, "use_beam_search", "beam search"),
        ({"store": True}, "store", "not stored"),
        ({"temperatur": 0.5}, "temperatur", "unknown field"),
    ],
)
def test_unsupported_fields_are_refused_by_name(oai, extra, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=2, extra_body=extra)
    assert err.value.body["param"] == param and words in err.value.body["message"]


def test_null_counts_as_absent(oai):
    answer = oai.chat.completions.create(model=MODEL, messages=[user()], max_tokens=2,
                                         extra_body={"tools": None, "metadata": None})  # fmt: skip
    assert answer.choices[0].message.content is not None
