"""response_format JSON schemas: bounded, enforceable and satisfiable, or refused with a 400.

vLLM compiles a request's schema with xgrammar in the engine, in a small thread pool (one
thread on a 2-core machine) that no abort reaches: a compile runs to its end whether its
client waits or not, and every later structured request queues behind it. One schema of
90000 enum values took minutes and held every json_object request after it. So the
schema is bounded before it is submitted, in the spirit of OpenAI's structured-output
limits, tightened where xgrammar's compile time grows fastest. Measured on the 2-core CI
VM (busy) with the tiny checkpoint's tokenizer, the fastest of two fresh compiles
(docs/gateway.md has the table): 10000 short enum values 2.5 s; 1000 object properties
with none required 9.4 s (optional properties grow quadratically per object); 1000
`format: email` strings 2.8 s; anyOf of 1000 one-property objects 0.2-1.4 s. The worst
schemas these limits admit compile in 0.9 s or less there. jsonschema's metaschema check
is slow too (about 1 ms per subschema, draft 2020-12: up to 0.8 s at the limits), so it
runs after the limits and, like the rest, in a worker thread (the request builder's call).

A `pattern` is compiled into an automaton with each counted repeat (`{n}`, `{m,}`,
`{m,n}`) written out copy by copy (measured as above, one or two fresh compiles each; the
151936-token vocabulary is `mdl-serve make-checkpoint --preset 7b`'s). xgrammar cannot compile a repeat of more than 128
copies: `a{129}`, `a{2,500}`, `[ab]{300}`, `(ab){200}` fail ("Check failed:
per_rule_fsm_hashes"), after a time that grows with the square of the count: `a{1000}`
0.15 s, `a{5000}` 2.4 s, `a{30000}` about 100 s (the hostile probe), in the engine's one
compile thread. So such a repeat is refused. Nested repeats multiply and do compile
(`(a{128}){128}` 0.7-1.2 s, `((a{2}){128}){128}` 2.8-3.2 s, `(.{64}){128}` 6.8 s), as
does a long pattern, so patterns are bounded by their size with the repeats written out,
1000 in all. A `.` costs most: 1000 of them compiled in 0.2-0.5 s (1.1 s once, at load
10), eight `[^"]{124}` in 0.9 s, ten `.{99}` patterns in 0.8 s; 2000 took 1.1-1.8 s.
With a 151936-token vocabulary each `.` or negated-class position costs far more
(`.{128}` 3.2-5.8 s, `[^@]{1,128}@[^@]{1,128}` 10 s; `a{128}` 0.02 s; load 4-12).
String, array and object lengths (`maxLength`, `minItems`, `maxProperties`, ...) are not
written out: xgrammar keeps them as counted grammar repeats, and with the tiny tokenizer
their compile time stays flat from 128 to 10**9 (0.05-0.13 s). With the 151936-token
vocabulary a `maxLength` costs like a `.` pattern there (16: 3.6 s, 40: 11 s, 128: 45 s,
10**5: 60 s, load 4-12), but on an H200 serving host (16 cores, vLLM's 8 compile threads)
16: 0.14 s, 128: 1.2 s, 1000 and 10**5: 1.9 s (benchmarks/results/2026-12-04-h200-lease-f):
bounded in practice, and ordinary schemas use it, so it is not bounded here.

Numbers: vLLM's msgpack encoder raises on an integer outside [-2**63, 2**64 - 1] (our
500), and xgrammar's JSON reader holds integers in 64 bits: 9223372036854775807 is exact,
2**63 and more become floats (an enum of 18446744073709551615 was answered
1.8446744073709552e+19), a bound past 64 bits fails its compile. The schema is JSON, so
infinity and NaN (the gateway's reader makes 1e400 infinity) reach xgrammar as
`Infinity`, which it cannot parse. Both are refused wherever they are in the schema.

xgrammar 0.2.8 silently ignores some keywords (tried one by one: an answer breaking them
is accepted): `not`, `if`/`then`/`else`, `allOf` of more than one schema, the
`dependent*` keywords, `contains`, `uniqueItems`, `$dynamicRef`, keywords beside a `$ref`,
a `$ref` outside the document, a `$ref` pointer it reads otherwise than JSON Schema (it
takes `~0`, `~1` and `%25` escapes as written and skips empty names: "#/$defs/a~1b"
followed "a~1b", not "a/b", and "#/" the root, not the name ""; it follows no pointer
into an array either, failing to compile as for a `$ref` to nothing), a `required` name
missing from `properties`,
`minLength`/`maxLength` beside a `pattern` or `format`, and the keywords that bound one
type of value (`pattern`, `minLength`, `minItems`, `minimum`, `multipleOf`,
`patternProperties`, `propertyNames`, `minProperties`, ...) in a subschema without a
`type`: lacking `type`, `const`, `enum`, `anyOf`/`oneOf`/`allOf`, `$ref` and the keywords
it infers a type from (`properties`, `additionalProperties`, `items`, `prefixItems`, the
`unevaluated*` ones), xgrammar reads a subschema as any JSON value ({"minLength": 3} took
"a", {"patternProperties": {"^a$": {"type": "integer"}}} took {"a": "x"}). A `type` list
is read type by type, each with its keywords, and a `propertyNames` subschema as a
string's. xgrammar reads a subschema by the first of `$ref`, `const`, `enum`, `anyOf`,
`oneOf`, `allOf` it has and nothing else of it, so it ignores every validation keyword
beside an `anyOf`, `oneOf` or `allOf` of any length ({"type": "string", "anyOf":
[string, integer]} took 1, {"allOf": [integer], "minimum": 3} took 1), and the
applicator beside a `const` or `enum` ({"anyOf": [integer], "const": "a"} took "a");
annotations (title, description, default, $defs) beside them are harmless. A schema
using them is refused by name, rather than answered with JSON that does not validate.
So is a draft-03 schema (it ignored `extends`, `divisibleBy`, a boolean `required`), and
draft-04's boolean `exclusiveMinimum`/`exclusiveMaximum`: beside a numeric `type`
xgrammar fails to compile it ("Value must be a number"), without one it ignores it.
So is a `multipleOf` xgrammar ignores where it reads the subschema by its `type` (logging
"ignoring multipleOf"): beside "number" ({"type": ["number", "null"], "multipleOf": 0.5}
took 0.3), and beside "integer" unless whole and 1024 at most ({"type": ["integer",
"null"], "multipleOf": 1.5} took 4) and beside no bound or both bounds at most 10000
integers apart (multipleOf 3 with "minimum": 0 alone took 4); one every integer meets
(0.5) changes nothing there. vLLM refuses any multipleOf beside a numeric `type` string,
in words that do not say why; a `type` list reaches xgrammar.
So is a numeric range xgrammar cannot compile, where it reads the subschema by its `type`:
its compile fails, and vLLM's 400 named neither keyword nor place, on a range with no
value ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "minimum": 5, "maximum": 7 and
"multipleOf": 4, a number's "minimum": 5 beside "exclusiveMaximum": 5) and, beside
"integer", on a bound with a fraction ("minimum": 1.5: it does not round it inward, so the
message names the whole bound that means the same) or written as a float from 2**63 up.
A one-schema `allOf` reads as its schema in place (19 schemas tried: objects with and
without properties, strings, bounded integers, arrays with items, type lists, enums,
anyOf) but for a bare `{"type": "object"}` or `{"type": "array"}` (with annotations at
most), which xgrammar takes as any object or array in place (the root, a property, items,
an anyOf branch) and as `{}` or `[]` alone through an allOf or a $ref: {"allOf": [{"type":
"object"}]} refused {"a": 1}. Such a schema is refused, naming the fix that xgrammar reads
as any object (array) everywhere, `"additionalProperties": true` (`"items": true`); a
rewrite would need the request builder to submit what the check returns. With any other
keyword beside the type (`required: []`, `maxItems: 3`, even `x-foo`), an object without
properties or additionalProperties is `{}` alone everywhere (an array without items `[]`):
narrower than the schema, but valid, so not refused.
A schema that admits no finite value (`{"$ref": "#"}`, a required property that refers
back to its object) leaves the model no token to continue with; the engine then ends the
request with finish reason "error", so such schemas are refused here too, and so is a
subschema that admits none because it leads back to itself, an optional property's say:
xgrammar let the answer start it, and then allowed no token, or wrote `{"q": {"q": ` on
to the token limit. So is one whose
`const` or `enum` values all break its own type, bounds or counts: xgrammar emits those
values as they are, reading no keyword beside them, so `{"type": "integer", "const": "a"}`
was answered "a" with a 200. It emits each enum value so, and a `const` beside an `enum`
without reading the enum ({"const": "c", "enum": ["a", "b"]} took "c"), so a schema where
any value it emits breaks a keyword beside it is refused too, naming the value: where some
enum values are fine ({"type": "string", "enum": ["a", 1]} took 1), or where the value is
an optional property's (the schema admits a value without it, but the answer may have it).
A `pattern`, `format` or `multipleOf` beside them counts too ({"type": "string", "pattern":
"^a+$", "enum": ["b"]} took "b", {"multipleOf": 3, "const": 4} took 4, {"type": "string",
"format": "email", "const": "x"} took "x"; vLLM refuses multipleOf only beside a numeric
`type` string), where the break is certain: a pattern is searched unanchored, as JSON
Schema does, in Python's syntax (the regex module, under a deadline of 0.2 s a schema:
Python's re backtracks for hours on `^(a|a)*$`, holding the GIL), a value refused only
if it misses with Unicode and with ASCII classes (ECMA-262's digits are ASCII, its spaces
Unicode); multipleOf in exact decimals (0.3 is a multiple of 0.1, though not in floats)
and in floats; a format xgrammar enforces by jsonschema's format checker (date, email,
ipv4, ipv6 and uuid with the packages installed). An object or array value is validated
against every keyword beside it, down through its items and properties ({"type":
"object", "properties": {"a": {"type": "integer"}}, "const": {"a": "x"}} was answered
{"a":"x"}, an `items` or `additionalProperties` beside an enum alike), by jsonschema for
the schema's draft with draft 2020-12's types (xgrammar writes 1.0 as 1), a `$ref`
resolved in the whole schema as xgrammar reads it, and pattern, format and multipleOf as
above; where the break is not certain it counts as none: `oneOf` is read as `anyOf`,
`patternProperties` keys go unchecked, and so does everything once a schema's checks have
run 0.5 s (branches multiply) or recursed past Python's limit (hundreds of `anyOf` and
`$ref` steps in a chain). A `$ref` cycle is followed as xgrammar's grammar reads it: a
value that comes back to a `$ref` target it is being checked against fails that way round
(with x {"anyOf": [{"$ref": "#/$defs/x"}, {"type": "integer"}]}, xgrammar took 1, not "a").
"""

import json
import math
import operator
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeGuard
from urllib.parse import unquote

from mdlserve.server.errors import ApiError, bad_request

PARAM = "response_format"
WHERE = "response_format.json_schema.schema"

MAX_DEPTH = 10  # subschema levels below the root, each applicator one (OpenAI: 10 levels of nesting)
MAX_SUBSCHEMAS = 500  # the root, each property's schema, anyOf branch, $defs entry, ...
MAX_OPTIONAL_PROPERTIES = 100  # properties not in their object's `required`, in all
MAX_STRING_PATTERNS = 100  # `pattern` and `format` strings, and patternProperties keys
MAX_ENUM_VALUES = 1000  # in all (OpenAI: 1000)
MAX_LITERAL_CHARS = 30000  # property names, enum and const values, in all (OpenAI: 120000)
MAX_PATTERN_REPEAT = 128  # copies one counted repeat (`{n}`, `{m,}`, `{m,n}`) of a pattern makes (xgrammar's own)
MAX_PATTERN_SIZE = 1000  # pattern characters in all, each repeated part once per copy (`_pattern_size`)
MAX_PATTERN_CHARS = 10000  # pattern characters in all as written (bounds the check's own scan)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the integers xgrammar's JSON reader holds exactly
PATTERN_SEARCH_SECONDS = 0.2  # enum and const values matched against their `pattern`, in all, per schema
VALUE_CHECK_SECONDS = 0.5  # enum and const objects and arrays validated against the keywords beside them, per schema

# Schema-valued keywords: one schema, a name -> schema map, a list of schemas.
_ONE = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")  # fmt: skip
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_IGNORED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
            "contains", "minContains", "maxContains", "$dynamicRef", "$recursiveRef")  # fmt: skip
_BROKEN = "an answer that breaks it would be accepted"
# What xgrammar reads a subschema by: the first of these it has ($ref, then const, enum,
# anyOf or oneOf, allOf, type; without those, an object where a properties keyword is and
# an array where an items keyword is). A subschema with none of them is any JSON value.
_SHAPING = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf", "type", "properties", "additionalProperties",
            "unevaluatedProperties", "items", "prefixItems", "unevaluatedItems")  # fmt: skip
# Keywords that bound values of one type, and the type: on a subschema xgrammar reads as
# any JSON value, it ignores them (tried one by one: {"minLength": 3} accepted "a").
_TYPED = {"patternProperties": "object", "propertyNames": "object", "minProperties": "object",
          "maxProperties": "object", "minItems": "array", "maxItems": "array", "pattern": "string", "format": "string",
          "minLength": "string", "maxLength": "string", "minimum": "number", "maximum": "number",
          "exclusiveMinimum": "number", "exclusiveMaximum": "number", "multipleOf": "number"}  # fmt: skip
# Of those, the ones vLLM refuses for xgrammar beside their type ("features not supported
# by xgrammar"), and what to write instead.
_REFUSED_TYPED = {"patternProperties": "name the keys in `properties`, or give every value's schema in "
                                       "`additionalProperties`",
                  "propertyNames": "name the keys in `properties`",
                  "multipleOf": "leave it out, or list the values in an `enum`"}  # fmt: skip
_UNTYPED = "it reads a subschema with no `type` (nor `properties`, `items` or another keyword it takes one from) "
_UNTYPED += "as any JSON value"
# Keywords that constrain a value: beside a $ref, xgrammar ignores them (annotations such
# as description, and $defs, are fine there).
_VALIDATION = ("type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
               "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "additionalItems",
               "minItems", "maxItems", "unevaluatedItems", "unevaluatedProperties", "minLength", "maxLength",
               "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
               "anyOf", "oneOf", "allOf")  # fmt: skip
_APPLICATORS = ("anyOf", "oneOf", "allOf")  # in the order xgrammar looks for them: it reads the first it finds
# A bare object or array schema: its type and these annotations alone. xgrammar reads one
# as any object (array) in place, as `{}` (`[]`) alone through an allOf or a $ref; with any
# other keyword beside the type (even `x-foo` or `minItems: 0`) as `{}` (`[]`) everywhere.
_BARE_KEYS = frozenset({"type", "title", "description", "default", "examples", "$comment", "deprecated",
                        "readOnly", "writeOnly", "$schema"})  # fmt: skip
_BARE_FIXES = {"object": ("`{}`", '"additionalProperties": true'), "array": ("`[]`", '"items": true')}
# An integer `multipleOf` xgrammar enforces: a whole number up to this, and where a bound is
# given, both bounds, this many integers apart at most (its kIntegerMultipleOf*Max).
MULTIPLE_OF_MAX, MULTIPLE_OF_RANGE_MAX = 1024, 10000


def _into(applicator: str) -> str:
    return "the `allOf` schema" if applicator == "allOf" else f"each `{applicator}` branch"


def check_response_schema(schema: dict[str, Any]) -> None:
    """Raise the client's 400 for a schema past the limits, not a JSON Schema, using a
    keyword the backend does not enforce, or admitting no value. Runs in a worker thread:
    the metaschema check alone takes up to 0.8 s at the limits."""
    _check_numbers(schema)  # first: the walk computes with bounds and steps, which must be finite and 64-bit
    walk = _Walk(schema)
    walk.schema(schema, "#", 0)
    walk.ref_targets()
    walk.check_limits()
    if walk.draft04_bound is not None:  # before the metaschema check, whose words would not say what to write
        raise walk.draft04_bound
    _check_metaschema(schema)
    if walk.ignored:
        keyword, pointer, why = walk.ignored[0]
        raise bad_request(
            f"{WHERE} uses {keyword} at {pointer}, which the structured-output backend does not enforce: {why}",
            param=PARAM,
        )
    if walk.narrowed is not None:
        raise walk.narrowed
    for check in (walk.uncompiled_range, walk.no_value, walk.broken_value):  # no_value first: where no value is
        refusal = check()  # left, that says more than the value that breaks its keywords
        if refusal is not None:
            raise refusal


def _check_metaschema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not a JSON Schema of its draft, or one of draft-03: xgrammar
    0.2.8 ignores draft-03's `extends`, `disallow`, `divisibleBy` and boolean `required`
    (an answer breaking each was accepted) and cannot compile a schema in its `type` list,
    and jsonschema's draft-03 metaschema check recursed once per level of those, which the
    walk does not count (`extends` 190 levels deep: RecursionError, our 500)."""
    import jsonschema

    if not isinstance(schema.get("$schema", ""), str):  # jsonschema looks it up in a dict: a list would raise
        raise bad_request(f"{WHERE} is not a valid JSON Schema: $schema must be a string", param=PARAM)
    validator = jsonschema.validators.validator_for(schema)
    if validator is jsonschema.Draft3Validator:
        raise bad_request(
            f"{WHERE} is draft-03 ($schema {schema['$schema']!r}), which the structured-output backend does not read: "
            "it ignores `extends`, `disallow`, `divisibleBy` and a boolean `required`, and cannot compile a schema in "
            "`type`; write it in draft 2020-12",
            param=PARAM,
        )
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise bad_request(f"{WHERE} is not a valid JSON Schema: {exc.message}", param=PARAM) from None


def _limit(what: str, found: int | str, limit: int, hint: str = "") -> ApiError:
    return bad_request(
        f"{WHERE} has {found} {what}; the limit is {limit}{hint} (docs/gateway.md, response_format)", param=PARAM
    )


def _escape(token: str) -> str:
    """`token` as one JSON pointer step."""
    return token.replace("~", "~0").replace("/", "~1")


def _check_numbers(schema: dict[str, Any]) -> None:
    """Refuse integers beyond 64 bits and non-finite numbers anywhere in the schema (enum,
    const, bounds, examples, unknown keywords alike: all of it travels to the engine).
    vLLM's msgpack encoder raises on integers outside [-2**63, 2**64 - 1] (our 500), and
    xgrammar's JSON reader turns one outside [-2**63, 2**63 - 1] into a float (an enum of
    18446744073709551615 was answered 1.8446744073709552e+19); a number past 1.8e308
    reads as infinity, which json.dumps writes as `Infinity`, not JSON. It runs before the
    walk, whose multipleOf check computes with the step and the bounds beside it (a
    `multipleOf` of 1e400, infinity to the gateway's reader, was our 500 there)."""
    pending: list[tuple[dict | list, tuple]] = [(schema, ())]
    while pending:
        container, path = pending.pop()
        for step, value in container.items() if isinstance(container, dict) else enumerate(container):
            kind = type(value)  # not isinstance: a bool is an int to Python, and never too large
            if kind is dict or kind is list:
                pending.append((value, (path, step)))
            elif kind is int and not INT64_MIN <= value <= INT64_MAX:
                shown = str(value) if value.bit_length() < 1000 else f"an integer of {value.bit_length()} bits"
                raise bad_request(
                    f"{WHERE} has {shown} at {_pointer_of((path, step))}: integers must lie within 64 bits "
                    "(-2**63 to 2**63 - 1), which the structured-output backend reads exactly",
                    param=PARAM,
                )
            elif kind is float and not math.isfinite(value):
                raise bad_request(
                    f"{WHERE} has {value} at {_pointer_of((path, step))}: numbers must be finite (a JSON number "
                    "beyond 1.8e308 reads as infinity; NaN and Infinity are not JSON)",
                    param=PARAM,
                )


def _pointer_of(path: tuple) -> str:
    """The JSON pointer of a nested (parent path, key or index) tuple."""
    steps: list[str] = []
    while path:
        path, step = path
        steps.append(_escape(step) if isinstance(step, str) else str(step))
    return "/".join(["#", *reversed(steps)])


# One token of a `pattern` (ECMA-262 syntax, as xgrammar reads it), matched where the last
# one ended: a character class (to its `]`, or to the end when unterminated), an escape, a
# counted repeat, a group's opening, or any other character. Every loop is possessive and
# no token is retried, so a scan stays linear in the pattern's length however it is built.
_PATTERN_TOKEN = re.compile(
    r"(?P<charclass>\[(?:\\[\s\S]|[^\]\\])*+(?:\]|\\?\Z))"
    r"|(?P<escape>\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|c[A-Za-z]|[\s\S])?)"
    r"|(?P<repeat>\{(?P<least>[0-9]++)(?:,(?P<most>[0-9]*+))?\})"
    r"|(?P<open>\((?:\?(?:[:=!]|<[=!]|P?<\w{1,64}>))?)"
    r"|[\s\S]"
)


def _copies(digits: str) -> int:
    """A repeat count; past 10**9 (int() refuses more than 4300 digits) as 10**9."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


def _repeat_copies(repeat: re.Match) -> int:
    """The copies a counted repeat makes at most: n of `{n}` and `{m,n}`, m of `{m,}`
    (xgrammar writes m copies and a loop)."""
    least = _copies(repeat["least"])
    return max(least, _copies(repeat["most"])) if repeat["most"] else least


def _pattern_size(pattern: str, budget: int) -> tuple[int, re.Match | None]:
    """The size of `pattern` as xgrammar's automaton grows with it, counted up to just past
    `budget`: each character, class, escape, group and operator one, times the copies of
    every counted repeat it is under; and the first counted repeat of more than
    MAX_PATTERN_REPEAT copies, which xgrammar cannot compile, or None."""
    groups = [[0, 0]]  # per open group: its size so far, and the size of its last part
    size = position = 0
    while position < len(pattern) and size <= budget:
        token = _PATTERN_TOKEN.match(pattern, position)
        assert token is not None  # its last alternative matches any character
        position = token.end()
        group = groups[-1]
        if token["repeat"]:
            copies = _repeat_copies(token)
            if copies > MAX_PATTERN_REPEAT:
                return size, token
            added = group[1] * (max(copies, 1) - 1)
            group[0] += added
            group[1] += added
            size += added
        elif token["open"]:
            groups.append([1, 0])
            size += 1
        elif token.group() == ")" and len(groups) > 1:
            inner = groups.pop()[0]
            groups[-1][0] += inner
            groups[-1][1] = inner
        else:
            group[0] += 1
            group[1] = 0 if token.group() == "|" else 1
            size += 1
    return size, None


# The JSON type of each Python type the JSON reader makes.
_JSON_TYPES = {type(None): "null", bool: "boolean", str: "string", list: "array", dict: "object",
               int: "number", float: "number"}  # fmt: skip
# (keyword, how a number breaks it, the words for that)
_NUMBER_BOUNDS = (("minimum", operator.lt, "below"), ("exclusiveMinimum", operator.le, "not above"),
                  ("maximum", operator.gt, "above"), ("exclusiveMaximum", operator.ge, "not below"))  # fmt: skip
# (keyword, the JSON type it bounds, how a size breaks it, the words for that)
_SIZE_BOUNDS = (("minLength", str, operator.lt, "shorter than"), ("maxLength", str, operator.gt, "longer than"),
                ("minItems", list, operator.lt, "fewer items than"), ("maxItems", list, operator.gt, "more items than"),
                ("minProperties", dict, operator.lt, "fewer properties than"),
                ("maxProperties", dict, operator.gt, "more properties than"))  # fmt: skip


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _of_type(value: object, name: str) -> bool:
    """Whether `value` is of the JSON Schema type `name`: an integer is any number with a
    zero fraction (1.0 is one, true is not); a name that is no type (the metaschema check
    refused it) matches anything."""
    if name == "integer":
        return _is_number(value) and (isinstance(value, int) or float(value).is_integer())
    return name not in _JSON_TYPES.values() or _JSON_TYPES.get(type(value)) == name


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _broken_keyword(value: object, node: dict[str, Any], check: "_ValueCheck") -> str | None:
    """How `value`, an enum or const value of `node`, breaks one of `node`'s own type,
    bounds, lengths, counts, required names, `multipleOf`, `format` or `pattern`, or, for
    an object or array, any keyword beside it (`_ValueCheck.nested`: `properties`, `items`,
    `additionalProperties`, ... and the subschemas they lead to), or None. Each keyword is
    read only where it is well-formed, and only where the break is certain
    (`_not_multiple`, `_breaks_format`, `_PatternSearch.misses`)."""
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if kinds is not None and not any(_of_type(value, name) for name in kinds if isinstance(name, str)):
        return f"is not of its `type` {_shown(kind)}"
    if _is_number(value):
        for keyword, breaks, words in _NUMBER_BOUNDS:
            bound = node.get(keyword)
            if _is_number(bound) and breaks(value, bound):
                return f"is {words} its `{keyword}` {_shown(bound)}"
        step = node.get("multipleOf")
        if _is_number(step) and step > 0 and _not_multiple(value, step):
            return f"is not a multiple of its `multipleOf` {_shown(step)}"
    for keyword, json_type, breaks, words in _SIZE_BOUNDS:
        bound = node.get(keyword)
        if isinstance(value, json_type) and _is_number(bound) and breaks(len(value), bound):
            return f"is {words} its `{keyword}` {_shown(bound)}"
    required = node.get("required")
    if isinstance(value, dict) and isinstance(required, list):
        for name in required:
            if isinstance(name, str) and name not in value:
                return f"lacks its `required` property {_shown(name)}"
    if isinstance(value, str):
        form, pattern = node.get("format"), node.get("pattern")
        if isinstance(form, str) and _breaks_format(value, form):
            return f"is not of its `format` {_shown(form)}"
        if isinstance(pattern, str) and check.search.misses(pattern, value):
            return f"does not match its `pattern` {_shown(pattern)}"
    if isinstance(value, dict | list):
        return check.nested(value, node)
    return None


def _not_multiple(value: int | float, step: int | float) -> bool:
    """Whether `value` is certainly no multiple of `step` (> 0). Integers exactly; where a
    float is involved, both in the decimals the numbers print as (0.3 is a multiple of 0.1,
    though 0.3 / 0.1 is 2.9999999999999996 in floats) and in floats, as jsonschema divides
    (a value written with more digits than a float keeps is given the benefit)."""
    if isinstance(value, int) and isinstance(step, int):
        return value % step != 0
    if (Fraction(repr(value)) / Fraction(repr(step))).denominator == 1:
        return False
    quotient = value / step
    return math.isfinite(quotient) and not quotient.is_integer()


# The formats xgrammar enforces: vLLM passes these on and refuses any other beside "type":
# "string" (xgrammar 0.2.8 refused "nope nope" for each). A value is checked against those
# of them jsonschema's format checker knows with the packages installed (here date, email,
# ipv4, ipv6, uuid), in its words: date-time, hostname, ... go unchecked without theirs.
_ENFORCED_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname",
                               "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
                               "relative-json-pointer"})  # fmt: skip


def _breaks_format(value: str, form: str) -> bool:
    """Whether `value` is certainly not of the `format` `form` (one xgrammar enforces)."""
    if form not in _ENFORCED_FORMATS:
        return False
    import jsonschema

    try:
        return not jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms(value, form)
    except Exception:  # a checker's own failure proves nothing
        return False


# Pattern text Python's regular expressions read otherwise than ECMA-262 (JSON Schema's
# dialect) does: the escapes \a (bell), \A and \Z (anchors), \U and \N (characters), which
# ECMA-262 reads as the letter; `[:`, a POSIX class to the regex module; a brace that is no
# counted repeat (`{,3}` is {0,3} to Python, a literal to ECMA-262). A pattern with any of
# them goes unchecked (over-matching: a `\{` is taken for a bare brace, which only skips).
_NOT_ECMA = re.compile(r"(?<!\\)(?:\\\\)*\\[aAZUN]|\[:|\{(?![0-9]+(?:,[0-9]*)?\})")


@dataclass
class _PatternSearch:
    r"""Whether an enum or const value certainly does not match its `pattern`, searched as
    JSON Schema does (unanchored). Python's search backtracks, and a hostile pattern and
    value could take hours holding the GIL, so it runs in the regex module (re's syntax,
    the GIL released) under a deadline shared by every search of one schema: a search cut
    short, or a pattern Python reads otherwise (`_NOT_ECMA`), proves nothing (one Python
    cannot compile, the metaschema check has refused: "is not a 'regex'"). A value is
    refused only when it misses both with Unicode classes and with ASCII ones: ECMA-262's
    \d, \w and \b are ASCII (Python's \D, \W would refuse "٣"), its \s takes the Unicode
    spaces (Python's ASCII \s would refuse a no-break space)."""

    deadline: float = 0.0
    seen: dict[tuple[str, str], bool] = field(default_factory=dict)

    def misses(self, pattern: str, value: str) -> bool:
        if (pattern, value) not in self.seen:
            self.seen[pattern, value] = self._misses(pattern, value)
        return self.seen[pattern, value]

    def _misses(self, pattern: str, value: str) -> bool:
        import regex

        if _NOT_ECMA.search(pattern) is not None:
            return False
        if not self.deadline:
            self.deadline = time.monotonic() + PATTERN_SEARCH_SECONDS
        for flags in (0, regex.ASCII):
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                if regex.search(pattern, value, flags=flags, concurrent=True, timeout=left) is not None:
                    return False
            except (regex.error, TimeoutError, OverflowError, RecursionError, ValueError):
                return False
        return True


class _OutOfTime(Exception):
    """`_ValueCheck.nested` ran past its deadline."""


@dataclass
class _ValueCheck:
    """How enum and const values are checked against the keywords beside them: strings
    against their `pattern` (`_PatternSearch`), objects and arrays against every keyword
    beside them (`nested`). xgrammar emits an object or array value as it is, reading no
    keyword beside it: {"type": "object", "properties": {"a": {"type": "integer"}},
    "const": {"a": "x"}} was answered {"a":"x"}, {"type": "array", "items": {"type":
    "integer"}, "enum": [[1], ["a"]]} ["a"]."""

    root: dict[str, Any]
    search: _PatternSearch = field(default_factory=_PatternSearch)
    deadline: float = 0.0
    validator: Any = None  # jsonschema's, for the root's draft, built on first use (`_value_validator`)
    following: set[tuple[int, int]] = field(default_factory=set)  # (value, $ref target) pairs being checked

    def nested(self, value: dict | list, node: dict[str, Any]) -> str | None:
        """How the object or array `value`, an enum or const value of `node`, certainly
        breaks the keywords beside it, or None: jsonschema validates it against `node`
        less its own const and enum (a const beside an enum is `_broken_const`'s), with a
        `$ref` resolved in the whole schema as `_resolve` reads it (and as xgrammar does),
        and a `pattern`, `format` or `multipleOf` read as for a string or number value
        (`_broken_keyword`). A `$ref` that leads back to a target it is checking the same
        value against fails there, as the grammar xgrammar builds from it does (no finite
        answer passes through it: with x {"anyOf": [{"$ref": "#/$defs/x"}, {"type":
        "integer"}]} xgrammar 0.2.8 took 1, not "a"), so a value under a $ref cycle is
        checked as any other. Only a certain break counts: `oneOf` is read as `anyOf` (a
        branch whose pattern search was cut short counts as taking the value), keys under
        `patternProperties` go unchecked, and so does every value once the checks of one
        schema have run VALUE_CHECK_SECONDS (an anyOf of anyOfs can take exponential
        time) or recursed past Python's limit (a chain of hundreds of anyOf and $ref
        subschemas, each of them a few frames of jsonschema's)."""
        if not self.deadline:
            self.deadline = time.monotonic() + VALUE_CHECK_SECONDS
        if self.validator is None:
            self.validator = _value_validator(self)
        beside = {key: item for key, item in node.items() if key not in ("const", "enum")}
        try:
            error = next(iter(self.validator.evolve(schema=beside).iter_errors(value)), None)
        except Exception:  # _OutOfTime, RecursionError: a check that did not end proves nothing
            return None
        if error is None:
            return None
        where = "".join(f"/{_escape(str(step))}" for step in error.absolute_path)
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        return f"does not validate against the keywords beside it ({f'at {where}: ' if where else ''}{message})"

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OutOfTime


def _value_validator(check: _ValueCheck) -> Any:
    """A jsonschema validator for `check.root`'s draft, with the keywords `nested` reads
    otherwise: `$ref` through `_resolve` (failing where it leads back), `pattern`, `format` and `multipleOf` as
    `_broken_keyword` reads them (certain breaks only), `oneOf` as `anyOf`, and no
    `patternProperties` (nor `additionalProperties` or `unevaluatedProperties` beside it:
    which keys it matches is uncertain, and re would search them without a deadline).
    Types as draft 2020-12 has them (1.0 is an integer: xgrammar emits it as 1)."""
    import jsonschema

    base = jsonschema.validators.validator_for(check.root, default=jsonschema.Draft202012Validator)
    error = jsonschema.ValidationError

    def ref(validator: Any, ref: object, instance: object, schema: dict) -> Iterator[Any]:
        check.tick()
        target = _resolve(check.root, ref) if isinstance(ref, str) else None
        if isinstance(target, bool):
            yield from validator.descend(instance, target)
        elif isinstance(target, dict):
            key = (id(instance), id(target))
            if key in check.following:  # no finite answer passes here again: this way round fails
                yield error(f"{_shown(instance)} leads back to `$ref` {ref!r} with no end")
                return
            check.following.add(key)
            try:  # all of its errors at once, so that `following` holds exactly the $refs being followed
                errors = list(validator.descend(instance, target))
            finally:
                check.following.discard(key)
            yield from errors

    def pattern(validator: Any, pattern: object, instance: object, schema: dict) -> Iterator[Any]:
        if isinstance(pattern, str) and isinstance(instance, str) and check.search.misses(pattern, instance):
            yield error(f"{_shown(instance)} does not match its `pattern` {_shown(pattern)}")

    def format_(validator: Any, form: object, instance: object, schema: dict) -> Iterator[Any]:
        if isinstance(form, str) and isinstance(instance, str) and _breaks_format(instance, form):
            yield error(f"{_shown(instance)} is not of its `format` {_shown(form)}")

    def multiple_of(validator: Any, step: object, instance: object, schema: dict) -> Iterator[Any]:
        if _is_number(step) and step > 0 and _is_number(instance) and _not_multiple(instance, step):
            yield error(f"{_shown(instance)} is not a multiple of its `multipleOf` {_shown(step)}")

    def any_of(validator: Any, branches: object, instance: object, schema: dict) -> Iterator[Any]:
        check.tick()
        yield from base.VALIDATORS["anyOf"](validator, branches, instance, schema)

    def unless_patterns(keyword: str) -> Callable[..., Iterator[Any]]:
        def read(validator: Any, value: object, instance: object, schema: dict) -> Iterator[Any]:
            if "patternProperties" not in schema:
                yield from base.VALIDATORS[keyword](validator, value, instance, schema)

        return read

    def unchecked(validator: Any, value: object, instance: object, schema: dict) -> Iterator[Any]:
        return iter(())

    keywords = {"$ref": ref, "pattern": pattern, "format": format_, "multipleOf": multiple_of, "anyOf": any_of,
                "oneOf": any_of, "patternProperties": unchecked}  # fmt: skip
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if keyword in base.VALIDATORS:
            keywords[keyword] = unless_patterns(keyword)
    kind = jsonschema.validators.extend(base, keywords, type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER)
    return kind(check.root)


def _json_equal(first: object, second: object) -> bool:
    """JSON equality as JSON Schema's `const` and `enum` use it: 1 equals 1.0, true equals
    no number, object keys in any order. Iterative: a value may nest as deep as the JSON
    reader allows."""
    pending: list[tuple[object, object]] = [(first, second)]
    while pending:
        one, other = pending.pop()
        if _JSON_TYPES.get(type(one)) != _JSON_TYPES.get(type(other)):
            return False
        if isinstance(one, list) and isinstance(other, list):
            if len(one) != len(other):
                return False
            pending.extend(zip(one, other, strict=True))
        elif isinstance(one, dict) and isinstance(other, dict):
            if one.keys() != other.keys():
                return False
            pending.extend((one[key], other[key]) for key in one)
        elif one != other:
            return False
    return True


def _broken_const(node: dict[str, Any], check: "_ValueCheck") -> str | None:
    """How `node`'s const breaks a keyword beside it, as `_broken_keyword` says it, or
    breaks its `enum`: xgrammar emits the const and reads no enum beside it
    ({"const": "c", "enum": ["a", "b"]} was answered "c")."""
    const = node["const"]
    reason = _broken_keyword(const, node, check)
    values = node.get("enum")
    if reason is None and isinstance(values, list) and not any(_json_equal(const, value) for value in values):
        reason = "is not among its `enum` values"
    return reason


def _emitted_values(node: dict[str, Any], pointer: str) -> Iterator[tuple[str, str, object]]:
    """(what, pointer, value) of each value xgrammar emits for `node` as it is: its const,
    or failing that its enum values (beside a const, the enum is never emitted)."""
    if "const" in node:
        yield "`const`", f"{pointer}/const", node["const"]
    elif isinstance(node.get("enum"), list):
        for i, value in enumerate(node["enum"]):
            yield "`enum` value", f"{pointer}/enum/{i}", value


@dataclass(frozen=True)
class _Contradiction:
    """Why a subschema's enum or const values all break its other keywords: the end of a
    chain that `_why` follows."""

    reason: str


def _unmatched_values(node: dict[str, Any], check: "_ValueCheck") -> tuple[str, _Contradiction] | None:
    """Where `node` admits no value because of its `const` or `enum`, as `_failure` says
    it. xgrammar emits a subschema's const (or failing that its enum values) as they are
    and reads no keyword beside them, so one whose values all break its own type or
    bounds ({"type": "integer", "const": "a"}), or a const not among the enum beside it,
    was answered with JSON that breaks it."""
    if "const" in node:
        reason = _broken_const(node, check)
        return None if reason is None else (f"`const` {_shown(node['const'])}", _Contradiction(reason))
    values = node.get("enum")
    if not isinstance(values, list):
        return None
    if not values:
        return "`enum`", _Contradiction("is empty")
    first = _broken_keyword(values[0], node, check)
    if first is None or any(_broken_keyword(value, node, check) is None for value in values[1:]):
        return None
    return "every `enum` value", _Contradiction(f"breaks a keyword beside it (the first, {_shown(values[0])}, {first})")


def _literal_chars(value: object, budget: int) -> int:
    """Characters an enum or const value spells out (strings and object keys; other
    scalars count 1), counted up to just past `budget`."""
    total, pending = 0, [value]
    while pending and total <= budget:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(key) for key in item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        else:
            total += 1
    return total


def _resolve(root: object, ref: str) -> object | None:
    """The target of a local `$ref` ("#" or a JSON pointer "#/...") as xgrammar 0.2.8 reads
    it, or None: each name as written (it decodes no `~0`, `~1` or `%` escape), empty names
    skipped ("#/" is the root), and through objects only (in an array it finds no field
    "0"). `_misread_ref` refuses the pointers JSON Schema reads otherwise."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = root
    for token in ref[2:].split("/"):
        if not token:
            continue
        if not isinstance(node, dict) or token not in node:
            return None
        node = node[token]
    return node


def _misread_ref(ref: str) -> str | None:
    """Why xgrammar reads the local `$ref` `ref` otherwise than JSON Schema does, or None:
    it takes a name's escapes as written ("#/$defs/a~1b" found "a~1b", not "a/b": with both
    names defined it followed "a~1b", with "a/b" alone its compile failed; `~0` and `%25`
    alike) and skips an empty name ("#/" and "#//" read as "#", "#/$defs/a/" as
    "#/$defs/a"), where JSON Schema looks for the name ""."""
    for token in ref[2:].split("/") if ref.startswith("#/") else []:
        unescaped = unquote(token).replace("~1", "/").replace("~0", "~")
        if not token:
            why = "it skips an empty name in a pointer (`//`, or a `/` at its end) where JSON Schema looks for the "
            return why + 'name ""; leave the empty name out, and put its target under a name'
        if unescaped != token:
            why = f"it reads a pointer's escapes as written, looking for the name {token!r} where JSON Schema reads "
            return why + f"{unescaped!r}; rename the target so that its pointer needs no `~` or `%` escape"
    return None


def _note_multiple_of(node: dict[str, Any], ignored: Callable[[str, str], None]) -> None:
    """Note a `multipleOf` xgrammar 0.2.8 ignores in a subschema it reads by its `type` (one
    with a const, enum, applicator or $ref is read otherwise): beside "number", and beside
    "integer" unless it is a whole number up to 1024 with no bound or a lower and an upper
    one at most 10000 integers apart (it logs "ignoring multipleOf": {"type": ["number",
    "null"], "multipleOf": 0.5} took 0.3, {"type": ["integer", "null"], "multipleOf": 1.5}
    took 4, and so did multipleOf 3 with only "minimum": 0). One every integer meets (1,
    0.5) changes nothing beside "integer". vLLM refuses any multipleOf beside a numeric
    `type` string in words that do not say why; a `type` list reaches xgrammar."""
    step, kind = node.get("multipleOf"), node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    if not _is_number(step) or step <= 0 or any(key in node for key in ("$ref", "const", "enum", *_APPLICATORS)):
        return
    instead = "or list the values in an `enum`"
    if "number" in kinds:
        why = 'it enforces `multipleOf` for integers only; use "integer" if the values are whole, ' + instead
        ignored('`multipleOf` beside type "number"', why)
        return
    if "integer" not in kinds or not _not_multiple(1, step):
        return
    if not float(step).is_integer() or step > MULTIPLE_OF_MAX:
        whole = Fraction(repr(step)).numerator  # the integers that are multiples of p/q are those of p
        fix = f"on integers it means `multipleOf` {whole}: write that, {instead}" if whole <= MULTIPLE_OF_MAX else ""
        why = f'beside "integer" it enforces only a whole `multipleOf` up to {MULTIPLE_OF_MAX}; '
        why += fix or "list the values in an `enum`, or leave it out"
        ignored(f'`multipleOf` {_shown(step)} beside type "integer"', why)
        return
    bounds = {key: node[key] for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
              if _is_number(node.get(key))}  # fmt: skip
    lower = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
    lower += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
    upper = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
    upper += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
    if not lower and not upper:
        return
    if not lower or not upper:
        what = "a lower bound alone" if lower else "an upper bound alone"
    elif min(upper) - max(lower) + 1 > MULTIPLE_OF_RANGE_MAX:
        what = f"a range of more than {MULTIPLE_OF_RANGE_MAX} integers"
    else:
        return
    why = (f"it ignores an integer `multipleOf` beside one bound alone or a range of more than "
           f"{MULTIPLE_OF_RANGE_MAX} integers; give both bounds, at most {MULTIPLE_OF_RANGE_MAX} integers apart, "
           f"{instead}")  # fmt: skip
    ignored(f"`multipleOf` beside {what}", why)


# (keyword, whether it bounds from below, whether the bound itself is left out)
_RANGE = (("minimum", True, False), ("exclusiveMinimum", True, True), ("maximum", False, False),
          ("exclusiveMaximum", False, True))  # fmt: skip
_Bound = tuple[str, int | float, bool, bool]  # one of _RANGE's, with its value


def _range_refusal(node: dict[str, Any], pointer: str) -> ApiError | None:
    """The 400 for a numeric range xgrammar 0.2.8 cannot compile, in a subschema it reads by
    its `type` (one with a const, enum, applicator or $ref is read otherwise), or None. Its
    compile fails, and vLLM answers a 400 naming neither keyword nor place, for a range
    with no value ({"type": "integer", "minimum": 5, "maximum": 3}; a number's "minimum": 5
    beside "exclusiveMaximum": 5; an integer range with no multiple of the multipleOf it
    enforces, "minimum": 5, "maximum": 7, "multipleOf": 4; "exclusiveMinimum":
    9223372036854775807, past its 64 bits) and, beside "integer", for a bound with a
    fraction ("minimum": 1.5: "Integer constraint must be a whole number"; it does not round
    it inward) or one written as a float from 2**63 up on either side (1e20: "Integer
    exceeds maximum limit"). Bounds and steps are finite, integers 64-bit (`_check_numbers`
    ran first)."""
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    if any(key in node for key in ("$ref", "const", "enum", *_APPLICATORS)) or not {"integer", "number"} & {*kinds}:
        return None
    bounds = [(keyword, node[keyword], below, exclusive) for keyword, below, exclusive in _RANGE
              if _is_number(node.get(keyword))]  # fmt: skip
    words = [f"`{keyword}` {_shown(bound)}" for keyword, bound, _, _ in bounds]
    if "number" in kinds and _no_number(bounds):
        return _empty_range(pointer, "number", words)
    if "integer" not in kinds:
        return None
    # beside "number" the fix is to leave "integer" out: rounding would narrow the numbers
    fix = 'leave "integer" out of the `type` list ("number" takes the integers too)' if "number" in kinds else ""
    low = max((_inward(bound) for bound in bounds if bound[2]), default=None)
    high = min((_inward(bound) for bound in bounds if not bound[2]), default=None)
    step = node.get("multipleOf")
    whole_step = int(step) if _is_number(step) and step > 0 and float(step).is_integer() else None
    if _no_integer(low, high, None):
        return _empty_range(pointer, "integer", words, fix)
    if _no_integer(low, high, whole_step):
        return _empty_range(pointer, "integer", [*words, f"`multipleOf` {_shown(step)}"], fix)
    if _no_integer(INT64_MIN if low is None else max(low, INT64_MIN),
                   INT64_MAX if high is None else min(high, INT64_MAX), whole_step):  # fmt: skip
        return _empty_range(pointer, "64-bit integer (what the backend reads)", words, fix)
    for bound in bounds:
        keyword, value, below, exclusive = bound
        if isinstance(value, int) or (value.is_integer() and -(2**63) < value < 2**63):
            continue
        if not value.is_integer():
            why = "it takes only whole numbers as integer bounds"
            rounded = math.ceil(value) if below != exclusive else math.floor(value)
            fix = fix or f'write "{keyword}": {rounded}, the same bound on integers'
        else:
            why = "it reads integer bounds as 64-bit integers, and one written as a float only strictly within ±2**63"
            bounds_none = _inward(bound) <= INT64_MIN if below else _inward(bound) >= INT64_MAX
            fix = fix or ("leave it out, as it bounds no 64-bit integer" if bounds_none else
                          f"write it as the integer {int(value)}")  # fmt: skip
        return bad_request(
            f'{WHERE} has `{keyword}` {_shown(value)} beside type "integer" at {pointer}, which the structured-output '
            f"backend cannot compile ({why}): {fix}",
            param=PARAM,
        )
    return None


def _inward(bound: _Bound) -> int:
    """The integer a bound leaves the range of integers starting (a lower bound) or ending at."""
    _, value, below, exclusive = bound
    if below:
        return math.floor(value) + 1 if exclusive else math.ceil(value)
    return math.ceil(value) - 1 if exclusive else math.floor(value)


def _no_number(bounds: list[_Bound]) -> bool:
    """Whether no number lies within `bounds`: the stricter lower and upper bound (of equal
    ones, the exclusive) cross, or meet where either is exclusive."""
    lows = [(value, exclusive) for _, value, below, exclusive in bounds if below]
    highs = [(-value, exclusive) for _, value, below, exclusive in bounds if not below]
    if not lows or not highs:
        return False
    (low, low_exclusive), (high, high_exclusive) = max(lows), max(highs)
    return low > -high or (low == -high and (low_exclusive or high_exclusive))


def _no_integer(low: int | None, high: int | None, step: int | None) -> bool:
    """Whether no integer from `low` to `high` (None: unbounded) is a multiple of `step`
    (None: any integer is)."""
    if low is None or high is None:
        return False
    return low > high or (step is not None and -(-low // step) * step > high)


def _empty_range(pointer: str, what: str, words: list[str], fix: str = "") -> ApiError:
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return bad_request(
        f"{WHERE} has a range with no value at {pointer}: no {what} satisfies {listed}, which the structured-output "
        f"backend cannot compile{f'; {fix}' if fix else ''}",
        param=PARAM,
    )


@dataclass
class _Walk:
    """One pass over every subschema (and every local $ref target), counting what the
    limits bound and noting keywords the backend ignores. It stops at the subschema and
    depth limits, so its work stays bounded, and it is defensive: it runs before the
    metaschema check, so any keyword may hold any JSON."""

    root: dict[str, Any]
    nodes: dict[int, tuple[dict[str, Any], str]] = field(default_factory=dict)
    refs: list[str] = field(default_factory=list)
    optional: int = 0
    patterns: int = 0
    pattern_chars: int = 0
    pattern_size: int = 0
    pattern_refusal: ApiError | None = None
    enum_values: int = 0
    literal_chars: int = 0
    ignored: list[tuple[str, str, str]] = field(default_factory=list)
    draft04_bound: ApiError | None = None  # the first boolean exclusiveMinimum or exclusiveMaximum
    narrowed: ApiError | None = None  # the first bare object or array schema read through an allOf or a $ref
    key_schemas: set[int] = field(default_factory=set)  # propertyNames subschemas, which xgrammar reads as strings
    values: "_ValueCheck" = field(init=False)  # enum and const values against the keywords beside them
    unmatched: dict[int, tuple[str, _Contradiction] | None] = field(default_factory=dict)  # `_unmatched_values`'s

    def __post_init__(self) -> None:
        self.values = _ValueCheck(self.root)

    def schema(self, node: object, pointer: str, depth: int) -> None:
        if not isinstance(node, dict) or id(node) in self.nodes:
            return
        if len(self.nodes) == MAX_SUBSCHEMAS:
            raise _limit("subschemas (the root, properties, items, anyOf branches, $defs, ...)",
                         f"more than {MAX_SUBSCHEMAS}", MAX_SUBSCHEMAS)  # fmt: skip
        if depth > MAX_DEPTH:
            raise _limit("levels of nested subschemas", f"more than {MAX_DEPTH}", MAX_DEPTH, f" (at {pointer})")
        self.nodes[id(node)] = (node, pointer)
        if isinstance(node.get("propertyNames"), dict):
            self.key_schemas.add(id(node["propertyNames"]))
        self._count(node)
        self._check_patterns(node, pointer)
        self._note_ignored(node, pointer)
        self._check_narrowed(node, pointer)
        self._check_draft04(node, pointer)
        for key, child in self._children(node, pointer):
            self.schema(child, key, depth + 1)

    @staticmethod
    def _children(node: dict[str, Any], pointer: str) -> Iterator[tuple[str, object]]:
        for key in _ONE:
            if isinstance(node.get(key), dict):
                yield f"{pointer}/{key}", node[key]
        for key in _MAP:
            if isinstance(node.get(key), dict):
                for name, child in node[key].items():
                    yield f"{pointer}/{key}/{_escape(name)}", child
        for key in _LIST:
            if isinstance(node.get(key), list):
                for i, child in enumerate(node[key]):
                    yield f"{pointer}/{key}/{i}", child

    def _count(self, node: dict[str, Any]) -> None:
        properties = node.get("properties")
        if isinstance(properties, dict):
            required = node.get("required")
            names = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
            self.optional += len(properties.keys() - names)
            self.literal_chars += sum(len(name) for name in properties)
        self.patterns += isinstance(node.get("pattern"), str) or isinstance(node.get("format"), str)
        if isinstance(node.get("patternProperties"), dict):
            self.patterns += len(node["patternProperties"])
        if isinstance(node.get("enum"), list):
            self.enum_values += len(node["enum"])
            self.literal_chars += _literal_chars(node["enum"], MAX_LITERAL_CHARS - self.literal_chars)
        if "const" in node:
            self.literal_chars += _literal_chars(node["const"], MAX_LITERAL_CHARS - self.literal_chars)
        if isinstance(node.get("$ref"), str):
            self.refs.append(node["$ref"])

    def _check_patterns(self, node: dict[str, Any], pointer: str) -> None:
        """Note the first counted repeat xgrammar cannot compile, or the pattern where the
        patterns pass MAX_PATTERN_CHARS or MAX_PATTERN_SIZE in all, for `check_limits`
        (after the subschema limits, which the walk raises itself). Compile time grows with
        the size (a nested repeat multiplies it), and one repeat of 30000 copies held the
        engine's compile thread for 100 s before it failed. Scanning stops at the first
        refusal, so its work is bounded too."""
        regexes = [(f"`pattern` at {pointer}", node["pattern"])] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            where = f"`patternProperties` key at {pointer}/patternProperties"
            regexes += [(f"{where}/{_escape(key)}", key) for key in node["patternProperties"]]
        for where, regex in regexes:
            if self.pattern_refusal is not None:
                return
            self.pattern_chars += len(regex)
            if self.pattern_chars > MAX_PATTERN_CHARS:
                self.pattern_refusal = _limit("characters of pattern strings in all", f"more than {MAX_PATTERN_CHARS}",
                                              MAX_PATTERN_CHARS, f" (passed at the {where})")  # fmt: skip
                return
            size, repeat = _pattern_size(regex, MAX_PATTERN_SIZE - self.pattern_size)
            self.pattern_size += size
            if repeat is not None:
                copies = _repeat_copies(repeat)
                how = "at least" if repeat["most"] == "" else "up to"
                how = f"{how} {copies}" if copies < 10**9 else "a billion or more"
                shown = repeat.group() if len(repeat.group()) <= 24 else repeat.group()[:20] + "...}"
                self.pattern_refusal = bad_request(
                    f"{WHERE} has a {where} that repeats a part {how} times (`{shown}`); "
                    f"at most {MAX_PATTERN_REPEAT} is allowed (docs/gateway.md, response_format)",
                    param=PARAM,
                )
            elif self.pattern_size > MAX_PATTERN_SIZE:
                what = "pattern characters in all, each repeated part counted once per copy"
                self.pattern_refusal = _limit(what, f"more than {MAX_PATTERN_SIZE}", MAX_PATTERN_SIZE,
                                              f" (passed at the {where})")  # fmt: skip

    def _check_draft04(self, node: dict[str, Any], pointer: str) -> None:
        """Note the first draft-04 boolean `exclusiveMinimum`/`exclusiveMaximum`. xgrammar
        reads only draft 2020-12's number: beside a numeric `type` its compile fails
        ("Value must be a number"), without one it reads any JSON value; jsonschema's
        default draft refuses it too, in words that do not say what to write."""
        for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            flag = node.get(exclusive)
            if self.draft04_bound is not None or not isinstance(flag, bool):
                continue
            bound = node.get(inclusive)
            shown, example = (_shown(bound), "") if _is_number(bound) else ("5", "e.g. ")
            if flag:
                fix = (f"write the bound itself, draft 2020-12's number form: {example}\"{exclusive}\": {shown} in "
                       f'place of "{inclusive}": {shown}, "{exclusive}": true')  # fmt: skip
            else:
                fix = f"leave it out: false is draft-04's default, and `{inclusive}` alone is the same bound"
            self.draft04_bound = bad_request(
                f"{WHERE} has `{exclusive}` {_shown(flag)} at {pointer}, draft-04's boolean form, which the "
                f"structured-output backend does not read (it takes only a number); {fix}",
                param=PARAM,
            )

    def _check_narrowed(self, node: dict[str, Any], pointer: str) -> None:
        """Note the first bare `{"type": "object"}` or `{"type": "array"}` (annotations
        aside) that `node` reads through an allOf or a $ref. xgrammar 0.2.8, as vLLM runs it,
        takes any object (array) for one in place, but only `{}` (`[]`) for one it reaches
        through either: {"allOf": [{"type": "object"}]} refused {"a": 1}. With
        additionalProperties (items) true it takes any in both, as JSON Schema reads the
        bare one."""
        if self.narrowed is not None:
            return
        reached = []
        if isinstance(node.get("allOf"), list):
            reached += [(f"{pointer}/allOf/{i}", child, f"the `allOf` at {pointer}")
                        for i, child in enumerate(node["allOf"])]  # fmt: skip
        if isinstance(node.get("$ref"), str):
            reached.append((node["$ref"], _resolve(self.root, node["$ref"]), f"the `$ref` at {pointer}"))
        for where, target, through in reached:
            kind = target.get("type") if isinstance(target, dict) else None
            if isinstance(target, dict) and kind in ("object", "array") and target.keys() <= _BARE_KEYS:
                empty, fix = _BARE_FIXES[kind]
                self.narrowed = bad_request(
                    f'{WHERE} has a bare `"type": "{kind}"` schema at {where}, read through {through}, which the '
                    f"structured-output backend reads there as {empty} alone (though as any {kind} in place): add "
                    f"{fix} to it (docs/gateway.md, response_format)",
                    param=PARAM,
                )
                return

    def _note_ignored(self, node: dict[str, Any], pointer: str) -> None:
        def ignored(keyword: str, why: str) -> None:
            self.ignored.append((keyword, pointer, why))

        if id(node) not in self.key_schemas and not any(keyword in node for keyword in _SHAPING):
            for keyword, kind in _TYPED.items():
                if keyword in node:
                    instead = _REFUSED_TYPED.get(keyword)
                    if instead is None:
                        ignored(f"`{keyword}` without `type`", f'{_UNTYPED}; add "type": "{kind}"')
                    else:
                        why = f'{_UNTYPED}, and beside "type": "{kind}" vLLM refuses it for this backend; {instead}'
                        ignored(f"`{keyword}` without `type`", why)
        for keyword in _IGNORED:
            if keyword in node:
                ignored(f"`{keyword}`", _BROKEN)
        if node.get("uniqueItems") is True:
            ignored("`uniqueItems`", _BROKEN)
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            ignored("`allOf` with more than one schema", "it would follow only one of them; merge them into one schema")
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref != "#" and not ref.startswith("#/"):
                ignored(f"`$ref` {ref!r}", "it resolves only references into the same schema ('#' or '#/...')")
            elif (misread := _misread_ref(ref)) is not None:
                ignored(f"`$ref` {ref!r}", misread)
            beside = [keyword for keyword in _VALIDATION if keyword in node]
            if beside:
                ignored(f"`{beside[0]}` beside `$ref`", "it ignores keywords beside a $ref; move them into its target")
        else:
            self._note_beside_applicator(node, ignored)
        if id(node) not in self.key_schemas:
            _note_multiple_of(node, ignored)
        shaped = [keyword for keyword in ("pattern", "format") if keyword in node]
        lengths = [keyword for keyword in ("minLength", "maxLength") if keyword in node]
        if shaped and lengths:
            why = "it ignores string lengths beside a pattern or format; write the length into the pattern"
            ignored(f"`{lengths[0]}` beside `{shaped[0]}`", why)
        required, properties = node.get("required"), node.get("properties")
        if isinstance(required, list):
            names = properties.keys() if isinstance(properties, dict) else set()
            missing = [name for name in required if isinstance(name, str) and name not in names]
            if missing:
                ignored(f"`required` name {missing[0]!r}", "it enforces required only for names defined in properties")

    @staticmethod
    def _note_beside_applicator(node: dict[str, Any], ignored: Callable[[str, str], None]) -> None:
        """Keywords xgrammar ignores beside the anyOf, oneOf or allOf it reads (not beside a
        $ref, whose own rule names them): it reads the first of const, enum, anyOf, oneOf,
        allOf a subschema has, and nothing else of it ({"allOf": [{"type": "integer"}],
        "minimum": 3} took 1; {"anyOf": [{"type": "integer"}], "const": "a"} took "a")."""
        read = next((keyword for keyword in ("const", "enum", *_APPLICATORS) if keyword in node), None)
        if read in ("const", "enum"):
            beside = [keyword for keyword in _APPLICATORS if keyword in node]
            if beside:
                emits = "the const as it is" if read == "const" else "the enum values as they are"
                why = (f"it emits {emits} and ignores an `{beside[0]}` beside them; move the `{read}` into "
                       f"{_into(beside[0])}, or leave the `{beside[0]}` out")  # fmt: skip
                ignored(f"`{beside[0]}` beside `{read}`", why)
        elif read is not None:
            beside = [keyword for keyword in _VALIDATION if keyword in node and keyword != read]
            if beside:
                why = f"it reads only the `{read}` and ignores keywords beside it; move `{beside[0]}` into "
                why += _into(read)
                ignored(f"`{beside[0]}` beside `{read}`", why)

    def ref_targets(self) -> None:
        """Walk the targets of local refs that no subschema position reached (a pointer
        into any keyword is followed by xgrammar), as one level below the root."""
        while self.refs:
            ref = self.refs.pop()
            target = _resolve(self.root, ref)
            if isinstance(target, dict) and id(target) not in self.nodes:
                self.schema(target, ref, 1)

    def check_limits(self) -> None:
        if self.enum_values > MAX_ENUM_VALUES:
            raise _limit("enum values in all", self.enum_values, MAX_ENUM_VALUES)
        if self.literal_chars > MAX_LITERAL_CHARS:
            raise _limit("characters of property names, enum and const values in all",
                         f"more than {MAX_LITERAL_CHARS}", MAX_LITERAL_CHARS)  # fmt: skip
        if self.optional > MAX_OPTIONAL_PROPERTIES:
            raise _limit("optional properties (not in their object's required) in all", self.optional,
                         MAX_OPTIONAL_PROPERTIES, "; list more of them in required")  # fmt: skip
        if self.patterns > MAX_STRING_PATTERNS:
            raise _limit("pattern and format strings in all", self.patterns, MAX_STRING_PATTERNS)
        if self.pattern_refusal is not None:
            raise self.pattern_refusal

    def broken_value(self) -> ApiError | None:
        """The 400 for the first enum or const value, in walk order, that breaks a keyword
        beside it, or None. xgrammar emits each as it is, so {"type": "string", "enum":
        ["a", 1]} could be answered 1, and so could a property whose values all break its
        type where it is optional (the schema admits a value: one without it). Runs after
        the limits, which bound the values it reads."""
        for node, pointer in self.nodes.values():
            for what, where, value in _emitted_values(node, pointer):
                if what == "`const`":
                    reason = _broken_const(node, self.values)
                else:
                    reason = _broken_keyword(value, node, self.values)
                if reason is not None:
                    return bad_request(
                        f"{WHERE} allows an answer that does not validate: {what} {_shown(value)} at {where} "
                        f"{reason}; the structured-output backend would answer it (it emits enum and const values "
                        "as they are, reading no keyword beside them): remove the value or change the keyword",
                        param=PARAM,
                    )
        return None

    def uncompiled_range(self) -> ApiError | None:
        """The 400 for the first numeric range, in walk order, that xgrammar cannot compile
        (`_range_refusal`), or None. Runs after the metaschema check: bounds are numbers,
        a `type` a name or a list of them."""
        for node, pointer in self.nodes.values():
            refusal = _range_refusal(node, pointer) if id(node) not in self.key_schemas else None
            if refusal is not None:
                return refusal
        return None

    def no_value(self) -> ApiError | None:
        """The 400 for a root that admits no finite JSON value as xgrammar reads it, or for a
        subschema that admits none because it leads back to itself, or None.

        A least fixpoint: a subschema admits a value once its $ref target does, one of its
        anyOf/oneOf branches and all of its allOf do, and, where it must be an object or a
        non-empty array, its required properties or first items do; one with a const or
        enum only when a value of it keeps the subschema's own type, bounds and counts
        (`_unmatched_values`). Everything else (a pattern no string matches, say) counts
        as admitting a value: only what is proven is refused, and the engine's finish
        reason covers the rest.

        Below the root, a subschema whose failures lead round a cycle (`_endless`) is
        refused too: an optional property {"$ref": "#/$defs/a"} with `a` {"$ref":
        "#/$defs/a"}, or one whose object requires a property referring back to it.
        xgrammar 0.2.8 compiles it, and lets the answer start it: it took `{"p": ` and then
        no token at all (the engine's finish reason "error"), or `{"p": {"q": {"q": ` on to
        the token limit. One admitting no value for another reason (`false`, a const its
        type contradicts) is left to `broken_value` and the backend."""
        ok: set[int] = set()
        dependents: dict[int, set[int]] = {}
        for key, (node, _) in self.nodes.items():
            for child in self._needs(node):
                if isinstance(child, dict):
                    dependents.setdefault(id(child), set()).add(key)
        pending = list(self.nodes)
        while pending:
            key = pending.pop()
            if key not in ok and self._failure(self.nodes[key][0], ok) is None:
                ok.add(key)
                pending.extend(dependents.get(key, ()))
        if id(self.root) not in ok:
            return bad_request(f"{WHERE} admits no JSON value: {self._why(ok, self.root)}", param=PARAM)
        endless = self._endless(ok)
        if endless is None:
            return None
        return bad_request(
            f"{WHERE} admits no finite JSON value at {self._pointer(endless)} (an answer may still start one there, "
            f"which the structured-output backend would never end): {self._why(ok, endless)}",
            param=PARAM,
        )

    def _endless(self, ok: set[int]) -> dict[str, Any] | None:
        """The first subschema, in walk order, that admits no value because its failures
        lead round a cycle (where `_why` says "leads back to"), or None. Each failure is
        followed once: a chain ends where an earlier one did, or comes back on itself."""
        ends: dict[int, bool] = {}  # whether the failures from a subschema lead round a cycle
        for key, (node, _) in self.nodes.items():
            path: list[int] = []
            current: object = node
            while isinstance(current, dict) and id(current) not in ok and id(current) not in ends:
                ends[id(current)] = False  # until the chain's end is known; a step back here finds it
                path.append(id(current))
                failure = self._failure(current, ok)
                current = None if failure is None else failure[1]
            cycle = isinstance(current, dict) and (id(current) in path or ends.get(id(current), False))
            ends.update(dict.fromkeys(path, cycle))
            if ends.get(key):
                return node
        return None

    def _needs(self, node: dict[str, Any]) -> Iterator[object]:
        """Every subschema `_failure` may look at."""
        if isinstance(node.get("$ref"), str):
            yield _resolve(self.root, node["$ref"])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(node.get(key), list):
                yield from node[key]
        if isinstance(node.get("properties"), dict):
            yield from node["properties"].values()
        yield node.get("items")

    def _failure(self, node: dict[str, Any], ok: set[int]) -> tuple[str, object] | None:
        """The first part of `node` that admits no value, given the subschemas in `ok` that
        do: a description and the subschema to blame. None when `node` admits one."""

        def admits(child: object) -> bool:
            return child is not False and (not isinstance(child, dict) or id(child) in ok)

        if id(node) not in self.unmatched:  # _failure runs again each time a subschema it needs admits a value
            self.unmatched[id(node)] = _unmatched_values(node, self.values)
        unmatched = self.unmatched[id(node)]
        if unmatched is not None:
            return unmatched
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _resolve(self.root, ref)
            if target is not None and not admits(target):
                return f"`$ref` {ref!r}", target
        for key in ("anyOf", "oneOf"):
            branches = node.get(key)
            if isinstance(branches, list) and branches and not any(admits(b) for b in branches):
                return f"every `{key}` branch", branches[0]
        every = node.get("allOf")
        for child in every if isinstance(every, list) else []:
            if not admits(child):
                return "`allOf`", child
        kind = node.get("type")
        properties, required = node.get("properties"), node.get("required")
        if kind in ("object", ["object"], None) and isinstance(properties, dict) and isinstance(required, list):
            for name in required:
                child = properties.get(name) if isinstance(name, str) else None
                if child is not None and not admits(child):
                    return f"required property {name!r}", child
        prefix = node["prefixItems"] if isinstance(node.get("prefixItems"), list) else []
        items, min_items = node.get("items", True), node.get("minItems")
        if kind in ("array", ["array"], None) and isinstance(min_items, int) and isinstance(items, bool | dict):
            for i in range(min(min_items, len(prefix) + 1)):
                child = prefix[i] if i < len(prefix) else items
                if not admits(child):
                    return f"item {i} (minItems {min_items})", child
        return None

    def _why(self, ok: set[int], start: dict[str, Any]) -> str:
        """Follow the failures from `start` down to one that explains itself (a long chain
        with its middle steps counted, not listed)."""
        steps: list[str] = []
        seen: list[int] = []
        node: object = start
        while isinstance(node, dict) and (failure := self._failure(node, ok)) is not None:
            what, child = failure
            steps.append(f"{what} at {self._pointer(node)}")
            seen.append(id(node))
            if isinstance(child, dict) and id(child) in seen:
                steps[-1] += f" leads back to {self._pointer(child)}, so no finite value can end it"
                break
            if child is False:
                steps[-1] += " is `false`, which no value matches"
                break
            if isinstance(child, _Contradiction):
                steps[-1] += f" {child.reason}"
                break
            node = child
        if len(steps) > 7:
            steps[3:-3] = [f"({len(steps) - 6} more)"]
        return " -> ".join(steps)

    def _pointer(self, node: dict[str, Any]) -> str:
        return self.nodes[id(node)][1] if id(node) in self.nodes else "#"
