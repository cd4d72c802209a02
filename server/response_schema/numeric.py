"""Numbers in a schema: what xgrammar 0.2.8 can hold, which `multipleOf` it enforces, and
which numeric ranges it can compile.

vLLM's msgpack encoder raises on an integer outside [-2**63, 2**64 - 1] (our 500), and
xgrammar's JSON reader holds integers in 64 bits: 9223372036854775807 is exact, 2**63 and
more become floats (an enum of 18446744073709551615 was answered 1.8446744073709552e+19), a
bound past 64 bits fails its compile. The schema is JSON, so infinity and NaN (the
gateway's reader makes 1e400 infinity) reach xgrammar as `Infinity`, which it cannot parse.
Both are refused wherever they are in the schema.

A `multipleOf` xgrammar ignores where it reads the subschema by its `type` (logging
"ignoring multipleOf") is refused: beside "number" ({"type": ["number", "null"],
"multipleOf": 0.5} took 0.3), and beside "integer" unless whole and 1024 at most ({"type":
["integer", "null"], "multipleOf": 1.5} took 4) and beside no bound or both bounds at most
10000 integers apart (multipleOf 3 with "minimum": 0 alone took 4); one every integer meets
(0.5) changes nothing there. vLLM refuses any multipleOf beside a numeric `type` string, in
words that do not say why; a `type` list reaches xgrammar.

So is a numeric range xgrammar cannot compile, where it reads the subschema by its `type`:
its compile fails, and vLLM's 400 named neither keyword nor place, on a range with no value
({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "minimum": 5, "maximum": 7 and
"multipleOf": 4, a number's "minimum": 5 beside "exclusiveMaximum": 5) and, beside
"integer", on a bound with a fraction ("minimum": 1.5: it does not round it inward, so the
message names the whole bound that means the same) or written as a float from 2**63 up.
"""

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from mdlserve.server.errors import ApiError, bad_request

from .json_types import is_number
from .keywords import APPLICATORS
from .refs import pointer_of
from .refusal import PARAM, WHERE, shown_value

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the integers xgrammar's JSON reader holds exactly
# An integer `multipleOf` xgrammar enforces: a whole number up to this, and where a bound is
# given, both bounds, this many integers apart at most (its kIntegerMultipleOf*Max).
MULTIPLE_OF_MAX, MULTIPLE_OF_RANGE_MAX = 1024, 10000


def check_numbers(schema: dict[str, Any]) -> None:
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
                    f"{WHERE} has {shown} at {pointer_of((path, step))}: integers must lie within 64 bits "
                    "(-2**63 to 2**63 - 1), which the structured-output backend reads exactly",
                    param=PARAM,
                )
            elif kind is float and not math.isfinite(value):
                raise bad_request(
                    f"{WHERE} has {value} at {pointer_of((path, step))}: numbers must be finite (a JSON number "
                    "beyond 1.8e308 reads as infinity; NaN and Infinity are not JSON)",
                    param=PARAM,
                )


def not_multiple(value: int | float, step: int | float) -> bool:
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


def note_multiple_of(node: dict[str, Any], ignored: Callable[[str, str], None]) -> None:
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
    if not is_number(step) or step <= 0 or any(key in node for key in ("$ref", "const", "enum", *APPLICATORS)):
        return
    instead = "or list the values in an `enum`"
    if "number" in kinds:
        why = 'it enforces `multipleOf` for integers only; use "integer" if the values are whole, ' + instead
        ignored('`multipleOf` beside type "number"', why)
        return
    if "integer" not in kinds or not not_multiple(1, step):
        return
    if not float(step).is_integer() or step > MULTIPLE_OF_MAX:
        whole = Fraction(repr(step)).numerator  # the integers that are multiples of p/q are those of p
        fix = f"on integers it means `multipleOf` {whole}: write that, {instead}" if whole <= MULTIPLE_OF_MAX else ""
        why = f'beside "integer" it enforces only a whole `multipleOf` up to {MULTIPLE_OF_MAX}; '
        why += fix or "list the values in an `enum`, or leave it out"
        ignored(f'`multipleOf` {shown_value(step)} beside type "integer"', why)
        return
    bounds = {key: node[key] for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
              if is_number(node.get(key))}  # fmt: skip
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


def range_refusal(node: dict[str, Any], pointer: str) -> ApiError | None:
    """The 400 for a numeric range xgrammar 0.2.8 cannot compile, in a subschema it reads by
    its `type` (one with a const, enum, applicator or $ref is read otherwise), or None. Its
    compile fails, and vLLM answers a 400 naming neither keyword nor place, for a range
    with no value ({"type": "integer", "minimum": 5, "maximum": 3}; a number's "minimum": 5
    beside "exclusiveMaximum": 5; an integer range with no multiple of the multipleOf it
    enforces, "minimum": 5, "maximum": 7, "multipleOf": 4; "exclusiveMinimum":
    9223372036854775807, past its 64 bits) and, beside "integer", for a bound with a
    fraction ("minimum": 1.5: "Integer constraint must be a whole number"; it does not round
    it inward) or one written as a float from 2**63 up on either side (1e20: "Integer
    exceeds maximum limit"). Bounds and steps are finite, integers 64-bit (`check_numbers`
    ran first)."""
    kind = node.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    if any(key in node for key in ("$ref", "const", "enum", *APPLICATORS)) or not {"integer", "number"} & {*kinds}:
        return None
    bounds = [(keyword, node[keyword], below, exclusive) for keyword, below, exclusive in _RANGE
              if is_number(node.get(keyword))]  # fmt: skip
    words = [f"`{keyword}` {shown_value(bound)}" for keyword, bound, _, _ in bounds]
    if "number" in kinds and _no_number(bounds):
        return _empty_range(pointer, "number", words)
    if "integer" not in kinds:
        return None
    # beside "number" the fix is to leave "integer" out: rounding would narrow the numbers
    fix = 'leave "integer" out of the `type` list ("number" takes the integers too)' if "number" in kinds else ""
    low = max((_inward(bound) for bound in bounds if bound[2]), default=None)
    high = min((_inward(bound) for bound in bounds if not bound[2]), default=None)
    step = node.get("multipleOf")
    whole_step = int(step) if is_number(step) and step > 0 and float(step).is_integer() else None
    if _no_integer(low, high, None):
        return _empty_range(pointer, "integer", words, fix)
    if _no_integer(low, high, whole_step):
        return _empty_range(pointer, "integer", [*words, f"`multipleOf` {shown_value(step)}"], fix)
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
            f'{WHERE} has `{keyword}` {shown_value(value)} beside type "integer" at {pointer}, which the '
            f"structured-output backend cannot compile ({why}): {fix}",
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
