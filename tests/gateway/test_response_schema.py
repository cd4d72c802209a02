"""response_format JSON schemas (server/response_schema.py), engine-free: the size limits,
keywords the structured-output backend would ignore, schemas that admit no value, and
the schemas real clients send; through the gateway with the fake engine, the check's 400
and that it runs off the event loop."""

import enum
import threading
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from mdlserve.server import request as request_module
from mdlserve.server.engine import generation_failed
from mdlserve.server.errors import ApiError
from mdlserve.server.request import PreparedRequest, Sampling
from mdlserve.server.response_schema import (
    MAX_DEPTH,
    MAX_ENUM_VALUES,
    MAX_LITERAL_CHARS,
    MAX_OPTIONAL_PROPERTIES,
    MAX_STRING_PATTERNS,
    MAX_SUBSCHEMAS,
    check_response_schema,
)

from .inprocess import chat_body, running_gateway

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["dog", "cat", "car"]}, "loud": {"type": "boolean"}},
    "required": ["label", "loud"],
    "additionalProperties": False,
}


def refusal(schema: dict) -> str:
    """The 400's message for `schema` (which must be refused)."""
    with pytest.raises(ApiError) as err:
        check_response_schema(schema)
    assert err.value.status == 400 and err.value.param == "response_format", err.value.message
    return err.value.message


def required_object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties)}


def nested(levels: int) -> dict:
    """An object `levels` subschema levels deep (the string at the bottom is the last)."""
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = required_object({"a": schema})
    return schema


def enum_of(count: int) -> dict:
    return {"enum": [f"v{i}" for i in range(count)]}


def subschemas(count: int) -> dict:
    """The root and count - 1 property schemas."""
    return required_object({f"k{i}": {"type": "integer"} for i in range(count - 1)})


def optional(count: int) -> dict:
    return {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(count)}}


def patterns(count: int) -> dict:
    return required_object({f"k{i}": {"type": "string", "format": "date-time"} for i in range(count)})


def literal_chars(count: int) -> dict:
    """Property names and enum values of `count` characters in all."""
    return required_object({"name": {"enum": ["x" * (count - len("name"))]}})


# (what, schema at the limit, schema one past it, words the refusal names)
LIMITS = {
    "depth": (nested(MAX_DEPTH), nested(MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels of nested subschemas"),
    "subschemas": (subschemas(MAX_SUBSCHEMAS), subschemas(MAX_SUBSCHEMAS + 1),
                   f"more than {MAX_SUBSCHEMAS} subschemas"),
    "enum values": (enum_of(MAX_ENUM_VALUES), enum_of(MAX_ENUM_VALUES + 1), f"{MAX_ENUM_VALUES + 1} enum values"),
    "characters": (literal_chars(MAX_LITERAL_CHARS), literal_chars(MAX_LITERAL_CHARS + 1),
                   f"more than {MAX_LITERAL_CHARS} characters"),
    "optional properties": (optional(MAX_OPTIONAL_PROPERTIES), optional(MAX_OPTIONAL_PROPERTIES + 1),
                            f"{MAX_OPTIONAL_PROPERTIES + 1} optional properties"),
    "patterns": (patterns(MAX_STRING_PATTERNS), patterns(MAX_STRING_PATTERNS + 1),
                 f"{MAX_STRING_PATTERNS + 1} pattern and format strings"),
}  # fmt: skip


@pytest.mark.parametrize("what", LIMITS)
def test_a_schema_at_a_limit_passes_and_one_past_it_is_refused_naming_the_limit(what):
    at_limit, past, found = LIMITS[what]
    check_response_schema(at_limit)
    message = refusal(past)
    assert found in message, message
    assert "the limit is" in message and "response_format.json_schema.schema" in message


def test_the_hostile_probes_schemas_are_refused():
    """The schemas that held the grammar compiler for minutes (90000 enum values; anyOf of
    5000 and of 300 one-property objects with a pattern) and the event loop for seconds."""
    assert "90000 enum values" in refusal({"enum": [f"value-{i}-xyz" for i in range(90000)]})
    for count in (5000, 300):
        branches = [
            {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "[a-z]{3,9}"}},
             "required": [f"k{i}"]} for i in range(count)
        ]  # fmt: skip
        assert f"more than {MAX_SUBSCHEMAS} subschemas" in refusal({"anyOf": branches})


@pytest.mark.parametrize(("schema", "named"), [
    ({"not": {}}, "`not`"),
    ({"type": "integer", "not": {"const": 3}}, "`not`"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "`if`"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "`allOf` with more than one schema"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
     "`dependentRequired`"),
    ({"type": "object", "dependencies": {"a": ["b"]}}, "`dependencies`"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "`contains`"),
    ({"items": {"type": "integer"}, "uniqueItems": True}, "`uniqueItems`"),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 5}, "`minimum` beside `$ref`"),
    ({"$ref": "https://example.com/schema.json"}, "`$ref` 'https://example.com/schema.json'"),
    ({"type": "object", "required": ["a"]}, "`required` name 'a'"),
    ({"type": "object", "properties": {"x": {"$dynamicRef": "#meta"}}}, "`$dynamicRef` at #/properties/x"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}, "`maxLength` beside `pattern`"),
    ({"type": "string", "format": "email", "minLength": 3}, "`minLength` beside `format`"),
])  # fmt: skip
def test_keywords_the_backend_does_not_enforce_are_refused_by_name(schema, named):
    message = refusal(schema)
    assert named in message and "does not enforce" in message, message


@pytest.mark.parametrize(("schema", "named"), [
    ({"$ref": "#"}, "`$ref` '#' at # leads back to #"),
    (required_object({"a": {"$ref": "#"}}), "required property 'a' at # -> `$ref` '#' at #/properties/a leads back"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     "leads back to #/$defs/a"),
    (required_object({"a": False}), "required property 'a' at # is `false`"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"},
     "item 0 (minItems 1)"),
    ({"anyOf": [{"$ref": "#"}, {"$ref": "#/anyOf/0"}]}, "every `anyOf` branch"),
])  # fmt: skip
def test_schemas_that_admit_no_value_are_refused_saying_where(schema, named):
    message = refusal(schema)
    assert "admits no JSON value" in message and named in message, message


def test_an_invalid_json_schema_is_refused():
    assert "is not a valid JSON Schema: 'nonsense'" in refusal({"type": "nonsense"})
    assert "$schema must be a string" in refusal({"$schema": []})


KEYWORDS = ["type", "properties", "required", "items", "prefixItems", "anyOf", "oneOf", "allOf", "$ref", "$defs",
            "enum", "const", "minItems", "additionalProperties", "not", "if", "pattern", "format",
            "$schema"]  # fmt: skip
WORDS = ["#", "#/$defs/a", "#/properties/a", "#/anyOf/0", "a", "object", "array", "string", "integer", "[a-z]+"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(WORDS))
SCHEMA_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from([*KEYWORDS, "a", "b"]), inner, max_size=5)),
    max_leaves=40,
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYWORDS), SCHEMA_LIKE, max_size=6))
def test_any_json_object_is_either_accepted_or_a_400(schema):
    """Any keyword may hold any JSON: the check answers a 400 or nothing, never our 500."""
    try:
        check_response_schema(schema)
    except ApiError as exc:
        assert exc.status == 400 and exc.param == "response_format"


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Tag(BaseModel):
    name: str = Field(max_length=40)
    weight: float | None = None


class Node(BaseModel):
    """Recursive, as pydantic writes it: $defs and $ref with the root referring to itself."""

    label: str
    children: list["Node"] = []


class Event(BaseModel):
    kind: Literal["bark", "horn"]
    start_s: float = Field(ge=0)
    colour: Colour
    tags: list[Tag] = Field(default_factory=list, max_length=5)
    note: str | None = Field(None, description="free text")
    when: str = Field(json_schema_extra={"format": "date-time"})


class Sounds(BaseModel):
    events: list[Event]
    tree: Node
    by_name: dict[str, int]
    pair: tuple[int, str]


@pytest.mark.parametrize("schema", [
    LABEL_SCHEMA,
    Sounds.model_json_schema(),
    Node.model_json_schema(),
    Event.model_json_schema(),
    {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]},
    {"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "description": "annotations beside $ref are fine"},
    {"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"type": "string"}}},
    {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 1},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}}, "uniqueItems": False},
])  # fmt: skip
def test_schemas_real_clients_send_pass(schema):
    check_response_schema(schema)


def test_a_finish_reason_error_is_the_clients_400_with_a_schema_and_our_500_without():
    def prepared(**structured) -> PreparedRequest:
        sampling = Sampling(n=1, max_tokens=4, temperature=0, top_p=1, seed=None, stop=(), min_tokens=0, **structured)
        return PreparedRequest([1], [], 1, 0.0, sampling)

    error = generation_failed(prepared(json_schema=LABEL_SCHEMA), "chatcmpl-x")
    assert isinstance(error, ApiError) and error.status == 400 and error.param == "response_format"
    assert error.message.startswith("the response_format schema could not be followed")
    for sampling in ({"json_object": True}, {}):
        assert not isinstance(generation_failed(prepared(**sampling), "chatcmpl-x"), ApiError)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_gateway_refuses_a_schema_past_a_limit_before_the_engine_and_off_the_event_loop(monkeypatch):
    """The check runs in a worker thread (at the limits, its metaschema check alone takes
    up to a second of Python); the refused request never reaches the engine."""
    threads: list[threading.Thread] = []

    def recording_check(schema: dict) -> None:
        threads.append(threading.current_thread())
        check_response_schema(schema)

    monkeypatch.setattr(request_module, "check_response_schema", recording_check)
    async with running_gateway() as gw:
        loop_thread = threading.current_thread()
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": enum_of(90000)}}
        refused = await gw.client.post("/v1/chat/completions", json=chat_body(response_format=response_format))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "response_format" and "90000 enum values" in error["message"]
        assert not gw.engine.submitted
        response_format["json_schema"]["schema"] = LABEL_SCHEMA
        answered = await gw.client.post("/v1/chat/completions", json=chat_body(response_format=response_format))
        assert answered.status_code == 200, answered.text
        assert gw.engine.submitted[-1].sampling.json_schema == LABEL_SCHEMA
        assert len(threads) == 2 and loop_thread not in threads
