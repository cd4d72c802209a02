"""Keywords xgrammar 0.2.8 does not read as JSON Schema does: those it silently ignores,
the bare object and array schemas it narrows, and draft-04's boolean bounds.

It ignores (tried one by one: an answer breaking them is accepted) `not`,
`if`/`then`/`else`, `allOf` of more than one schema, the `dependent*` keywords, `contains`,
`uniqueItems`, `$dynamicRef`, keywords beside a `$ref`, a `$ref` outside the document or
one it reads otherwise than JSON Schema (refs.py), a `required` name missing from
`properties`, `minLength`/`maxLength` beside a `pattern` or `format`, and the keywords that
bound one type of value (`pattern`, `minLength`, `minItems`, `minimum`, `multipleOf`,
`patternProperties`, `propertyNames`, `minProperties`, ...) in a subschema without a
`type`: lacking `type`, `const`, `enum`, `anyOf`/`oneOf`/`allOf`, `$ref` and the keywords
it infers a type from (`properties`, `additionalProperties`, `items`, `prefixItems`, the
`unevaluated*` ones), xgrammar reads a subschema as any JSON value ({"minLength": 3} took
"a", {"patternProperties": {"^a$": {"type": "integer"}}} took {"a": "x"}). A `type` list
is read type by type, each with its keywords, and a `propertyNames` subschema as a
string's. xgrammar reads a subschema by the first of `$ref`, `const`, `enum`, `anyOf`,
`oneOf`, `allOf` it has and nothing else of it, so it ignores every validation keyword
beside an `anyOf`, `oneOf` or `allOf` of any length ({"type": "string", "anyOf": [string,
integer]} took 1, {"allOf": [integer], "minimum": 3} took 1), and the applicator beside a
`const` or `enum` ({"anyOf": [integer], "const": "a"} took "a"); annotations (title,
description, default, $defs) beside them are harmless. A schema using them is refused by
name, rather than answered with JSON that does not validate. So is draft-04's boolean
`exclusiveMinimum`/`exclusiveMaximum`: beside a numeric `type` xgrammar fails to compile
it ("Value must be a number"), without one it ignores it.

A one-schema `allOf` reads as its schema in place (19 schemas tried: objects with and
without properties, strings, bounded integers, arrays with items, type lists, enums, anyOf)
but for a bare `{"type": "object"}` or `{"type": "array"}` (with annotations at most),
which xgrammar takes as any object or array in place (the root, a property, items, an anyOf
branch) and as `{}` or `[]` alone through an allOf or a $ref: {"allOf": [{"type":
"object"}]} refused {"a": 1}. Such a schema is refused, naming the fix that xgrammar reads
as any object (array) everywhere, `"additionalProperties": true` (`"items": true`); a
rewrite would need the request builder to submit what the check returns. With any other
keyword beside the type (`required: []`, `maxItems: 3`, even `x-foo`), an object without
properties or additionalProperties is `{}` alone everywhere (an array without items `[]`):
narrower than the schema, but valid, so not refused.
"""

from collections.abc import Callable
from typing import Any

from mdlserve.server.errors import ApiError, bad_request

from .json_types import is_number
from .keywords import (
    APPLICATORS,
    BARE_FIXES,
    BARE_KEYS,
    BROKEN,
    IGNORED,
    REFUSED_TYPED,
    SHAPING,
    TYPED,
    UNTYPED,
    VALIDATION,
)
from .numeric import note_multiple_of
from .refs import is_local, misread_ref, resolve
from .refusal import PARAM, WHERE, shown_value


def ignored_keywords(node: dict[str, Any], pointer: str, key_schema: bool) -> list[tuple[str, str, str]]:
    """(keyword, pointer, why) of each keyword of `node` that xgrammar 0.2.8 does not
    enforce; `key_schema` says whether `node` is a propertyNames subschema, which it
    reads as a string's."""
    found: list[tuple[str, str, str]] = []

    def ignored(keyword: str, why: str) -> None:
        found.append((keyword, pointer, why))

    if not key_schema and not any(keyword in node for keyword in SHAPING):
        for keyword, kind in TYPED.items():
            if keyword in node:
                instead = REFUSED_TYPED.get(keyword)
                if instead is None:
                    ignored(f"`{keyword}` without `type`", f'{UNTYPED}; add "type": "{kind}"')
                else:
                    why = f'{UNTYPED}, and beside "type": "{kind}" vLLM refuses it for this backend; {instead}'
                    ignored(f"`{keyword}` without `type`", why)
    for keyword in IGNORED:
        if keyword in node:
            ignored(f"`{keyword}`", BROKEN)
    if node.get("uniqueItems") is True:
        ignored("`uniqueItems`", BROKEN)
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        ignored("`allOf` with more than one schema", "it would follow only one of them; merge them into one schema")
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not is_local(ref):
            why = "it resolves only pointers into the same schema ('#' or '#/...'), reading no `$id` or `$anchor` "
            ignored(f"`$ref` {ref!r}", why + "(it took any value for a $ref to one); write the pointer to the target")
        elif (misread := misread_ref(ref)) is not None:
            ignored(f"`$ref` {ref!r}", misread)
        beside = [keyword for keyword in VALIDATION if keyword in node]
        if beside:
            ignored(f"`{beside[0]}` beside `$ref`", "it ignores keywords beside a $ref; move them into its target")
    else:
        _note_beside_applicator(node, ignored)
    if not key_schema:
        note_multiple_of(node, ignored)
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
    return found


def _note_beside_applicator(node: dict[str, Any], ignored: Callable[[str, str], None]) -> None:
    """Keywords xgrammar ignores beside the anyOf, oneOf or allOf it reads (not beside a
    $ref, whose own rule names them): it reads the first of const, enum, anyOf, oneOf,
    allOf a subschema has, and nothing else of it ({"allOf": [{"type": "integer"}],
    "minimum": 3} took 1; {"anyOf": [{"type": "integer"}], "const": "a"} took "a")."""
    read = next((keyword for keyword in ("const", "enum", *APPLICATORS) if keyword in node), None)
    if read in ("const", "enum"):
        beside = [keyword for keyword in APPLICATORS if keyword in node]
        if beside:
            emits = "the const as it is" if read == "const" else "the enum values as they are"
            why = (f"it emits {emits} and ignores an `{beside[0]}` beside them; move the `{read}` into "
                   f"{_into(beside[0])}, or leave the `{beside[0]}` out")  # fmt: skip
            ignored(f"`{beside[0]}` beside `{read}`", why)
    elif read is not None:
        beside = [keyword for keyword in VALIDATION if keyword in node and keyword != read]
        if beside:
            why = f"it reads only the `{read}` and ignores keywords beside it; move `{beside[0]}` into "
            why += _into(read)
            ignored(f"`{beside[0]}` beside `{read}`", why)


def _into(applicator: str) -> str:
    return "the `allOf` schema" if applicator == "allOf" else f"each `{applicator}` branch"


def narrowed_refusal(root: dict[str, Any], node: dict[str, Any], pointer: str) -> ApiError | None:
    """The 400 for the first bare `{"type": "object"}` or `{"type": "array"}` (annotations
    aside) that `node` reads through an allOf or a $ref, or None. xgrammar 0.2.8, as vLLM runs it,
    takes any object (array) for one in place, but only `{}` (`[]`) for one it reaches
    through either: {"allOf": [{"type": "object"}]} refused {"a": 1}. With
    additionalProperties (items) true it takes any in both, as JSON Schema reads the
    bare one."""
    reached = []
    if isinstance(node.get("allOf"), list):
        reached += [(f"{pointer}/allOf/{i}", child, f"the `allOf` at {pointer}")
                    for i, child in enumerate(node["allOf"])]  # fmt: skip
    if isinstance(node.get("$ref"), str):
        reached.append((node["$ref"], resolve(root, node["$ref"]), f"the `$ref` at {pointer}"))
    for where, target, through in reached:
        kind = target.get("type") if isinstance(target, dict) else None
        if isinstance(target, dict) and kind in ("object", "array") and target.keys() <= BARE_KEYS:
            empty, fix = BARE_FIXES[kind]
            return bad_request(
                f'{WHERE} has a bare `"type": "{kind}"` schema at {where}, read through {through}, which the '
                f"structured-output backend reads there as {empty} alone (though as any {kind} in place): add "
                f"{fix} to it (docs/gateway.md, response_format)",
                param=PARAM,
            )
    return None


def draft04_refusal(node: dict[str, Any], pointer: str) -> ApiError | None:
    """The 400 for `node`'s first draft-04 boolean `exclusiveMinimum`/`exclusiveMaximum`,
    or None. xgrammar reads only draft 2020-12's number: beside a numeric `type` its
    compile fails ("Value must be a number"), without one it reads any JSON value;
    jsonschema's default draft refuses it too, in words that do not say what to write."""
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = node.get(exclusive)
        if not isinstance(flag, bool):
            continue
        bound = node.get(inclusive)
        shown, example = (shown_value(bound), "") if is_number(bound) else ("5", "e.g. ")
        if flag:
            fix = (f"write the bound itself, draft 2020-12's number form: {example}\"{exclusive}\": {shown} in "
                   f'place of "{inclusive}": {shown}, "{exclusive}": true')  # fmt: skip
        else:
            fix = f"leave it out: false is draft-04's default, and `{inclusive}` alone is the same bound"
        return bad_request(
            f"{WHERE} has `{exclusive}` {shown_value(flag)} at {pointer}, draft-04's boolean form, which the "
            f"structured-output backend does not read (it takes only a number); {fix}",
            param=PARAM,
        )
    return None
