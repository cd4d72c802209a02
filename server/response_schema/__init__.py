"""response_format JSON schemas: bounded, enforceable and satisfiable, or refused with a 400.

vLLM compiles a request's schema with xgrammar in the engine, in a thread pool no abort
reaches, and xgrammar 0.2.8 reads some schemas otherwise than JSON Schema does: it ignores
some keywords, fails to compile some schemas, and emits enum and const values without
reading the keywords beside them. So a schema is checked before it is submitted: one past
the size limits (limits.py), one xgrammar would misread (misread_keywords.py, refs.py,
numeric.py), one whose enum or const values break their own keywords (const_enum.py,
value_check.py) or that admits no finite value (no_value.py) is refused, naming the
keyword and its place; `check_response_schema` runs the checks in that order over one
walk of the schema (walk.py). So is a draft-03 schema: xgrammar ignored `extends`,
`divisibleBy` and a boolean `required`.
"""

from typing import Any

from mdlserve.server.errors import bad_request

from .numeric import check_numbers
from .refusal import PARAM, WHERE
from .walk import Walk


def check_response_schema(schema: dict[str, Any]) -> None:
    """Raise the client's 400 for a schema past the limits, not a JSON Schema, using a
    keyword the backend does not enforce, or admitting no value. Runs in a worker thread:
    the metaschema check alone takes up to 0.8 s at the limits."""
    check_numbers(schema)  # first: the walk computes with bounds and steps, which must be finite and 64-bit
    walk = Walk(schema)
    walk.schema(schema, "#", 0)
    walk.ref_targets()
    walk.note_refs_under_an_id()
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
