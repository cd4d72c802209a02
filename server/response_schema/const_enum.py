"""Enum and const values that break the keywords beside them.

xgrammar 0.2.8 emits a subschema's `const` (or failing that each `enum` value) as it is,
reading no keyword beside it, so `{"type": "integer", "const": "a"}` was answered "a" with
a 200; it emits a `const` beside an `enum` without reading the enum ({"const": "c", "enum":
["a", "b"]} took "c"). So a schema where any value it emits breaks a keyword beside it is
refused, naming the value: where some enum values are fine ({"type": "string", "enum":
["a", 1]} took 1), or where the value is an optional property's (the schema admits a value
without it, but the answer may have it). A `pattern`, `format` or `multipleOf` beside them
counts too ({"type": "string", "pattern": "^a+$", "enum": ["b"]} took "b", {"multipleOf":
3, "const": 4} took 4, {"type": "string", "format": "email", "const": "x"} took "x"; vLLM
refuses multipleOf only beside a numeric `type` string), where the break is certain
(value_check.py says how each is read).
"""

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .json_types import is_number, json_equal, of_type
from .numeric import not_multiple
from .refusal import shown_value
from .value_check import ValueCheck, breaks_format

# (keyword, how a number breaks it, the words for that)
_NUMBER_BOUNDS = (("minimum", operator.lt, "below"), ("exclusiveMinimum", operator.le, "not above"),
                  ("maximum", operator.gt, "above"), ("exclusiveMaximum", operator.ge, "not below"))  # fmt: skip
# (keyword, the JSON type it bounds, how a size breaks it, the words for that)
_SIZE_BOUNDS = (("minLength", str, operator.lt, "shorter than"), ("maxLength", str, operator.gt, "longer than"),
                ("minItems", list, operator.lt, "fewer items than"), ("maxItems", list, operator.gt, "more items than"),
                ("minProperties", dict, operator.lt, "fewer properties than"),
                ("maxProperties", dict, operator.gt, "more properties than"))  # fmt: skip


def broken_keyword(value: object, node: dict[str, Any], check: "ValueCheck") -> str | None:
    """How `value`, an enum or const value of `node`, breaks one of `node`'s own type,
    bounds, lengths, counts, required names, `multipleOf`, `format` or `pattern`, or, for
    an object or array, any keyword beside it (`ValueCheck.nested`: `properties`, `items`,
    `additionalProperties`, ... and the subschemas they lead to), or None. Each keyword is
    read only where it is well-formed, and only where the break is certain
    (`not_multiple`, `breaks_format`, `PatternSearch.misses`)."""
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if kinds is not None and not any(of_type(value, name) for name in kinds if isinstance(name, str)):
        return f"is not of its `type` {shown_value(kind)}"
    if is_number(value):
        for keyword, breaks, words in _NUMBER_BOUNDS:
            bound = node.get(keyword)
            if is_number(bound) and breaks(value, bound):
                return f"is {words} its `{keyword}` {shown_value(bound)}"
        step = node.get("multipleOf")
        if is_number(step) and step > 0 and not_multiple(value, step):
            return f"is not a multiple of its `multipleOf` {shown_value(step)}"
    for keyword, json_type, breaks, words in _SIZE_BOUNDS:
        bound = node.get(keyword)
        if isinstance(value, json_type) and is_number(bound) and breaks(len(value), bound):
            return f"is {words} its `{keyword}` {shown_value(bound)}"
    required = node.get("required")
    if isinstance(value, dict) and isinstance(required, list):
        for name in required:
            if isinstance(name, str) and name not in value:
                return f"lacks its `required` property {shown_value(name)}"
    if isinstance(value, str):
        form, pattern = node.get("format"), node.get("pattern")
        if isinstance(form, str) and breaks_format(value, form):
            return f"is not of its `format` {shown_value(form)}"
        if isinstance(pattern, str) and check.search.misses(pattern, value):
            return f"does not match its `pattern` {shown_value(pattern)}"
    if isinstance(value, dict | list):
        return check.nested(value, node)
    return None


def broken_const(node: dict[str, Any], check: "ValueCheck") -> str | None:
    """How `node`'s const breaks a keyword beside it, as `broken_keyword` says it, or
    breaks its `enum`: xgrammar emits the const and reads no enum beside it
    ({"const": "c", "enum": ["a", "b"]} was answered "c")."""
    const = node["const"]
    reason = broken_keyword(const, node, check)
    values = node.get("enum")
    if reason is None and isinstance(values, list) and not any(json_equal(const, value) for value in values):
        reason = "is not among its `enum` values"
    return reason


def emitted_values(node: dict[str, Any], pointer: str) -> Iterator[tuple[str, str, object]]:
    """(what, pointer, value) of each value xgrammar emits for `node` as it is: its const,
    or failing that its enum values (beside a const, the enum is never emitted)."""
    if "const" in node:
        yield "`const`", f"{pointer}/const", node["const"]
    elif isinstance(node.get("enum"), list):
        for i, value in enumerate(node["enum"]):
            yield "`enum` value", f"{pointer}/enum/{i}", value


@dataclass(frozen=True)
class Contradiction:
    """Why a subschema's enum or const values all break its other keywords: the end of a
    chain that `Satisfiability._why` follows."""

    reason: str


def unmatched_values(node: dict[str, Any], check: "ValueCheck") -> tuple[str, Contradiction] | None:
    """Where `node` admits no value because of its `const` or `enum`, as
    `Satisfiability._failure` says it. xgrammar emits a subschema's const (or failing that
    its enum values) as they are and reads no keyword beside them, so one whose values
    all break its own type or bounds ({"type": "integer", "const": "a"}), or a const not among the enum beside it,
    was answered with JSON that breaks it."""
    if "const" in node:
        reason = broken_const(node, check)
        return None if reason is None else (f"`const` {shown_value(node['const'])}", Contradiction(reason))
    values = node.get("enum")
    if not isinstance(values, list):
        return None
    if not values:
        return "`enum`", Contradiction("is empty")
    first = broken_keyword(values[0], node, check)
    if first is None or any(broken_keyword(value, node, check) is None for value in values[1:]):
        return None
    return "every `enum` value", Contradiction(
        f"breaks a keyword beside it (the first, {shown_value(values[0])}, {first})"
    )
