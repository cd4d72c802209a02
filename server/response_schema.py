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

xgrammar 0.2.8 silently ignores some keywords (tried one by one: an answer breaking them
is accepted): `not`, `if`/`then`/`else`, `allOf` of more than one schema, the
`dependent*` keywords, `contains`, `uniqueItems`, `$dynamicRef`, keywords beside a `$ref`,
a `$ref` outside the document, a `required` name missing from `properties`, and
`minLength`/`maxLength` beside a `pattern` or `format`. A schema
using them is refused by name, rather than answered with JSON that does not validate.
A schema that admits no finite value (`{"$ref": "#"}`, a required property that refers
back to its object) leaves the model no token to continue with; the engine then ends the
request with finish reason "error", so such schemas are refused here too.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
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

# Schema-valued keywords: one schema, a name -> schema map, a list of schemas.
_ONE = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")  # fmt: skip
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_IGNORED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
            "contains", "minContains", "maxContains", "$dynamicRef", "$recursiveRef")  # fmt: skip
_BROKEN = "an answer that breaks it would be accepted"
# Keywords that constrain a value: beside a $ref, xgrammar ignores them (annotations such
# as description, and $defs, are fine there).
_VALIDATION = ("type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
               "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "additionalItems",
               "minItems", "maxItems", "unevaluatedItems", "unevaluatedProperties", "minLength", "maxLength",
               "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
               "anyOf", "oneOf", "allOf")  # fmt: skip


def check_response_schema(schema: dict[str, Any]) -> None:
    """Raise the client's 400 for a schema past the limits, not a JSON Schema, using a
    keyword the backend does not enforce, or admitting no value. Runs in a worker thread:
    the metaschema check alone takes up to 0.8 s at the limits."""
    walk = _Walk(schema)
    walk.schema(schema, "#", 0)
    walk.ref_targets()
    walk.check_limits()
    _check_metaschema(schema)
    if walk.ignored:
        keyword, pointer, why = walk.ignored[0]
        raise bad_request(
            f"{WHERE} uses {keyword} at {pointer}, which the structured-output backend does not enforce: {why}",
            param=PARAM,
        )
    reason = walk.no_value()
    if reason is not None:
        raise bad_request(f"{WHERE} admits no JSON value: {reason}", param=PARAM)


def _check_metaschema(schema: dict[str, Any]) -> None:
    import jsonschema

    if not isinstance(schema.get("$schema", ""), str):  # jsonschema looks it up in a dict: a list would raise
        raise bad_request(f"{WHERE} is not a valid JSON Schema: $schema must be a string", param=PARAM)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise bad_request(f"{WHERE} is not a valid JSON Schema: {exc.message}", param=PARAM) from None


def _limit(what: str, found: int | str, limit: int, hint: str = "") -> ApiError:
    return bad_request(
        f"{WHERE} has {found} {what}; the limit is {limit}{hint} (docs/gateway.md, response_format)", param=PARAM
    )


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
    """The target of a local `$ref` ("#" or a JSON pointer "#/..."), or None."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = root
    for raw in ref[2:].split("/") if ref != "#" else []:
        token = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


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
    enum_values: int = 0
    literal_chars: int = 0
    ignored: list[tuple[str, str, str]] = field(default_factory=list)

    def schema(self, node: object, pointer: str, depth: int) -> None:
        if not isinstance(node, dict) or id(node) in self.nodes:
            return
        if len(self.nodes) == MAX_SUBSCHEMAS:
            raise _limit("subschemas (the root, properties, items, anyOf branches, $defs, ...)",
                         f"more than {MAX_SUBSCHEMAS}", MAX_SUBSCHEMAS)  # fmt: skip
        if depth > MAX_DEPTH:
            raise _limit("levels of nested subschemas", f"more than {MAX_DEPTH}", MAX_DEPTH, f" (at {pointer})")
        self.nodes[id(node)] = (node, pointer)
        self._count(node)
        self._note_ignored(node, pointer)
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
                    yield f"{pointer}/{key}/{name.replace('~', '~0').replace('/', '~1')}", child
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

    def _note_ignored(self, node: dict[str, Any], pointer: str) -> None:
        def ignored(keyword: str, why: str) -> None:
            self.ignored.append((keyword, pointer, why))

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
            beside = [keyword for keyword in _VALIDATION if keyword in node]
            if beside:
                ignored(f"`{beside[0]}` beside `$ref`", "it ignores keywords beside a $ref; move them into its target")
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

    def no_value(self) -> str | None:
        """Why the root admits no finite JSON value as xgrammar reads it, or None.

        A least fixpoint: a subschema admits a value once its $ref target does, one of its
        anyOf/oneOf branches and all of its allOf do, and, where it must be an object or a
        non-empty array, its required properties or first items do. Everything else (a
        type that contradicts an enum, say) counts as admitting a value: only what is
        proven is refused, and the engine's finish reason covers the rest."""
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
        return None if id(self.root) in ok else self._why(ok)

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

    def _why(self, ok: set[int]) -> str:
        """Follow the failures from the root down to one that explains itself."""
        steps: list[str] = []
        seen: list[int] = []
        node: object = self.root
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
            node = child
        return " -> ".join(steps)

    def _pointer(self, node: dict[str, Any]) -> str:
        return self.nodes[id(node)][1] if id(node) in self.nodes else "#"
