"""response_format JSON schemas (server/response_schema/), engine-free: the size limits,
pattern repeats xgrammar cannot compile, numbers it cannot hold, keywords the
structured-output backend would ignore, schemas that admit no value, and the schemas real
clients send; through the gateway with the fake engine, the check's 400 and that it runs
off the event loop."""

import enum
import json
import math
import threading
import time
from fractions import Fraction
from typing import Literal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from mdlserve.server import request as request_module
from mdlserve.server.engine import generation_failed
from mdlserve.server.errors import ApiError
from mdlserve.server.request import PreparedRequest, Sampling
from mdlserve.server.response_schema import check_response_schema
from mdlserve.server.response_schema.limits import (
    MAX_DEPTH,
    MAX_ENUM_VALUES,
    MAX_LITERAL_CHARS,
    MAX_OPTIONAL_PROPERTIES,
    MAX_PATTERN_CHARS,
    MAX_PATTERN_REPEAT,
    MAX_PATTERN_SIZE,
    MAX_STRING_PATTERNS,
    MAX_SUBSCHEMAS,
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


def pattern(regex: str) -> dict:
    return required_object({"code": {"type": "string", "pattern": regex}})


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
    # `.` written out 1000 times: the costliest pattern of that size (xgrammar, tiny: 0.2-0.5 s)
    "pattern size": (pattern(".{125}" * 8), pattern(".{125}" * 8 + "."),
                     f"more than {MAX_PATTERN_SIZE} pattern characters in all"),
    "pattern characters": (pattern("[" + "a" * (MAX_PATTERN_CHARS - 2) + "]"),
                           pattern("[" + "a" * (MAX_PATTERN_CHARS - 1) + "]"),
                           f"more than {MAX_PATTERN_CHARS} characters of pattern strings"),
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
    # 100 s in xgrammar's compile (the engine's only compile thread), then a failure
    (pattern("a{30000}"), "`pattern` at #/properties/code that repeats a part up to 30000 times (`{30000}`)"),
    # from 129 copies on, xgrammar's compile fails: the client saw "no JSON value matches"
    (pattern(f"a{{{MAX_PATTERN_REPEAT + 1}}}"), f"up to {MAX_PATTERN_REPEAT + 1} times"),
    (pattern("a{2,500}"), "up to 500 times (`{2,500}`)"),
    (pattern("[ab]{300}"), "up to 300 times"),
    (pattern("(ab){200}"), "up to 200 times"),
    (pattern("^a{129,}$"), "at least 129 times (`{129,}`)"),
    (pattern("a{99999999999999999999999}"), "a billion or more times (`{999"),
    ({"type": "object", "patternProperties": {"^k{200}$": {"type": "integer"}}},
     "`patternProperties` key at #/patternProperties/^k{200}$ that repeats a part up to 200 times"),
    ({"propertyNames": {"pattern": "x{1000}"}}, "`pattern` at #/propertyNames that repeats"),
])  # fmt: skip
def test_a_pattern_repeat_past_what_xgrammar_compiles_is_refused_naming_it(schema, named):
    message = refusal(schema)
    assert named in message and f"at most {MAX_PATTERN_REPEAT} is allowed" in message, message
    assert message.startswith("response_format.json_schema.schema has a "), message


@pytest.mark.parametrize("regex", ["(a{100}){100}", "((a{2}){20}){30}", "a{100}{100}", "(.{64}){128}", "[a-z]+" * 1001])
def test_patterns_are_bounded_by_their_size_with_nested_repeats_multiplied(regex):
    """Nested repeats compile (xgrammar, tiny: `(a{128}){128}` 0.7-1.2 s, `(.{64}){128}`
    6.8 s), so they are bounded by the size they write out, as is a long pattern."""
    message = refusal(pattern(regex))
    assert f"more than {MAX_PATTERN_SIZE} pattern characters" in message, message
    assert "passed at the `pattern` at #/properties/code" in message, message


@pytest.mark.parametrize("regex", [
    f"a{{{MAX_PATTERN_REPEAT}}}", "a{0,128}", "a{128,}", "(a{2}){64}", "[a{300}]", "a\\{300}", "x{ 300}", "a{,300}",
    "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", "^\\d{4}-\\d{2}-\\d{2}$",
    "[^@]{1,128}@[^@]{1,128}", "(?:ab|c){3}",
])  # fmt: skip
def test_patterns_xgrammar_compiles_pass(regex):
    check_response_schema(pattern(regex))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # re.compile's, in jsonschema's format check: "nested set"
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="ab.[]^-{}(),?:<>=!|*+\\0123456789", max_size=60))
def test_any_pattern_is_either_accepted_or_a_400(regex):
    """Any text: the pattern scan answers a 400 or nothing, never our 500."""
    try:
        check_response_schema({"type": "string", "pattern": regex})
    except ApiError as exc:
        assert exc.status == 400 and exc.param == "response_format"


@pytest.mark.parametrize(("schema", "named"), [
    # vLLM's msgpack encoder raised OverflowError: our 500
    ({"enum": [123456789012345678901234567890]}, "has 123456789012345678901234567890 at #/enum/0"),
    ({"type": "integer", "const": -(2**63) - 1}, "has -9223372036854775809 at #/const"),
    # encoded, but xgrammar read it as a float: the model answered 1.8446744073709552e+19
    ({"enum": [18446744073709551615]}, "has 18446744073709551615 at #/enum/0"),
    ({"type": "integer", "default": 2**63}, "at #/default"),
    ({"type": "integer", "maximum": 2**64}, "at #/maximum"),
    (required_object({"n": {"type": "integer", "examples": [{"big": [1, 2**70]}]}}),
     "at #/properties/n/examples/0/big/1"),
    ({"type": "object", "x-limit/max~": 2**100}, "at #/x-limit~1max~0"),
    # beside "integer" the multipleOf check computes with the step and bounds: this was our 500
    ({"type": ["integer", "null"], "multipleOf": 10**400}, "has an integer of 1329 bits at #/multipleOf"),
])  # fmt: skip
def test_integers_beyond_64_bits_anywhere_are_refused_saying_where(schema, named):
    message = refusal(schema)
    assert named in message and "integers must lie within 64 bits" in message, message


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "number", "maximum": math.inf}, "has inf at #/maximum"),
    ({"enum": ["a", -math.inf]}, "has -inf at #/enum/1"),
    ({"type": "number", "examples": [math.nan]}, "has nan at #/examples/0"),
    # beside "integer" the multipleOf check computes with the step and bounds: these were our 500
    ({"type": ["integer", "null"], "multipleOf": math.inf}, "has inf at #/multipleOf"),
    ({"type": ["integer", "null"], "multipleOf": 3, "minimum": math.nan, "maximum": 5}, "has nan at #/minimum"),
])  # fmt: skip
def test_numbers_that_are_not_finite_are_refused(schema, named):
    """The gateway's JSON reader turns 1e400 into infinity and accepts NaN and Infinity,
    which json.dumps writes for the backend as text it cannot parse."""
    message = refusal(schema)
    assert named in message and "numbers must be finite" in message, message


def test_the_64_bit_edges_pass():
    check_response_schema({"enum": [2**63 - 1, -(2**63), 2**53 + 1]})
    check_response_schema({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1, "default": 0})


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
    # xgrammar reads these pointers otherwise than JSON Schema (test_xgrammar_reads_pointer_names_as_written)
    ({"$defs": {"a/b": {"type": "integer"}}, **required_object({"p": {"$ref": "#/$defs/a~1b"}})},
     "`$ref` '#/$defs/a~1b' at #/properties/p, which the structured-output backend does not enforce: it reads a "
     "pointer's escapes as written, looking for the name 'a~1b' where JSON Schema reads 'a/b'; rename the target"),
    ({"$defs": {"c~d": {"type": "integer"}}, "$ref": "#/$defs/c~0d"}, "looking for the name 'c~0d' where JSON Schema"),
    ({"$defs": {"a%b": {"type": "integer"}}, "$ref": "#/$defs/a%25b"},
     "the name 'a%25b' where JSON Schema reads 'a%b'"),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a/"}, "`$ref` '#/$defs/a/' at #"),
    ({"": {"type": "integer"}, **required_object({"p": {"$ref": "#/"}})},
     'it skips an empty name in a pointer (`//`, or a `/` at its end) where JSON Schema looks for the name ""'),
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
    ({"$defs": {"a": {"$ref": "#"}}, "anyOf": [{"$ref": "#"}, {"$ref": "#/$defs/a"}]}, "every `anyOf` branch"),
    # xgrammar emits enum and const values as they are, reading nothing beside them: these
    # were answered with JSON that breaks the schema
    ({"type": "integer", "const": "a"}, '`const` "a" at # is not of its `type` "integer"'),
    ({"type": "string", "enum": [1, 2]},
     'every `enum` value at # breaks a keyword beside it (the first, 1, is not of its `type` "string")'),
    ({"type": "integer", "enum": [True, 1.5]}, 'the first, true, is not of its `type` "integer"'),
    ({"type": "number", "const": False}, "`const` false at # is not of its `type`"),
    ({"type": ["integer", "null"], "enum": ["1"]}, 'is not of its `type` ["integer", "null"]'),
    ({"type": "number", "minimum": 5, "enum": [1, 4.5]}, "is below its `minimum` 5"),
    ({"type": "number", "exclusiveMaximum": 1, "const": 1}, "`const` 1 at # is not below its `exclusiveMaximum` 1"),
    ({"type": "string", "maxLength": 2, "enum": ["abc", "abcd"]}, 'the first, "abc", is longer than its `maxLength` 2'),
    ({"type": "array", "minItems": 2, "const": [1]}, "is fewer items than its `minItems` 2"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a"], "const": {"b": 1}},
     'lacks its `required` property "a"'),
    ({"enum": []}, "`enum` at # is empty"),
    (required_object({"n": {"type": "integer", "const": "a"}}),
     "required property 'n' at # -> `const` \"a\" at #/properties/n is not of its `type`"),
    # nor pattern, format or multipleOf beside them: each was answered as written
    ({"type": "string", "pattern": "^a+$", "enum": ["b"]},
     'every `enum` value at # breaks a keyword beside it (the first, "b", does not match its `pattern` "^a+$")'),
    ({"pattern": "^a+$", "const": "b"}, '`const` "b" at # does not match its `pattern` "^a+$"'),
    ({"type": "integer", "multipleOf": 3, "const": 4}, "`const` 4 at # is not a multiple of its `multipleOf` 3"),
    ({"multipleOf": 3, "const": 4}, "`const` 4 at # is not a multiple of its `multipleOf` 3"),
    ({"multipleOf": 0.1, "const": 0.35}, "`const` 0.35 at # is not a multiple of its `multipleOf` 0.1"),
    ({"type": "string", "format": "email", "const": "x"}, '`const` "x" at # is not of its `format` "email"'),
    ({"format": "date", "const": "2024-13-45"}, '`const` "2024-13-45" at # is not of its `format` "date"'),
])  # fmt: skip
def test_schemas_that_admit_no_value_are_refused_saying_where(schema, named):
    message = refusal(schema)
    assert "admits no JSON value" in message and named in message, message


# Trees (the root one, and one in $defs), and a subschema that refers to itself with a way
# out (xgrammar's grammar for it takes the integers alone); $defs entries that lead back to
# themselves with none.
TREE = {"type": "object", "properties": {"kind": {"const": "node"},
                                         "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["kind", "children"]}  # fmt: skip
NODES = {"$defs": {"n": required_object({"kind": {"const": "node"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/n"}}})}}  # fmt: skip
LEFT_RECURSIVE = {"anyOf": [{"$ref": "#/$defs/x"}, {"type": "integer"}]}
SELF = {"$defs": {"a": {"$ref": "#/$defs/a"}}}
NO_END = {"$defs": {"n": required_object({"q": {"$ref": "#/$defs/n"}})}}
RING = {"$defs": {f"a{i}": {"$ref": f"#/$defs/a{(i + 1) % 400}"} for i in range(400)}}


@pytest.mark.parametrize(("schema", "named"), [
    # xgrammar 0.2.8 took `{"p": ` and then allowed no token (the engine's finish reason
    # "error"); with NO_END it wrote `{"p": {"q": {"q": ` on to the token limit
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}}} | SELF,
     "admits no finite JSON value at #/properties/p (an answer may still start one there, which the structured-output "
     "backend would never end): `$ref` '#/$defs/a' at #/properties/p -> `$ref` '#/$defs/a' at #/$defs/a leads back to "
     "#/$defs/a, so no finite value can end it"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/n"}}} | NO_END,
     "at #/properties/p (an answer may still start one there, which the structured-output backend would never end): "
     "`$ref` '#/$defs/n' at #/properties/p -> required property 'q' at #/$defs/n -> `$ref` '#/$defs/n' at "
     "#/$defs/n/properties/q leads back to #/$defs/n"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}},
      "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}},
     "-> `allOf` at #/$defs/b -> `$ref` '#/$defs/a' at #/$defs/b/allOf/0 leads back to #/$defs/a"),
    ({"type": "array", "items": {"$ref": "#/$defs/n"}} | NO_END, "admits no finite JSON value at #/items"),
    ({"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]} | NO_END, "admits no finite JSON value at #/$defs/n"),
    # where no $ref leads to it either: a schema that cannot be answered is a mistake
    ({"type": "integer"} | SELF, "admits no finite JSON value at #/$defs/a"),
    # a long chain shows its first and last three steps
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/a0"}}} | RING,
     "`$ref` '#/$defs/a2' at #/$defs/a1 -> (395 more) -> `$ref` '#/$defs/a398' at #/$defs/a397"),
])  # fmt: skip
def test_a_subschema_that_admits_no_value_through_a_cycle_is_refused_wherever_it_is(schema, named):
    message = refusal(schema)
    assert named in message, message


@pytest.mark.parametrize("schema", [
    TREE, {"$defs": {"x": LEFT_RECURSIVE}, "type": "array", "items": {"$ref": "#/$defs/x"}},
    {"type": "object", "properties": {"label": {"enum": ["a", "b"]}, "children": {"type": "array",
                                                                                  "items": {"$ref": "#"}}},
     "required": ["label", "children"]},
    # an optional property, a branch or an item is a way out
    {"type": "object", "properties": {"next": {"$ref": "#"}}},
    {"$defs": {"n": {"anyOf": [required_object({"q": {"$ref": "#/$defs/n"}}), {"type": "null"}]}}, "$ref": "#/$defs/n"},
    {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"},
])  # fmt: skip
def test_recursive_schemas_with_a_way_out_pass(schema):
    check_response_schema(schema)


def _chain(steps: int, step: dict) -> dict:
    """$defs a0 ... a`steps`: each `step` with its "{next}" the next one's name, the last an integer."""
    chain = {f"a{i}": json.loads(json.dumps(step).replace("{next}", f"a{i + 1}")) for i in range(steps)}
    return {"$defs": chain | {f"a{steps}": {"type": "integer"}}}


def _tree(depth: int, leaf: str) -> dict:
    value = {"kind": leaf, "children": []}
    for _ in range(depth):
        value = {"kind": "node", "children": [value]}
    return value


HOSTILE_REFS = {
    # (schema, words of its 400, or None where it passes)
    "a chain of 480 $refs": ({"type": "object", "properties": {"p": {"$ref": "#/$defs/a0"}}, "required": ["p"]}
                             | _chain(480, {"$ref": "#/$defs/{next}"}), None),
    "a const 60 levels down a tree": ({"type": "object", "properties": {"t": {"$ref": "#/$defs/n"}},
                                       "const": {"t": _tree(60, "leaf")}} | NODES,
                                      "(at /t" + "/children/0" * 60 + "/kind: 'node' was expected)"),
    "a $ref to no name": ({"type": "object", "properties": {"p": {"$ref": "#/$defs/gone/a"}}}, None),
    "a $ref through 100000 names": ({"$ref": "#" + "/a" * 100000}, None),
    "a $ref to a file": ({"$ref": "file:///etc/passwd"}, "uses `$ref` 'file:///etc/passwd' at #"),
    "a $ref with %00": ({"$defs": {"a\u0000": {"type": "integer"}}, "$ref": "#/$defs/a%00"}, "where JSON Schema reads"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE_REFS)
def test_hostile_refs_end_in_a_400_or_pass(case):
    """Chains, rings and pointers built to make the check recurse without end or fail:
    nothing recurses past a bound (the walk's depth limit, the value check's own), and
    none is our 500."""
    schema, named = HOSTILE_REFS[case]
    if named is None:
        check_response_schema(schema)
    else:
        message = refusal(schema)
        assert named in message, message


def _nested_value(levels: int, leaf: object) -> object:
    """{"c": {"c": ... leaf}} `levels` deep."""
    value = leaf
    for _ in range(levels):
        value = {"c": value}
    return value


def _level_chain(steps: int, levels: int) -> dict:
    """$defs a0 ... a`steps`: each an object `levels` deep (property "c", required) whose
    innermost "c" is a $ref to the next or null; the last an integer."""
    chain = {}
    for i in range(steps):
        inner: dict = {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"}, {"type": "null"}]}
        for _ in range(levels):
            inner = required_object({"c": inner})
        chain[f"a{i}"] = inner
    return {"$defs": chain | {f"a{steps}": {"type": "integer"}}}


# Values checked through more $refs, each inside the last, than one jsonschema call can
# follow within Python's recursion limit (240 anyOf and $ref steps took it past; each is a
# few frames of jsonschema's): (schema, answer xgrammar took (None: it takes none), words
# of the 400 or None where it passes). Each const is emitted as it is; a const that
# breaks the integer at a chain's end is refused, not passed unchecked.
PROPERTY_P = {"type": "object", "properties": {"p": {"$ref": "#/$defs/a0"}}}
RECURSIVE_C = {"$defs": {"n": {"anyOf": [{"type": "integer"}, required_object({"c": {"$ref": "#/$defs/n"}})]}},
               "type": "object", "properties": {"v": {"$ref": "#/$defs/n"}}}
DEEP_VALUES = {
    "240 anyOf and $ref steps, a string at the end": (
        PROPERTY_P | _chain(240, {"anyOf": [{"$ref": "#/$defs/{next}"}]}) | {"const": {"p": "x"}}, '{"p":"x"}',
        "`const` {\"p\": \"x\"} at # does not validate against the keywords beside it (at /p: 'x' is not valid "
        "under any of the given schemas)"),
    "240 anyOf and $ref steps, an integer at the end": (
        PROPERTY_P | _chain(240, {"anyOf": [{"$ref": "#/$defs/{next}"}]}) | {"const": {"p": 1}}, '{"p":1}', None),
    "490 $ref steps, an enum value at the end": (
        PROPERTY_P | _chain(490, {"$ref": "#/$defs/{next}"}) | {"enum": [{"p": 1}, {"p": "x"}]}, '{"p":"x"}',
        "`enum` value {\"p\": \"x\"} at #/enum/1 does not validate against the keywords beside it (at /p: 'x' is "
        "not of type 'integer')"),
    "20 steps of 8 object levels each": (
        PROPERTY_P | _level_chain(20, 8) | {"const": {"p": _nested_value(160, "x")}}, None,
        "does not validate against the keywords beside it (at /p" + "/c" * 8 + ": "),
    "20 steps of 8 object levels each, an integer at the end": (
        PROPERTY_P | _level_chain(20, 8) | {"const": {"p": _nested_value(160, 7)}}, None, None),
    "a value 190 levels down a recursive $ref": (
        RECURSIVE_C | {"const": {"v": _nested_value(190, "x")}}, None, "(at /v: {'c': {'c': "),
    "a value 190 levels down a recursive $ref, an integer at the end": (
        RECURSIVE_C | {"const": {"v": _nested_value(190, 1)}}, None, None),
    "two values 190 levels deep compared by a const": (
        {"type": "object", "properties": {"v": {"const": _nested_value(190, 1)}}, "const": {"v": _nested_value(190, 2)}},
        None, "(at /v: {'c': {'c': "),
}  # fmt: skip


@pytest.mark.parametrize("case", DEEP_VALUES)
def test_a_value_checked_through_deep_refs_is_checked_to_its_end(case):
    """The value check hands each fourth $ref inside another to a call of its own: a value
    that breaks a keyword any number of $refs down is refused, one that keeps them passes,
    and neither ends in a RecursionError, nor passes unchecked."""
    schema, _, named = DEEP_VALUES[case]
    if named is None:
        check_response_schema(schema)
    else:
        message = refusal(schema)
        assert named in message, message


@pytest.mark.parametrize("case", [case for case in DEEP_VALUES if DEEP_VALUES[case][1] is not None])
def test_xgrammar_compiles_deep_ref_chains_and_emits_their_const(grammar_compiler, case):
    """What the refusals above rest on: xgrammar 0.2.8 compiles each chain (2000 steps
    compiled too, in 0.2 s) and takes its const or enum value as written, whatever it
    breaks at the chain's end."""
    schema, answer, _ = DEEP_VALUES[case]
    assert xgrammar_accepts(grammar_compiler, schema, answer)


def test_a_value_check_that_recurses_too_deep_all_the_same_is_a_400_naming_the_value(monkeypatch):
    """A RecursionError in the value check (none is known: this one is forced) is a 400
    naming the value's place, neither our 500 nor a pass."""
    from mdlserve.server.response_schema import value_check

    class Recursing:
        def evolve(self, schema):
            return self

        def iter_errors(self, value):
            raise RecursionError

    monkeypatch.setattr(value_check, "_value_validator", lambda check: Recursing())
    message = refusal({"type": "object", "properties": {"q": {"type": "object", "const": {"p": 1}}}})
    assert "values at #/properties/q whose check against the keywords beside them nests too deep" in message


@pytest.mark.parametrize(("schema", "named"), [
    # xgrammar emits every enum value as it is: this one took 1
    ({"type": "string", "enum": ["a", 1]}, '`enum` value 1 at #/enum/1 is not of its `type` "string"'),
    ({"type": "integer", "minimum": 5, "enum": [6, 1]}, "`enum` value 1 at #/enum/1 is below its `minimum` 5"),
    ({"type": "string", "maxLength": 2, "enum": ["ab", "abc"]}, '`enum` value "abc" at #/enum/1 is longer than'),
    ({"type": "array", "minItems": 2, "enum": [[1, 2], [1]]}, "`enum` value [1] at #/enum/1 is fewer items than"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a"], "enum": [{"a": 1}, {"b": 1}]},
     '`enum` value {"b": 1} at #/enum/1 lacks its `required` property "a"'),
    # optional properties: the schema admits {} too, but xgrammar took {"x": 1}
    ({"type": "object", "properties": {"x": {"type": "string", "enum": ["a", 1]}}},
     '`enum` value 1 at #/properties/x/enum/1 is not of its `type` "string"'),
    ({"type": "object", "properties": {"x": {"type": "string", "enum": [1, 2]}}},
     '`enum` value 1 at #/properties/x/enum/0 is not of its `type` "string"'),
    ({"type": "object", "properties": {"x": {"type": "integer", "const": "a"}}},
     '`const` "a" at #/properties/x/const is not of its `type` "integer"'),
    # a const beside an enum is emitted without the enum: xgrammar took {"x": "c"}
    ({"type": "object", "properties": {"x": {"const": "c", "enum": ["a", "b"]}}},
     '`const` "c" at #/properties/x/const is not among its `enum` values'),
    ({"$defs": {"d": {"type": "boolean", "enum": [True, "no"]}}, "$ref": "#/$defs/d"},
     '`enum` value "no" at #/$defs/d/enum/1 is not of its `type` "boolean"'),
    # xgrammar 0.2.8 emitted each of these too: "b", 4, "x", "999.1.1.1", {"x": "b"}
    ({"type": "string", "pattern": "^a+$", "enum": ["a", "b"]},
     '`enum` value "b" at #/enum/1 does not match its `pattern` "^a+$"'),
    ({"type": ["integer", "null"], "multipleOf": 3, "enum": [3, None, 4]},
     "`enum` value 4 at #/enum/2 is not a multiple of its `multipleOf` 3"),
    ({"multipleOf": 0.1, "enum": [0.7, 1.1, 0.35]}, "`enum` value 0.35 at #/enum/2 is not a multiple of"),
    ({"type": "string", "format": "email", "enum": ["a@b.co", "x"]},
     '`enum` value "x" at #/enum/1 is not of its `format` "email"'),
    ({"type": "string", "format": "ipv4", "enum": ["1.2.3.4", "999.1.1.1"]},
     '`enum` value "999.1.1.1" at #/enum/1 is not of its `format` "ipv4"'),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "^a", "const": "b"}}},
     '`const` "b" at #/properties/x/const does not match its `pattern` "^a"'),
])  # fmt: skip
def test_an_enum_or_const_value_breaking_a_keyword_beside_it_is_refused_naming_it(schema, named):
    message = refusal(schema)
    assert named in message and "the structured-output backend would answer it" in message, message
    assert "admits no JSON value" not in message, message


@pytest.mark.parametrize(("schema", "named"), [
    # xgrammar 0.2.8 emits object and array values as written (compactly), reading no keyword
    # beside them: it took {"a":"x"}, ["a"], {"b":1}, [1] and {"p":{"a":"x"}} for these
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "const": {"a": "x"}},
     "admits no JSON value: `const` {\"a\": \"x\"} at # does not validate against the keywords beside it "
     "(at /a: 'x' is not of type 'integer')"),
    ({"type": "array", "items": {"type": "integer"}, "enum": [[1], ["a"]]},
     "`enum` value [\"a\"] at #/enum/1 does not validate against the keywords beside it (at /0: "),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False, "enum": [{"a": 1}, {"b": 1}]},
     "`enum` value {\"b\": 1} at #/enum/1 does not validate against the keywords beside it (Additional properties"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False, "enum": [["a"], [1]]},
     "`enum` value [1] at #/enum/1 does not validate against the keywords beside it (at /0: 1 is not of type"),
    ({"type": "object", "properties": {"p": {"type": "object", "properties": {"a": {"$ref": "#/$defs/i"}},
                                             "const": {"a": "x"}}}, "$defs": {"i": {"type": "integer"}}},
     "`const` {\"a\": \"x\"} at #/properties/p/const does not validate against the keywords beside it (at /a: "),
    # a pattern, format or multipleOf deep in the value counts as beside a string or number value
    ({"type": "object", "additionalProperties": {"type": "string", "pattern": "^a"}, "enum": [{"k": "a"}, {"k": "b"}]},
     '(at /k: "b" does not match its `pattern` "^a")'),
    ({"type": "array", "items": {"type": "string", "format": "email"}, "enum": [["a@b.co"], ["a@b.co", "x"]]},
     '(at /1: "x" is not of its `format` "email")'),
    ({"type": "array", "items": {"type": ["integer"], "multipleOf": 3}, "enum": [[3], [3, 4]]},
     "(at /1: 4 is not a multiple of its `multipleOf` 3)"),
    # under a $ref cycle too: xgrammar's grammar for x takes the integers alone (the check
    # gave up on it, recursing past Python's limit, and passed it)
    ({"$defs": {"x": LEFT_RECURSIVE}, "type": "object", "properties": {"p": {"$ref": "#/$defs/x"}},
      "const": {"p": "a"}}, "(at /p: 'a' is not valid under any of the given schemas)"),
    ({"type": "object", "properties": {"t": {"$ref": "#/$defs/n"}}, "const": {"t": {
        "kind": "node", "children": [{"kind": "node", "children": [{"kind": "leaf", "children": []}]}]}}} | NODES,
     "(at /t/children/0/children/0/kind: 'node' was expected)"),
])  # fmt: skip
def test_an_object_or_array_enum_or_const_value_breaking_the_keywords_beside_it_is_refused_naming_it(schema, named):
    message = refusal(schema)
    assert named in message, message


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "const": {"a": 1}},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/i"}}, "$defs": {"i": {"type": "integer"}},
     "enum": [{"a": 1}, {"a": 2.0}, {}]},
    {"type": "array", "items": {"type": "string", "pattern": "^a"}, "const": ["ab", "a"]},
    # oneOf as xgrammar reads it: 1 is taken by both branches, which JSON Schema's oneOf refuses
    {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "const": {"a": 1.5}},
    # which keys patternProperties match goes unchecked, and so does additionalProperties beside it
    {"type": ["object"], "patternProperties": {"^a": {"type": "integer"}}, "additionalProperties": False,
     "const": {"ab": 1}},
    # draft-07 reads 1.0 as no integer, but xgrammar emits it as 1
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"a": {"type": "integer"}},
     "const": {"a": 1.0}},
    # under a $ref cycle, read as xgrammar's grammar: 1 takes the integer branch
    {"$defs": {"x": LEFT_RECURSIVE}, "type": "object", "properties": {"p": {"$ref": "#/$defs/x"}}, "const": {"p": 1}},
    {"type": "object", "properties": {"t": {"$ref": "#/$defs/n"}},
     "enum": [{"t": {"kind": "node", "children": [{"kind": "node", "children": []}]}}, {}]} | NODES,
])  # fmt: skip
def test_an_object_or_array_enum_or_const_value_that_validates_passes(schema):
    check_response_schema(schema)


@pytest.mark.parametrize("regex", ["^(a|a)*$", "^(a+)+$"])
def test_a_nested_value_check_that_backtracks_or_branches_for_hours_ends(regex):
    """A pattern deep in a value is searched as a string value's is (re would backtrack for
    hours), and anyOf branches through a $ref, which multiply, run under a deadline (the
    checks of $refs four deep, kept for the branches after, make these few enough to end
    before it, refusing the 0 at the bottom, which is neither array nor string)."""
    deep: object = 0
    for _ in range(60):
        deep = [deep]
    branching = {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/x"}}] * 2 + [{"type": "string"}]}
    started = time.monotonic()
    try:  # a search cut short refuses nothing; one the regex module finishes refuses rightly
        check_response_schema({"type": "array", "items": {"type": "string", "pattern": regex},
                               "const": ["a" * 3000 + "b"]})  # fmt: skip
    except ApiError as exc:
        assert f"does not match its `pattern` {json.dumps(regex)}" in exc.message, exc.message
    try:  # a check cut short refuses nothing
        check_response_schema({"$defs": {"x": branching}, "type": "object", "properties": {"p": {"$ref": "#/$defs/x"}},
                               "const": {"p": deep}})  # fmt: skip
    except ApiError as exc:
        assert "(at /p: [[[" in exc.message and "is not valid under any of the given schemas" in exc.message
    assert time.monotonic() - started < 3


OBJECT_SCHEMAS = st.one_of(
    st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.fixed_dictionaries({}, optional={"a": st.sampled_from([{"type": "integer"}, {"type": "string"},
                                                                                  {"const": 1}, {"type": "array"}]),
                                                           "b": st.sampled_from([{}, {"type": "integer"}, False])}),
        "additionalProperties": st.sampled_from([False, True, {"type": "integer"}, {"type": "string"}]),
        "minProperties": st.integers(0, 2),
    }),
    st.fixed_dictionaries({"type": st.just("array")}, optional={
        "items": st.sampled_from([False, True, {"type": "integer"}, {"type": "string", "pattern": "^a"}]),
        "prefixItems": st.lists(st.sampled_from([{"type": "integer"}, {"type": "string"}, {"enum": [0, "a"]}]),
                                min_size=1, max_size=2),
        "maxItems": st.integers(0, 2),
    }),
)  # fmt: skip
NESTED_VALUES = st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(st.integers(0, 1), st.sampled_from(["a", "b"]),
                                                                  st.just([])), max_size=3),
    st.lists(st.one_of(st.integers(0, 1), st.sampled_from(["a", "ab", "b"])), max_size=3),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OBJECT_SCHEMAS, st.lists(NESTED_VALUES, min_size=1, max_size=3), st.booleans())
def test_object_and_array_values_are_refused_exactly_when_one_emitted_does_not_validate(schema, values, optional):
    """Against jsonschema: an object or array enum value is refused (naming it) exactly
    when it breaks the keywords beside it, down to its items and properties."""
    schema = {**schema, "enum": values}
    valid = [Draft202012Validator(schema).is_valid(value) for value in values]
    try:
        check_response_schema({"type": "object", "properties": {"p": schema}} if optional else schema)
    except ApiError as exc:
        assert not all(valid), exc.message
        assert "the structured-output backend would answer it" in exc.message or "admits no JSON value" in exc.message
    else:
        assert all(valid)


@pytest.mark.parametrize("schema", [
    # JSON Schema's pattern is an unanchored search
    {"type": "string", "pattern": "a", "const": "bab"},
    {"type": "string", "pattern": "^[a-z]+-\\d{2}$", "enum": ["ab-12", "x-00"]},
    # exact in decimals: 0.3 / 0.1 is 2.9999999999999996 in floats, 0.7 / 0.1 6.999999999999999
    {"multipleOf": 0.1, "enum": [0.3, 0.7, 1.1, 2, 0]},
    {"type": ["number", "null"], "multipleOf": 0.01, "const": 19.99},
    {"type": ["integer", "null"], "multipleOf": 3, "enum": [-3, 0, 6, 9223372036854775806, None]},
    {"multipleOf": 0.5, "const": 1e300},
    {"type": "string", "format": "email", "enum": ["a@b.co", "x.y@example.org"]},
    {"type": "string", "format": "date", "const": "2024-02-29"},
    {"type": "string", "format": "uuid", "const": "123e4567-e89b-12d3-a456-426614174000"},
    # formats xgrammar does not enforce (vLLM refuses them beside "type": "string") are not read
    {"format": "x-custom", "const": "anything"},
    # ECMA-262 (JSON Schema's dialect) matches these; Python alone would not: \D and \s are
    # ASCII to one of its modes and Unicode to the other, `{,2}` and `\Z` are literals to ECMA
    {"type": "string", "pattern": "^\\D$", "const": "\u0663"},
    {"type": "string", "pattern": "^a\\sb$", "const": "a\u00a0b"},
    {"type": "string", "pattern": "^a{,2}$", "const": "a{,2}"},
    {"type": "string", "pattern": "^a\\Z", "const": "aZ"},
])  # fmt: skip
def test_an_enum_or_const_value_matching_its_pattern_format_and_multipleof_passes(schema):
    check_response_schema(schema)


@pytest.mark.parametrize("regex", ["^(a|a)*$", "^(a+)+$", "^" + "a*" * 12 + "$"])
def test_a_pattern_search_that_backtracks_for_hours_ends(regex):
    """Python's re searches these for hours (holding the GIL: the whole gateway). The
    check's searches share a deadline of a fraction of a second, and one cut short refuses
    nothing; one the regex module finishes (it sees through `(a+)+`) refuses rightly."""
    started = time.monotonic()
    try:
        check_response_schema({"type": "string", "pattern": regex, "enum": ["a" * 3000 + "!", "a" * 60 + "?"]})
    except ApiError as exc:
        assert f"does not match its `pattern` {json.dumps(regex)}" in exc.message, exc.message
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("schema", "named"), [
    ({"const": "c", "enum": ["a", "b"]}, '`const` "c" at # is not among its `enum` values'),
    ({"const": True, "enum": [1, 2]}, "`const` true at # is not among its `enum` values"),
    ({"const": {"a": [1]}, "enum": [{"a": [1, 2]}]}, "is not among its `enum` values"),
    (required_object({"k": {"type": "integer", "const": 1.5, "enum": [1.5]}}),
     "required property 'k' at # -> `const` 1.5 at #/properties/k is not of its `type` \"integer\""),
])  # fmt: skip
def test_a_const_not_among_the_enum_beside_it_admits_no_value(schema, named):
    """xgrammar emits the const and reads no enum beside it ({"const": "c", "enum": ["a",
    "b"]} took "c"), so a const the enum lacks leaves no value that validates."""
    message = refusal(schema)
    assert "admits no JSON value" in message and named in message, message


@pytest.mark.parametrize("schema", [
    {"const": "a", "enum": ["a", "b"]},
    {"const": 1, "enum": [1.0, 2]},
    {"const": {"a": 1, "b": [True]}, "enum": [{"b": [True], "a": 1}]},
    # the enum beside a const is never emitted, so its other values cannot be answered
    {"type": "string", "const": "a", "enum": ["a", 1]},
])  # fmt: skip
def test_a_const_among_the_enum_beside_it_passes(schema):
    check_response_schema(schema)


@pytest.mark.parametrize(("schema", "named", "instead"), [
    # xgrammar reads each as any JSON value: it took every answer in the comment
    ({"minLength": 3}, "`minLength` without `type` at #", 'add "type": "string"'),  # "a"
    ({"maxLength": 1}, "`maxLength` without `type`", 'add "type": "string"'),  # "abc"
    ({"pattern": "^a$"}, "`pattern` without `type`", 'add "type": "string"'),  # "b"
    ({"format": "email"}, "`format` without `type`", 'add "type": "string"'),  # "a"
    ({"minItems": 2}, "`minItems` without `type`", 'add "type": "array"'),  # [1]
    ({"maxItems": 1}, "`maxItems` without `type`", 'add "type": "array"'),  # [1, 2]
    ({"minimum": 5}, "`minimum` without `type`", 'add "type": "number"'),  # 3
    ({"exclusiveMinimum": 5}, "`exclusiveMinimum` without `type`", 'add "type": "number"'),  # 5
    ({"maximum": 5}, "`maximum` without `type`", 'add "type": "number"'),  # 6
    ({"minProperties": 1}, "`minProperties` without `type`", 'add "type": "object"'),  # {}
    ({"maxProperties": 0}, "`maxProperties` without `type`", 'add "type": "object"'),  # {"a": 1}
    # beside "type": "object" (or "number") vLLM refuses these for xgrammar
    ({"patternProperties": {"^a$": {"type": "integer"}}}, "`patternProperties` without `type`",
     "vLLM refuses it for this backend; name the keys in `properties`"),  # {"a": "x"}
    ({"propertyNames": {"pattern": "^a$"}}, "`propertyNames` without `type`",
     "vLLM refuses it for this backend; name the keys in `properties`"),  # {"b": 1}
    ({"multipleOf": 5}, "`multipleOf` without `type`", "vLLM refuses it for this backend"),  # 3
    (required_object({"n": {"description": "a count", "minimum": 0}}), "`minimum` without `type` at #/properties/n",
     'add "type": "number"'),
    # through a $ref or an anyOf branch a key schema is any JSON value too: {"b": 1} was taken
    ({"type": ["object"], "propertyNames": {"$ref": "#/$defs/k"}, "$defs": {"k": {"pattern": "^a$"}}},
     "`pattern` without `type` at #/$defs/k", 'add "type": "string"'),
])  # fmt: skip
def test_keywords_of_one_type_in_a_subschema_without_a_type_are_refused_by_name(schema, named, instead):
    message = refusal(schema)
    assert named in message and "does not enforce" in message and "as any JSON value" in message, message
    assert instead in message, message


@pytest.mark.parametrize("schema", [
    # xgrammar infers the type from these, or reads a type list type by type: all enforced
    {"properties": {"a": {"type": "integer"}}, "minProperties": 1},
    {"additionalProperties": {"type": "integer"}, "maxProperties": 2},
    {"properties": {"a": {"type": "integer"}}, "patternProperties": {"^b$": {"type": "integer"}}},
    {"items": {"type": "integer"}, "minItems": 2},
    {"prefixItems": [{"type": "integer"}], "items": False, "maxItems": 1},
    {"type": ["string", "null"], "minLength": 3},
    {"type": ["string", "null"], "pattern": "^a$"},
    {"type": ["integer", "null"], "minimum": 5},
    {"type": ["object", "null"], "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    # a propertyNames subschema is read as a string's
    {"type": ["object"], "propertyNames": {"pattern": "^a$"}},
    # beside an enum or const the values are checked against them instead
    {"enum": ["abc", "abcd"], "minLength": 3},
    {"const": 7, "minimum": 5},
])  # fmt: skip
def test_keywords_of_one_type_where_xgrammar_knows_the_type_pass(schema):
    check_response_schema(schema)


@pytest.mark.parametrize(("schema", "named", "instead"), [
    # xgrammar 0.2.8 reads only the anyOf/oneOf/allOf and ignores every keyword beside it:
    # each took the answer in the comment
    ({"type": "string", "anyOf": [{"type": "string"}, {"type": "integer"}]}, "`type` beside `anyOf` at #",
     "move `type` into each `anyOf` branch"),  # 1
    ({"anyOf": [{"type": "integer"}, {"type": "number"}], "minimum": 3}, "`minimum` beside `anyOf`",
     "move `minimum` into each `anyOf` branch"),  # 1
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "maxLength": 1}, "`maxLength` beside `anyOf`",
     "each `anyOf` branch"),  # "abc"
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "pattern": "^a+$"}, "`pattern` beside `anyOf`",
     "each `anyOf` branch"),  # "b"
    ({"anyOf": [{"type": "array"}, {"type": "null"}], "items": {"type": "integer"}}, "`items` beside `anyOf`",
     "each `anyOf` branch"),  # ["a"]
    ({"anyOf": [{"type": "object"}, {"type": "null"}], "minProperties": 1}, "`minProperties` beside `anyOf`",
     "each `anyOf` branch"),  # {}
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, "`type` beside `anyOf`", "each `anyOf` branch"),  # {}
    ({"anyOf": [{"type": "object"}, {"type": "null"}], "required": ["a"]}, "`required` beside `anyOf`",
     "each `anyOf` branch"),  # {}
    ({"anyOf": [{"type": "integer"}, {"type": "string"}], "oneOf": [{"type": "integer"}]},
     "`oneOf` beside `anyOf`", "each `anyOf` branch"),  # "a"
    ({"anyOf": [{"type": "string"}, {"type": "integer"}], "allOf": [{"type": "string"}]},
     "`allOf` beside `anyOf`", "each `anyOf` branch"),  # 1
    ({"type": "string", "oneOf": [{"type": "string"}, {"type": "integer"}]}, "`type` beside `oneOf`",
     "move `type` into each `oneOf` branch"),  # 1
    ({"oneOf": [{"type": "integer"}, {"type": "number"}], "exclusiveMinimum": 3},
     "`exclusiveMinimum` beside `oneOf`", "each `oneOf` branch"),  # 1
    ({"oneOf": [{"type": "object"}, {"type": "null"}], "additionalProperties": False},
     "`additionalProperties` beside `oneOf`", "each `oneOf` branch"),  # {"b": 1}
    # a one-schema allOf too
    ({"allOf": [{"type": "integer"}], "minimum": 3}, "`minimum` beside `allOf` at #",
     "move `minimum` into the `allOf` schema"),  # 1
    ({"allOf": [{"type": "integer"}], "type": "string"}, "`type` beside `allOf`", "the `allOf` schema"),  # 1
    ({"allOf": [{"type": "string"}], "maxLength": 1}, "`maxLength` beside `allOf`", "the `allOf` schema"),  # "abc"
    ({"allOf": [{"type": "array", "items": {}}], "minItems": 2}, "`minItems` beside `allOf`",
     "the `allOf` schema"),  # [1]
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}], "required": ["a"]},
     "`required` beside `allOf`", "the `allOf` schema"),  # {}
    ({"allOf": [{"type": "integer"}], "oneOf": [{"type": "string"}]}, "`allOf` beside `oneOf`",
     "each `oneOf` branch"),  # "a": oneOf read, allOf ignored
    # a const or enum is emitted as it is, the anyOf/oneOf/allOf beside it never read
    ({"anyOf": [{"type": "integer"}], "const": "a"}, "`anyOf` beside `const`",
     "move the `const` into each `anyOf` branch, or leave the `anyOf` out"),  # "a"
    ({"oneOf": [{"type": "integer"}], "enum": ["a", 1]}, "`oneOf` beside `enum`",
     "move the `enum` into each `oneOf` branch"),  # "a"
    ({"allOf": [{"type": "integer"}], "const": "a"}, "`allOf` beside `const`", "the `allOf` schema"),  # "a"
    (required_object({"n": {"description": "a count", "anyOf": [{"type": "integer"}, {"type": "null"}],
                            "minimum": 0}}), "`minimum` beside `anyOf` at #/properties/n", "each `anyOf` branch"),
])  # fmt: skip
def test_validation_keywords_beside_anyof_oneof_or_allof_are_refused_by_name(schema, named, instead):
    message = refusal(schema)
    assert named in message and "does not enforce" in message and instead in message, message


@pytest.mark.parametrize("schema", [
    # annotations beside them are fine (xgrammar took only what the branches allow)
    {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "X", "description": "d",
     "examples": ["a"], "$comment": "c", "deprecated": True, "$defs": {"Y": {"type": "integer"}}},
    {"oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}], "discriminator": {"propertyName": "k"},
     "$defs": {"A": required_object({"k": {"const": "a"}}), "B": required_object({"k": {"const": "b"}})}},
    {"allOf": [{"$ref": "#/$defs/A"}], "description": "x", "default": {"a": 1}, "title": "T",
     "$defs": {"A": required_object({"a": {"type": "integer"}})}},
    # the keywords inside the branches are enforced
    {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "number", "minimum": 3}]},
])  # fmt: skip
def test_annotations_beside_anyof_oneof_or_allof_pass(schema):
    check_response_schema(schema)


# A bare object or array schema (its type and annotations alone) read through an allOf or a
# $ref: xgrammar 0.2.8 took any object or array for it in place, only {} or [] there.
BARE_OBJECT, BARE_ARRAY = {"type": "object"}, {"type": "array", "description": "a list"}
# (the schema around it, the answer around its value)
THROUGH = {
    "allOf": (lambda bare: {"allOf": [bare]}, lambda value: value),
    "$ref": (lambda bare: {"$defs": {"d": bare}, "$ref": "#/$defs/d"}, lambda value: value),
    "allOf to $ref": (lambda bare: {"$defs": {"d": bare}, "allOf": [{"$ref": "#/$defs/d"}]}, lambda value: value),
    "a property's $ref": (lambda bare: required_object({"x": {"$ref": "#/$defs/d"}}) | {"$defs": {"d": bare}},
                          lambda value: f'{{"x": {value}}}'),
}  # fmt: skip


@pytest.mark.parametrize("through", THROUGH)
@pytest.mark.parametrize(("bare", "empty", "fix"), [
    (BARE_OBJECT, "`{}`", '"additionalProperties": true'), (BARE_ARRAY, "`[]`", '"items": true'),
])  # fmt: skip
def test_a_bare_object_or_array_read_through_allof_or_ref_is_refused_naming_the_fix(through, bare, empty, fix):
    message = refusal(THROUGH[through][0](bare))
    kind = bare["type"]
    assert f'has a bare `"type": "{kind}"` schema at ' in message, message
    assert f"reads there as {empty} alone (though as any {kind} in place): add {fix} to it" in message, message
    where, via = {"allOf": ("#/allOf/0", "the `allOf` at #"), "$ref": ("#/$defs/d", "the `$ref` at #"),
                  "allOf to $ref": ("#/$defs/d", "the `$ref` at #/allOf/0"),
                  "a property's $ref": ("#/$defs/d", "the `$ref` at #/properties/x")}[through]  # fmt: skip
    assert f"at {where}, read through {via}," in message, message


@pytest.mark.parametrize("schema", [
    # in place xgrammar took any object or array for them
    {"type": "object"}, required_object({"x": BARE_OBJECT}), {"type": "array", "items": BARE_OBJECT},
    {"anyOf": [BARE_OBJECT, BARE_ARRAY]},
    # with what the message asks for, or anything beyond annotations, it reads them alike everywhere
    {"allOf": [{"type": "object", "additionalProperties": True}]},
    {"$defs": {"d": {"type": "array", "items": True}}, "$ref": "#/$defs/d"},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]},
    {"allOf": [{"type": ["object", "null"]}]},
    {"allOf": [{"type": "integer", "minimum": 3}]},
    {"allOf": [{"anyOf": [BARE_OBJECT, {"type": "null"}]}]},
])  # fmt: skip
def test_bare_objects_in_place_and_filled_ones_through_allof_or_ref_pass(schema):
    check_response_schema(schema)


@pytest.fixture(scope="module")
def grammar_compiler(tiny_checkpoint):
    xgr = pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))


def xgrammar_accepts(compiler, schema: dict, answer: str) -> bool:
    """Whether xgrammar, compiling `schema` as vLLM does for us, takes `answer` whole."""
    import xgrammar as xgr

    grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
    return matcher.accept_string(answer) and matcher.is_terminated()


@pytest.mark.parametrize("through", THROUGH)
@pytest.mark.parametrize(("bare", "filled", "answer"), [
    (BARE_OBJECT, {"type": "object", "additionalProperties": True}, '{"a": 1}'),
    (BARE_ARRAY, {"type": "array", "items": True, "description": "a list"}, "[1]"),
])  # fmt: skip
def test_xgrammar_narrows_a_bare_schema_through_allof_or_ref_and_not_the_filled_one(
    grammar_compiler, through, bare, filled, answer
):
    """What the refusal rests on, and what its fix gives: should an xgrammar upgrade take
    `answer` through an allOf or a $ref, this fails and the refusal can go."""
    wrap, around = THROUGH[through]
    assert xgrammar_accepts(grammar_compiler, bare, answer)
    assert not xgrammar_accepts(grammar_compiler, wrap(bare), around(answer))
    assert xgrammar_accepts(grammar_compiler, wrap(bare), around("{}" if bare is BARE_OBJECT else "[]"))
    assert xgrammar_accepts(grammar_compiler, wrap(filled), around(answer))
    check_response_schema(wrap(filled))


# How xgrammar 0.2.8 reads a $ref pointer, as (the property's schema, what the root holds
# beside it, the property's values xgrammar takes, values it does not): each name as
# written, empty names skipped.
POINTERS = {
    "~1 as written": ({"$ref": "#/$defs/a~1b"}, {"$defs": {"a/b": {"type": "integer"}, "a~1b": {"type": "string"}}},
                      ['"x"'], ["1"]),
    "%25 as written": ({"$ref": "#/$defs/a%25b"}, {"$defs": {"a%b": {"type": "integer"}, "a%25b": {"type": "string"}}},
                       ['"x"'], ["1"]),
    "an empty name skipped": ({"$ref": "#/$defs/a/"}, {"$defs": {"a": {"type": "integer", "": {"type": "string"}}}},
                              ["1"], ['"x"']),
    "#/ is the root": ({"anyOf": [{"$ref": "#/"}, {"type": "null"}]}, {"": {"type": "integer"}},
                       ['{"p": null}', "null"], ["1"]),
    "names needing no escape": ({"$ref": "#/$defs/a b#?\u00e9"}, {"$defs": {"a b#?\u00e9": {"type": "integer"}}},
                                ["1"], ['"x"']),
}  # fmt: skip


@pytest.mark.parametrize("case", POINTERS)
def test_xgrammar_reads_pointer_names_as_written(grammar_compiler, case):
    """What the refusal of escaped and empty names rests on; the last passes the check."""
    inner, beside, taken, refused = POINTERS[case]
    schema = {**required_object({"p": inner}), "additionalProperties": False, **beside}
    for value in taken:
        assert xgrammar_accepts(grammar_compiler, schema, f'{{"p": {value}}}'), value
    for value in refused:
        assert not xgrammar_accepts(grammar_compiler, schema, f'{{"p": {value}}}'), value
    if case == "names needing no escape":
        check_response_schema(schema)


# A `$id` below the root, as xgrammar 0.2.8 reads it: (schema, the property's values xgrammar
# takes, values it does not, words of the 400 or None where the schema passes). It reads
# no `$id`: a pointer in the subschema that has one is resolved against the root (JSON
# Schema: against that subschema), and a $ref naming a `$id` or `$anchor` is ignored.
B_INNER = {"$id": "http://x.test/b.json", "$defs": {"c": {"type": "integer"}}, **required_object({"q": {"$ref": "#/$defs/c"}}),
           "additionalProperties": False}
IDS = {
    "a pointer under a $id, read from the root": (
        {"$defs": {"c": {"type": "string"}, "b": B_INNER}}, ['{"q": "s"}'], ['{"q": 1}'],
        "uses `$ref` '#/$defs/c' under a `$id` at #/$defs/b/properties/q, which the structured-output backend does "
        "not enforce: it resolves the pointer against the root, and JSON Schema against the `$id` "
        "'http://x.test/b.json' at #/$defs/b; leave that `$id` out and write the pointer from the root"),
    "'#' under a $id, read as the root": (
        {"$defs": {"b": {"$id": "b.json", "anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#"}}]}}},
        ["1", '[{"p": 1}]'], ["[1]"], "uses `$ref` '#' under a `$id` at #/$defs/b/anyOf/1/items"),
    "a $ref to a $id, ignored": (
        {"$defs": {"b": {"$id": "http://x.test/b.json", "type": "integer"}}, "properties": {"p": {"$ref": "b.json"}}},
        ["1", '"s"'], [], "uses `$ref` 'b.json' at #/properties/p, which the structured-output backend does not "
        "enforce: it resolves only pointers into the same schema ('#' or '#/...'), reading no `$id` or `$anchor`"),
    "a $ref to an $anchor, ignored": (
        {"$defs": {"b": {"$anchor": "b", "type": "integer"}}, "properties": {"p": {"$ref": "#b"}}},
        ["1", '"s"'], [], "reading no `$id` or `$anchor`"),
    "a $id with no pointer under it": ({"$defs": {"b": {"$id": "b.json", "type": "integer"}}}, ["1"], ['"s"'], None),
    "a pointer under the root's $id": (
        {"$id": "http://x.test/root.json", "$defs": {"b": {"type": "integer"}}}, ["1"], ['"s"'], None),
}  # fmt: skip


def _with_p(case: str) -> dict:
    beside = IDS[case][0]
    return {**required_object({"p": {"$ref": "#/$defs/b"}}), "additionalProperties": False, **beside}


@pytest.mark.parametrize("case", IDS)
def test_a_ref_xgrammar_resolves_otherwise_for_a_nested_id_is_refused_naming_it(case):
    named = IDS[case][3]
    if named is None:
        check_response_schema(_with_p(case))
    else:
        message = refusal(_with_p(case))
        assert named in message, message


@pytest.mark.parametrize("case", IDS)
def test_xgrammar_reads_no_id(grammar_compiler, case):
    """What the refusals above rest on: should an xgrammar upgrade resolve pointers against
    a nested `$id`, or follow a $ref to one, this fails and the refusal can go."""
    _, taken, refused, _ = IDS[case]
    for value in taken:
        assert xgrammar_accepts(grammar_compiler, _with_p(case), f'{{"p": {value}}}'), value
    for value in refused:
        assert not xgrammar_accepts(grammar_compiler, _with_p(case), f'{{"p": {value}}}'), value


def test_xgrammar_cannot_compile_a_pointer_under_a_id_the_root_lacks(grammar_compiler):
    schema = {**required_object({"p": {"$ref": "#/$defs/b"}}), "$defs": {"b": B_INNER}}
    with pytest.raises(RuntimeError, match="Cannot find field c"):
        grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    assert "uses `$ref` '#/$defs/c' under a `$id` at #/$defs/b/properties/q" in refusal(schema)


DRAFT04_NESTED_ID = {
    "$schema": "http://json-schema.org/draft-04/schema#",
    "definitions": {"c": {"type": "string"},
                    "b": {"id": "http://x.test/b.json", "definitions": {"c": {"type": "integer"}},
                          **required_object({"q": {"$ref": "#/definitions/c"}})}},
    **required_object({"p": {"$ref": "#/definitions/b"}}),
}  # fmt: skip


def test_a_pointer_under_a_draft04_id_is_refused_naming_id(grammar_compiler):
    """draft-04 spells `$id` as `id`: xgrammar resolves the pointer from the root there too."""
    assert xgrammar_accepts(grammar_compiler, DRAFT04_NESTED_ID, '{"p": {"q": "s"}}')
    assert not xgrammar_accepts(grammar_compiler, DRAFT04_NESTED_ID, '{"p": {"q": 1}}')
    message = refusal(DRAFT04_NESTED_ID)
    assert "uses `$ref` '#/definitions/c' under a `id` at #/definitions/b/properties/q" in message, message
    assert "against the `id` 'http://x.test/b.json' at #/definitions/b" in message, message


def test_id_is_a_base_in_draft04_only():
    """In later drafts `id` is an unknown keyword: the same schema without `$schema` passes."""
    later = {key: value for key, value in DRAFT04_NESTED_ID.items() if key != "$schema"}
    check_response_schema(later)


def test_a_draft07_anchor_id_changes_no_base_and_passes():
    """draft-07 names an anchor "$id": "#name": pointers under it still resolve from the root."""
    check_response_schema({"$schema": "http://json-schema.org/draft-07/schema#",
                           "definitions": {"i": {"type": "integer"},
                                           "b": {"$id": "#b", **required_object({"q": {"$ref": "#/definitions/i"}})}},
                           **required_object({"p": {"$ref": "#/definitions/b"}})})  # fmt: skip


@pytest.mark.parametrize("schema", [
    # with "a/b" alone, and into an array: "Cannot find field a~1b (0)", vLLM's 400 with that reason
    {"$defs": {"a/b": {"type": "integer"}}, "$ref": "#/$defs/a~1b"},
    {"anyOf": [{"type": "integer"}, {"$ref": "#/anyOf/0"}]},
])  # fmt: skip
def test_xgrammar_cannot_compile_a_pointer_to_no_name(grammar_compiler, schema):
    with pytest.raises(RuntimeError, match="Cannot find field"):
        grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)


# multipleOf in a subschema xgrammar 0.2.8 reads by its type: it ignores it (logging
# "ignoring multipleOf") beside "number", and beside "integer" unless whole, 1024 at most,
# and with no bound or both bounds at most 10000 integers apart. Each took the answer in
# the comment. vLLM refuses a multipleOf beside a numeric type string ("features not
# supported by xgrammar"); a type list reaches xgrammar.
MULTIPLE_OF_IGNORED = [
    ({"type": ["number", "null"], "multipleOf": 0.5}, '`multipleOf` beside type "number" at #',
     'it enforces `multipleOf` for integers only; use "integer" if the values are whole'),  # 0.3
    ({"type": ["number"], "multipleOf": 2}, '`multipleOf` beside type "number"', "integers only"),  # 3
    ({"type": ["integer", "number"], "multipleOf": 3}, '`multipleOf` beside type "number"', "integers only"),  # 4
    ({"type": "number", "multipleOf": 0.5}, '`multipleOf` beside type "number"', "integers only"),  # 0.3
    ({"type": ["integer", "null"], "multipleOf": 1.5}, '`multipleOf` 1.5 beside type "integer" at #',
     "only a whole `multipleOf` up to 1024; on integers it means `multipleOf` 3: write that"),  # 4
    ({"type": ["integer"], "multipleOf": 2.5, "minimum": 0, "maximum": 9}, '`multipleOf` 2.5 beside type "integer"',
     "on integers it means `multipleOf` 5"),  # 4
    ({"type": ["integer", "null"], "multipleOf": 1025}, '`multipleOf` 1025 beside type "integer"',
     "only a whole `multipleOf` up to 1024; list the values in an `enum`, or leave it out"),  # 1026
    ({"type": ["integer", "null"], "multipleOf": 3, "minimum": 0}, "`multipleOf` beside a lower bound alone at #",
     "give both bounds, at most 10000 integers apart"),  # 4
    ({"type": ["integer", "null"], "multipleOf": 3, "exclusiveMaximum": 100},
     "`multipleOf` beside an upper bound alone", "give both bounds"),  # 4
    ({"type": ["integer", "null"], "multipleOf": 3, "minimum": 0, "maximum": 10000},
     "`multipleOf` beside a range of more than 10000 integers", "give both bounds"),  # 4
    ({"type": ["integer", "null"], "multipleOf": 3, "exclusiveMinimum": -2, "exclusiveMaximum": 10000},
     "`multipleOf` beside a range of more than 10000 integers", "give both bounds"),  # 4
    (required_object({"n": {"type": ["integer", "null"], "multipleOf": 2, "maximum": 8}}),
     "`multipleOf` beside an upper bound alone at #/properties/n", "give both bounds"),  # {"n": 3}
]  # fmt: skip
MULTIPLE_OF_ENFORCED = [
    {"type": ["integer", "null"], "multipleOf": 3},
    {"type": ["integer"], "multipleOf": 1024},
    {"type": ["integer", "null"], "multipleOf": 2.0},
    {"type": ["integer", "null"], "multipleOf": 3, "minimum": 1, "maximum": 10000},
    {"type": ["integer", "null"], "multipleOf": 3, "exclusiveMinimum": -1, "exclusiveMaximum": 10000},
    {"type": ["integer", "null"], "multipleOf": 3, "minimum": 0, "maximum": 20, "exclusiveMaximum": 50000},
]


@pytest.mark.parametrize(("schema", "named", "instead"), MULTIPLE_OF_IGNORED)
def test_a_multipleof_the_backend_ignores_is_refused_naming_it_and_where(schema, named, instead):
    message = refusal(schema)
    assert named in message and "which the structured-output backend does not enforce" in message, message
    assert instead in message, message


@pytest.mark.parametrize("schema", [
    *MULTIPLE_OF_ENFORCED,
    # every integer is a multiple of these: ignoring them changes nothing
    {"type": ["integer", "null"], "multipleOf": 0.5}, {"type": ["integer"], "multipleOf": 1, "minimum": 0},
    # beside a const or enum the values are checked against it instead (xgrammar emits them)
    {"type": ["number", "null"], "multipleOf": 0.01, "const": 19.99},
    {"type": ["integer", "null"], "multipleOf": 3, "minimum": 0, "enum": [3, 6, None]},
    # a type without numbers: multipleOf bounds nothing there
    {"type": ["string", "null"], "multipleOf": 3},
])  # fmt: skip
def test_a_multipleof_the_backend_enforces_or_that_changes_nothing_passes(schema):
    check_response_schema(schema)


def _non_multiple(schema: dict) -> str:
    """A number the schema's bounds admit that is no multiple of its multipleOf."""
    step, low = Fraction(repr(schema["multipleOf"])), schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
    if "number" in schema["type"]:
        return "0.3"
    return str(next(n for n in range(max(low, 0), 10**5) if (n / step).denominator != 1))


@pytest.mark.parametrize("schema", [schema for schema, _, _ in MULTIPLE_OF_IGNORED if "properties" not in schema])
def test_xgrammar_ignores_the_refused_multipleofs_and_enforces_the_others(grammar_compiler, schema):
    """What the refusal rests on: should an xgrammar upgrade enforce one of these, the
    refusal of it can go."""
    assert xgrammar_accepts(grammar_compiler, schema, _non_multiple(schema))
    assert not xgrammar_accepts(grammar_compiler, MULTIPLE_OF_ENFORCED[0], "4")
    for enforced in MULTIPLE_OF_ENFORCED[1:]:
        assert not xgrammar_accepts(grammar_compiler, enforced, _non_multiple(enforced)), enforced


# Numeric ranges xgrammar 0.2.8 fails to compile (vLLM's 400 said only "Failed to transform
# json schema into a grammar: Integer constraint must be a whole number", "Invalid range:
# minimum greater than maximum", "range contains no multipleOf value", ...): a bound with a
# fraction beside "integer" (it does not round it inward), a float bound from 2**63 up, and
# a range with no value.
RANGES_REFUSED = [
    ({"type": "integer", "minimum": 1.5}, '`minimum` 1.5 beside type "integer" at #',
     'only whole numbers as integer bounds): write "minimum": 2, the same bound on integers'),
    ({"type": ["integer", "null"], "exclusiveMinimum": 0.5}, "`exclusiveMinimum` 0.5", 'write "exclusiveMinimum": 0'),
    ({"type": ["integer"], "maximum": 2.5}, "`maximum` 2.5", 'write "maximum": 2'),
    ({"type": "integer", "exclusiveMaximum": 2.5, "minimum": 0}, "`exclusiveMaximum` 2.5",
     'write "exclusiveMaximum": 3'),
    ({"type": ["integer", "number"], "minimum": 1.5}, "`minimum` 1.5 beside type \"integer\"",
     'leave "integer" out of the `type` list ("number" takes the integers too)'),
    ({"type": "integer", "maximum": 1e20}, "`maximum` 1e+20 beside type \"integer\"",
     "as 64-bit integers, and one written as a float only strictly within ±2**63): leave it out, as it bounds no"),
    ({"type": "integer", "maximum": -(2.0**63)}, "`maximum` -9.223372036854776e+18",
     "write it as the integer -9223372036854775808"),
    ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "has a range with no value at #",
     "no integer satisfies `minimum` 1.2 and `maximum` 1.8, which the structured-output backend cannot compile"),
    ({"type": ["integer", "number"], "minimum": 1.2, "maximum": 1.8}, "no integer satisfies `minimum` 1.2 and",
     'cannot compile; leave "integer" out of the `type` list'),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "no integer satisfies `minimum` 5 and `maximum` 3", "compile"),
    ({"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6}, "no integer satisfies `exclusiveMinimum` 5 and",
     "compile"),
    ({"type": ["integer", "null"], "minimum": 5, "maximum": 7, "multipleOf": 4},
     "no integer satisfies `minimum` 5, `maximum` 7 and `multipleOf` 4", "compile"),
    ({"type": ["integer", "null"], "exclusiveMinimum": 4, "exclusiveMaximum": 8, "multipleOf": 4},
     "and `multipleOf` 4", "compile"),
    ({"type": "integer", "minimum": 1e20}, "no 64-bit integer (what the backend reads) satisfies `minimum` 1e+20",
     "compile"),
    ({"type": "integer", "exclusiveMinimum": 2**63 - 1}, "no 64-bit integer", "compile"),
    ({"type": "number", "minimum": 5, "maximum": 3}, "no number satisfies `minimum` 5 and `maximum` 3", "compile"),
    ({"type": ["number", "null"], "minimum": 5, "exclusiveMaximum": 5}, "no number satisfies `minimum` 5 and",
     "compile"),
    ({"type": "number", "minimum": 2, "exclusiveMinimum": 5, "maximum": 5},
     "no number satisfies `minimum` 2, `exclusiveMinimum` 5 and `maximum` 5", "compile"),
    (required_object({"n": {"type": "integer", "minimum": 0.5}}), "at #/properties/n", 'write "minimum": 1'),
    ({"type": "object", "properties": {"n": {"type": "number", "minimum": 1, "maximum": 0}}},
     "has a range with no value at #/properties/n", "compile"),
    ({"anyOf": [{"type": "integer", "maximum": 9.5}, {"type": "null"}]}, "at #/anyOf/0", 'write "maximum": 9'),
]  # fmt: skip
# (schema, an answer it takes, one it does not)
RANGES_COMPILED = [
    ({"type": "integer", "minimum": 1.0, "maximum": 3.0}, "3", "4"),
    ({"type": "number", "minimum": 1.5, "maximum": 1.5}, "1.5", "1.6"),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 6}, "5", "6"),
    ({"type": ["integer", "null"], "minimum": 5, "maximum": 8, "multipleOf": 4}, "8", "6"),
    ({"type": "integer", "maximum": 9.2e18}, "9200000000000000000", "9200000000000000001"),
    ({"type": "integer", "exclusiveMinimum": -(2**63)}, "-9223372036854775807", "-9223372036854775808"),
]


@pytest.mark.parametrize(("schema", "named", "instead"), RANGES_REFUSED)
def test_a_numeric_range_xgrammar_cannot_compile_is_refused_naming_its_bounds(schema, named, instead):
    message = refusal(schema)
    assert named in message and instead in message, message


@pytest.mark.parametrize("schema", [
    *(schema for schema, _, _ in RANGES_COMPILED),
    # beside a const or enum xgrammar reads no bound: the values are checked against them instead
    {"type": "integer", "minimum": 1.5, "enum": [2, 3]},
    {"type": ["integer", "null"], "minimum": 5, "maximum": 7, "multipleOf": 4, "const": None},
    # a bound beside no numeric type bounds nothing there
    {"type": ["string", "null"], "minimum": 5, "maximum": 3},
])  # fmt: skip
def test_a_numeric_range_xgrammar_compiles_passes(schema):
    check_response_schema(schema)


@pytest.mark.parametrize("schema", [schema for schema, _, _ in RANGES_REFUSED])
def test_xgrammar_fails_to_compile_the_refused_ranges_and_enforces_the_others(grammar_compiler, schema):
    """What the refusal rests on: should an xgrammar upgrade compile one of these (rounding a
    bound inward, say), the refusal of it can go."""
    with pytest.raises(RuntimeError):
        grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    for compiled, taken, refused in RANGES_COMPILED:
        assert xgrammar_accepts(grammar_compiler, compiled, taken), compiled
        assert not xgrammar_accepts(grammar_compiler, compiled, refused), compiled


@pytest.mark.parametrize(("schema", "answer"), [
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "const": {"a": "x"}}, '{"a":"x"}'),
    ({"type": "array", "items": {"type": "integer"}, "enum": [[1], ["a"]]}, '["a"]'),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False, "const": {"b": 1}}, '{"b":1}'),
    (required_object({"p": {"type": "array", "prefixItems": [{"type": "string"}], "items": False, "const": [1]}}),
     '{"p": [1]}'),
])  # fmt: skip
def test_xgrammar_emits_object_and_array_values_reading_no_keyword_beside_them(grammar_compiler, schema, answer):
    """What the refusal of such values rests on."""
    assert xgrammar_accepts(grammar_compiler, schema, answer)
    assert not Draft202012Validator(schema).is_valid(json.loads(answer))


def test_xgrammar_writes_const_and_enum_objects_and_arrays_compactly(grammar_compiler):
    """docs/gateway.md's word on whitespace: one space after each `,` and `:`, none inside
    an object or array a const or enum gives (re-serialized, 17 significant digits)."""
    schema = required_object({"p": {"const": {"a": 1, "b": [1, 2]}}, "q": {"type": "array", "items": {}}})
    assert xgrammar_accepts(grammar_compiler, schema, '{"p": {"a":1,"b":[1,2]}, "q": [1, 2]}')
    assert not xgrammar_accepts(grammar_compiler, schema, '{"p": {"a": 1, "b": [1, 2]}, "q": [1, 2]}')
    numbers = {"enum": [0.1, 100.0, {"x": 1.5}]}
    for answer in ["0.10000000000000001", "100", '{"x":1.5}']:
        assert xgrammar_accepts(grammar_compiler, numbers, answer), answer
    for answer in ["0.1", "100.0", '{"x": 1.5}']:
        assert not xgrammar_accepts(grammar_compiler, numbers, answer), answer


def test_xgrammar_starts_a_value_that_leads_back_to_itself_and_cannot_end_it(grammar_compiler):
    """What the refusal of such subschemas below the root rests on, and how a value under a
    $ref cycle is checked: xgrammar's grammar takes no finite value through the cycle."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}}} | SELF
    grammar = grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
    assert matcher.accept_string('{"p": ')
    bitmask = xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    assert not bitmask.any()  # no token to continue with
    endless = {"type": "object", "properties": {"p": {"$ref": "#/$defs/n"}}} | NO_END
    matcher = xgr.GrammarMatcher(grammar_compiler.compile_json_schema(json.dumps(endless), any_whitespace=False))
    assert matcher.accept_string('{"p": ' + '{"q": ' * 100)
    left_recursive = {"$defs": {"x": LEFT_RECURSIVE}, "$ref": "#/$defs/x"}
    assert xgrammar_accepts(grammar_compiler, left_recursive, "1")
    assert not xgrammar_accepts(grammar_compiler, left_recursive, '"a"')
    emitted = {"$defs": {"x": LEFT_RECURSIVE}, "type": "object", "properties": {"p": {"$ref": "#/$defs/x"}},
               "const": {"p": "a"}}  # fmt: skip
    assert xgrammar_accepts(grammar_compiler, emitted, '{"p":"a"}')


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"


class Point(BaseModel):
    x: int
    y: int = 0


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    bark: str = Field(min_length=1)


class Optionals(BaseModel):
    """pydantic writes an Optional field as {"anyOf": [..., {"type": "null"}], "default":
    null, "title": ...}, with its constraints inside the branch."""

    count: int | None = Field(None, ge=1, description="how many")
    name: str | None = Field(None, min_length=2, max_length=20)
    values: list[float] | None = Field(None, max_length=3)
    point: Point | None = Field(None, description="where")
    shade: Shade | None = None
    either: int | str = 0


class Nested(BaseModel):
    title: str
    points: list[Point]
    shade: Shade = Field(Shade.LIGHT, description="annotations beside a $ref")
    origin: Point = Field(description="a nested model", title="Origin")
    labels: list[Literal["a", "b"]] = []
    mode: Literal["fast"] = "fast"
    pet: Cat | Dog = Field(discriminator="kind")
    pets: list[Cat | Dog] = []
    scores: dict[str, float] = {}


@pytest.mark.parametrize("model", [Point, Optionals, Nested, Cat])
def test_pydantic_schemas_with_optional_fields_nested_models_enums_lists_and_literals_pass(model):
    schema = model.model_json_schema()
    assert "anyOf" in str(schema) or model in (Point, Cat)
    check_response_schema(schema)


DRAFT_04 = "http://json-schema.org/draft-04/schema#"


@pytest.mark.parametrize(("schema", "named"), [
    # without $schema the metaschema check refused it too, saying only "True is not of type 'number'"
    ({"type": "number", "maximum": 5, "exclusiveMaximum": True},
     '`exclusiveMaximum` true at #, draft-04\'s boolean form, which the structured-output backend does not read '
     '(it takes only a number); write the bound itself, draft 2020-12\'s number form: "exclusiveMaximum": 5 in '
     'place of "maximum": 5, "exclusiveMaximum": true'),
    # valid draft-04: with a type xgrammar's compile failed ("Value must be a number")
    ({"$schema": DRAFT_04, "type": "integer", "minimum": 0, "exclusiveMinimum": True},
     '`exclusiveMinimum` true at #, draft-04\'s boolean form'),
    # without one it read any JSON value
    (required_object({"n": {"$schema": DRAFT_04, "maximum": 1.5, "exclusiveMaximum": True}}),
     '`exclusiveMaximum` true at #/properties/n, draft-04\'s boolean form'),
    ({"$schema": DRAFT_04, "type": "number", "maximum": 5, "exclusiveMaximum": False},
     "`exclusiveMaximum` false at #, draft-04's boolean form, which the structured-output backend does not read "
     "(it takes only a number); leave it out: false is draft-04's default, and `maximum` alone is the same bound"),
])  # fmt: skip
def test_draft_04_boolean_exclusive_bounds_are_refused_naming_the_number_form(schema, named):
    message = refusal(schema)
    assert named in message, message


def test_draft_04_number_bounds_pass():
    check_response_schema({"$schema": DRAFT_04, "type": "number", "minimum": 0, "maximum": 5})
    check_response_schema({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 5})


CONSTRAINED = ["null", "boolean", "integer", "number", "string", "array", "object"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, 1.0, 1.5, -2.5]),
    st.sampled_from(["", "a", "abc", "a@b", "2024-01-02"]), st.lists(st.integers(0, 1), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 1), max_size=2),
)  # fmt: skip
BOUNDS = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(CONSTRAINED), st.lists(st.sampled_from(CONSTRAINED), min_size=1, max_size=3,
                                                             unique=True)),
    "minimum": st.integers(-2, 2), "exclusiveMaximum": st.sampled_from([0, 1, 1.5]), "maxLength": st.integers(0, 2),
    "minItems": st.integers(0, 2), "maxProperties": st.integers(0, 1),
    "required": st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=2, unique=True),
    "multipleOf": st.sampled_from([2, 0.5]), "pattern": st.sampled_from(["^a", "b", "^$"]),
    "format": st.sampled_from(["email", "date"]),
})  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BOUNDS, st.lists(VALUES, min_size=1, max_size=3), st.sampled_from(["enum", "const", "const and enum"]),
       st.booleans())  # fmt: skip
def test_enum_and_const_values_are_refused_unless_every_value_emitted_validates(bounds, values, form, optional):
    """Against jsonschema: xgrammar emits the const (reading no enum beside it) or else
    every enum value, so the check accepts a schema exactly when every value it emits
    validates; it says "admits no JSON value" when none does (at the root), and names the
    value when the schema still admits one (some values do, or it is an optional
    property's, which the answer may hold all the same). integer takes 1.0, not true;
    number takes no boolean; a const is among an enum by JSON equality (1 is 1.0, not true);
    formats are asserted, as xgrammar enforces them."""
    assume("maxLength" not in bounds or not {"pattern", "format"} & bounds.keys())  # refused: xgrammar ignores it
    if form == "enum":
        schema, emitted = {**bounds, "enum": values}, values
    elif form == "const":
        schema, emitted = {**bounds, "const": values[0]}, values[:1]
    else:
        schema, emitted = {**bounds, "const": values[0], "enum": values[1:] or values}, values[:1]
    if "required" in schema:
        schema["properties"] = {"a": {}, "b": {}}
    checker = Draft202012Validator.FORMAT_CHECKER
    valid = [Draft202012Validator(schema, format_checker=checker).is_valid(value) for value in emitted]
    try:
        check_response_schema({"type": "object", "properties": {"p": schema}} if optional else schema)
    except ApiError as exc:
        if "admits no JSON value" in exc.message:
            assert not optional and not any(valid), exc.message
        else:
            assert "the structured-output backend would answer it" in exc.message and not all(valid), exc.message
            assert optional or any(valid), exc.message
    else:
        assert all(valid)


def test_an_invalid_json_schema_is_refused():
    assert "is not a valid JSON Schema: 'nonsense'" in refusal({"type": "nonsense"})
    assert "$schema must be a string" in refusal({"$schema": []})


DRAFT_03 = "http://json-schema.org/draft-03/schema#"


def nested_under(keyword: str, levels: int, form: str = "schema") -> dict:
    """{"type": "integer"} under `levels` of `keyword`, each holding a schema, a list of one
    or a map to one."""
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {keyword: {"schema": schema, "list": [schema], "map": {"x": schema}}[form]}
    return schema


@pytest.mark.parametrize("schema", [
    # xgrammar 0.2.8 took {} for the first, 1 for the next two, and failed to compile the last
    {"$schema": DRAFT_03, "type": "object", "properties": {"a": {"type": "integer", "required": True}}},
    {"$schema": DRAFT_03, "type": "integer", "extends": {"minimum": 5}},
    {"$schema": "http://json-schema.org/draft-03/schema", "type": "integer", "divisibleBy": 3},
    {"$schema": DRAFT_03, "type": [{"type": "integer"}, "null"]},
    # jsonschema's draft-03 check recursed through these past Python's limit: our 500
    {"$schema": DRAFT_03, **nested_under("extends", 190)},
    {"$schema": DRAFT_03, **nested_under("type", 190, "list")},
])  # fmt: skip
def test_a_draft_03_schema_is_refused(schema):
    message = refusal(schema)
    assert message.startswith("response_format.json_schema.schema is draft-03 ($schema 'http://json-schema.org/draft-03/"
                              "schema"), message  # fmt: skip
    assert "which the structured-output backend does not read: it ignores `extends`" in message, message


SCHEMA_KEYWORDS = ["additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
                   "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema", "$defs",
                   "definitions", "dependencies", "dependentSchemas", "properties", "patternProperties", "allOf",
                   "anyOf", "oneOf", "prefixItems", "extends", "disallow", "type"]  # fmt: skip
DRAFTS = ["http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-06/schema#",
          "http://json-schema.org/draft-07/schema#", "https://json-schema.org/draft/2019-09/schema",
          "https://json-schema.org/draft/2020-12/schema"]  # fmt: skip


@pytest.mark.parametrize("draft", DRAFTS)
def test_any_keyword_nested_as_deep_as_the_gateway_reads_is_a_400_or_passes_in_every_draft(draft):
    """Every keyword any draft reads a schema from, 190 levels deep (the gateway's reader
    allows 200 in all), as a schema, a list and a map: the walk's depth limit stops the
    keywords it reads subschemas from, the metaschema check reads none of the others, and
    nothing recurses past Python's limit into our 500."""
    for keyword in SCHEMA_KEYWORDS:
        for form in ("schema", "list", "map"):
            try:
                check_response_schema({"$schema": draft, **nested_under(keyword, 190, form)})
            except ApiError as exc:
                assert exc.status == 400 and exc.param == "response_format", exc.message


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
    {"type": "integer", "enum": [1.0, 2], "minimum": 1},
    {"type": ["string", "null"], "enum": ["a", None], "maxLength": 1},
    {"type": "array", "const": [1, 2], "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"x": {"type": "string", "enum": ["a", "b"]}}},
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


@pytest.mark.anyio
async def test_the_gateway_answers_the_hostile_probes_schemas_with_a_400_before_the_engine():
    """A repeat that stalled the engine's compile for 100 s, an integer that made vLLM's
    encoder raise (a 500), a const its own type contradicts, an enum value its type
    contradicts and a length bound without a type (each a 200 breaking it), and a
    multipleOf of Infinity (the reader takes it, and makes 1e400 the same), which the
    multipleOf check computed with (our 500), a range with no value (the engine's 400
    named no keyword), an optional property that leads back to itself (the answer could
    start it and never end it), and `extends` 190 levels deep, through which jsonschema's
    draft-03 check recursed past Python's limit (our 500)."""
    schemas = {
        "repeats a part up to 30000 times": {"type": "string", "pattern": "a{30000}"},
        "has 123456789012345678901234567890 at #/enum/0": {"enum": [123456789012345678901234567890]},
        'admits no JSON value: `const` "a" at # is not of its `type` "integer"': {"type": "integer", "const": "a"},
        '`enum` value 1 at #/enum/1 is not of its `type` "string"': {"type": "string", "enum": ["a", 1]},
        "uses `minLength` without `type` at #/properties/a": required_object({"a": {"minLength": 3}}),
        "has inf at #/multipleOf": {"type": ["integer", "null"], "multipleOf": math.inf},
        "no integer satisfies `minimum` 5, `maximum` 7 and `multipleOf` 4": {"type": ["integer", "null"], "minimum": 5,
                                                                              "maximum": 7, "multipleOf": 4},
        "admits no finite JSON value at #/properties/p": {"type": "object", "properties": {"p": {"$ref": "#/$defs/a"}},
                                                          "$defs": {"a": {"$ref": "#/$defs/a"}}},
        "is draft-03": {"$schema": DRAFT_03, **nested_under("extends", 190)},
    }
    async with running_gateway() as gw:
        for named, schema in schemas.items():
            response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            raw = json.dumps(chat_body(response_format=response_format), allow_nan=True)
            refused = await gw.client.post("/v1/chat/completions", content=raw,
                                           headers={"content-type": "application/json"})  # fmt: skip
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "response_format" and named in error["message"], error
        assert not gw.engine.submitted
