"""How an enum or const value is checked against the keywords beside it, where xgrammar
0.2.8 emits the value as it is and reads none of them.

A string value is searched with its `pattern` unanchored, as JSON Schema does, in Python's
syntax (`PatternSearch`); a number tried against `multipleOf` in exact decimals (0.3 is a
multiple of 0.1, though not in floats) and in floats; a string against a `format` xgrammar
enforces by jsonschema's format checker (date, email, ipv4, ipv6 and uuid with the packages
installed). An object or array value is validated against every keyword beside it, down
through its items and properties ({"type": "object", "properties": {"a": {"type":
"integer"}}, "const": {"a": "x"}} was answered {"a":"x"}, an `items` or
`additionalProperties` beside an enum alike), by jsonschema for the schema's draft with
draft 2020-12's types (xgrammar writes 1.0 as 1), a `$ref` resolved in the whole schema as
xgrammar reads it, and pattern, format and multipleOf as above. Where the break is not
certain it counts as none: `oneOf` is read as `anyOf`, `patternProperties` keys go
unchecked, and so does everything once a schema's checks have run 0.5 s (branches
multiply). A chain of $refs as long as the limits allow is checked to its end: one
jsonschema call follows a few $refs, each inside the last, and hands the next to a call of
its own. A `$ref` cycle is followed as xgrammar's grammar reads it: a value that comes back
to a `$ref` target it is being checked against fails that way round (with x {"anyOf":
[{"$ref": "#/$defs/x"}, {"type": "integer"}]}, xgrammar took 1, not "a").
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mdlserve.server.errors import ApiError, bad_request

from .json_types import is_number, json_equal
from .numeric import not_multiple
from .patterns import PatternSearch
from .refs import escape, resolve
from .refusal import PARAM, WHERE, shown_value

VALUE_CHECK_SECONDS = 0.5  # enum and const objects and arrays validated against the keywords beside them, per schema
# `$ref`s one jsonschema call follows inside each other before it hands the next one to a
# call of its own (`ValueCheck.nested`): each is a few frames of jsonschema's per schema
# level between them (up to MAX_DEPTH), and the call must stay well inside Python's limit.
NESTED_REFS_PER_CALL = 4
# The formats xgrammar enforces: vLLM passes these on and refuses any other beside "type":
# "string" (xgrammar 0.2.8 refused "nope nope" for each). A value is checked against those
# of them jsonschema's format checker knows with the packages installed (here date, email,
# ipv4, ipv6, uuid), in its words: date-time, hostname, ... go unchecked without theirs.
_ENFORCED_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname",
                               "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
                               "relative-json-pointer"})  # fmt: skip


def breaks_format(value: str, form: str) -> bool:
    """Whether `value` is certainly not of the `format` `form` (one xgrammar enforces)."""
    if form not in _ENFORCED_FORMATS:
        return False
    import jsonschema

    try:
        return not jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms(value, form)
    except Exception:  # a checker's own failure proves nothing
        return False


class _OutOfTime(Exception):
    """`ValueCheck.nested` ran past its deadline."""


@dataclass
class ValueCheck:
    """How enum and const values are checked against the keywords beside them: strings
    against their `pattern` (`PatternSearch`), objects and arrays against every keyword
    beside them (`nested`). xgrammar emits an object or array value as it is, reading no
    keyword beside it: {"type": "object", "properties": {"a": {"type": "integer"}},
    "const": {"a": "x"}} was answered {"a":"x"}, {"type": "array", "items": {"type":
    "integer"}, "enum": [[1], ["a"]]} ["a"]."""

    root: dict[str, Any]
    search: PatternSearch = field(default_factory=PatternSearch)
    deadline: float = 0.0
    validator: Any = None  # jsonschema's, for the root's draft, built on first use (`_value_validator`)
    following: set[tuple[int, int]] = field(default_factory=set)  # (value, $ref target) pairs being checked
    # the errors of (value, $ref target, `following`) checked in calls of their own (`_Deeper`)
    checked: dict[tuple[int, int, frozenset[tuple[int, int]]], list[Any]] = field(default_factory=dict)

    def nested(self, value: dict | list, node: dict[str, Any]) -> str | None:
        """How the object or array `value`, an enum or const value of `node`, certainly
        breaks the keywords beside it, or None: jsonschema validates it against `node`
        less its own const and enum (a const beside an enum is `broken_const`'s), with a
        `$ref` resolved in the whole schema as `resolve` reads it (and as xgrammar does),
        and a `pattern`, `format` or `multipleOf` read as for a string or number value
        (`broken_keyword`). A `$ref` that leads back to a target it is checking the same
        value against fails there, as the grammar xgrammar builds from it does (no finite
        answer passes through it: with x {"anyOf": [{"$ref": "#/$defs/x"}, {"type":
        "integer"}]} xgrammar 0.2.8 took 1, not "a"), so a value under a $ref cycle is
        checked as any other. Only a certain break counts: `oneOf` is read as `anyOf` (a
        branch whose pattern search was cut short counts as taking the value), keys under
        `patternProperties` go unchecked, and so does every value once the checks of one
        schema have run VALUE_CHECK_SECONDS (an anyOf of anyOfs can take exponential
        time).

        jsonschema recurses a few frames per subschema, and a chain of $refs (hundreds of
        `$defs` entries, each an anyOf of a $ref to the next, which xgrammar compiles) or
        a value nested as deep as the JSON reader allows through a recursive $ref would
        take one call past Python's recursion limit. So a call follows at most
        NESTED_REFS_PER_CALL $refs inside each other: the next one is checked in a call of
        its own, from an explicit stack (`_check_deeper`), with the same $refs being
        followed, and the call that needed it starts over and finds its errors
        (`checked`). A RecursionError all the same (a bug of ours) is `TooDeep`, a 400,
        never a pass."""
        if not self.deadline:
            self.deadline = time.monotonic() + VALUE_CHECK_SECONDS
        if self.validator is None:
            self.validator = _value_validator(self)
        beside = {key: item for key, item in node.items() if key not in ("const", "enum")}
        while True:
            try:
                error = next(iter(self.validator.evolve(schema=beside).iter_errors(value)), None)
                break
            except _Deeper as deeper:
                if not self._check_deeper(deeper):
                    return None
            except _OutOfTime:  # a check that did not end proves nothing
                return None
            except RecursionError:
                raise TooDeep from None
        if error is None:
            return None
        where = "".join(f"/{escape(str(step))}" for step in error.absolute_path)
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        return f"does not validate against the keywords beside it ({f'at {where}: ' if where else ''}{message})"

    def _check_deeper(self, first: "_Deeper") -> bool:
        """Check the $ref `first` names, and each deeper one its check needs, in calls of
        their own (innermost first), keeping their errors in `checked`; False when the
        checks ran out of time."""
        pending = [first]
        while pending:
            deeper = pending[-1]
            self.following = {*deeper.following, deeper.key}
            try:
                errors = list(self.validator.descend(deeper.instance, deeper.target))
            except _Deeper as deepest:
                pending.append(deepest)
                continue
            except _OutOfTime:
                return False
            except RecursionError:
                raise TooDeep from None
            finally:
                self.following = set()
            self.checked[(*deeper.key, deeper.following)] = errors
            pending.pop()
        return True

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OutOfTime


class TooDeep(Exception):
    """A value's check recursed past Python's limit, which `ValueCheck.nested` is built
    never to do: the value is refused as unchecked (`too_deep`) rather than passed."""


def too_deep(pointer: str) -> ApiError:
    return bad_request(
        f"{WHERE} has enum or const values at {pointer} whose check against the keywords beside them nests too "
        "deep for the gateway to finish; shorten the chains of `$ref` and `anyOf` they pass through",
        param=PARAM,
    )


@dataclass
class _Deeper(Exception):
    """The check of `instance` against the $ref target `target` is to run in a call of its
    own (`ValueCheck.nested`), with the (value, target) pairs in `following` being followed."""

    instance: object
    target: dict[str, Any]
    following: frozenset[tuple[int, int]]

    @property
    def key(self) -> tuple[int, int]:
        return id(self.instance), id(self.target)


def _value_validator(check: ValueCheck) -> Any:
    """A jsonschema validator for `check.root`'s draft, with the keywords `nested` reads
    otherwise: `$ref` through `resolve` (failing where it leads back), `pattern`, `format` and `multipleOf` as
    `broken_keyword` reads them (certain breaks only), `oneOf` as `anyOf`, and no
    `patternProperties` (nor `additionalProperties` or `unevaluatedProperties` beside it:
    which keys it matches is uncertain, and re would search them without a deadline).
    Types as draft 2020-12 has them (1.0 is an integer: xgrammar emits it as 1)."""
    import jsonschema

    base = jsonschema.validators.validator_for(check.root, default=jsonschema.Draft202012Validator)
    error = jsonschema.ValidationError

    def ref(validator: Any, ref: object, instance: object, schema: dict) -> Iterator[Any]:
        check.tick()
        target = resolve(check.root, ref) if isinstance(ref, str) else None
        if isinstance(target, bool):
            yield from validator.descend(instance, target)
        elif isinstance(target, dict):
            key = (id(instance), id(target))
            if key in check.following:  # no finite answer passes here again: this way round fails
                yield error(f"{shown_value(instance)} leads back to `$ref` {ref!r} with no end")
                return
            following = frozenset(check.following)
            if (*key, following) in check.checked:  # checked in a call of its own: copies, which descend amends
                yield from (found.create_from(found) for found in check.checked[(*key, following)])
                return
            if len(following) >= NESTED_REFS_PER_CALL:
                raise _Deeper(instance, target, following)
            check.following.add(key)
            try:  # all of its errors at once, so that `following` holds exactly the $refs being followed
                errors = list(validator.descend(instance, target))
            finally:
                check.following.discard(key)
            yield from errors

    def pattern(validator: Any, pattern: object, instance: object, schema: dict) -> Iterator[Any]:
        if isinstance(pattern, str) and isinstance(instance, str) and check.search.misses(pattern, instance):
            yield error(f"{shown_value(instance)} does not match its `pattern` {shown_value(pattern)}")

    def format_(validator: Any, form: object, instance: object, schema: dict) -> Iterator[Any]:
        if isinstance(form, str) and isinstance(instance, str) and breaks_format(instance, form):
            yield error(f"{shown_value(instance)} is not of its `format` {shown_value(form)}")

    def multiple_of(validator: Any, step: object, instance: object, schema: dict) -> Iterator[Any]:
        if is_number(step) and step > 0 and is_number(instance) and not_multiple(instance, step):
            yield error(f"{shown_value(instance)} is not a multiple of its `multipleOf` {shown_value(step)}")

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

    def const(validator: Any, const: object, instance: object, schema: dict) -> Iterator[Any]:
        if not json_equal(instance, const):  # jsonschema's equal recurses per level of the values
            yield error(f"{const!r} was expected")

    def enum(validator: Any, values: object, instance: object, schema: dict) -> Iterator[Any]:
        if isinstance(values, list) and not any(json_equal(value, instance) for value in values):
            yield error(f"{instance!r} is not one of {values!r}")

    keywords = {"$ref": ref, "pattern": pattern, "format": format_, "multipleOf": multiple_of, "anyOf": any_of,
                "oneOf": any_of, "patternProperties": unchecked}  # fmt: skip
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if keyword in base.VALIDATORS:
            keywords[keyword] = unless_patterns(keyword)
    keywords |= {keyword: read for keyword, read in (("const", const), ("enum", enum)) if keyword in base.VALIDATORS}
    kind = jsonschema.validators.extend(base, keywords, type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER)
    return kind(check.root)
