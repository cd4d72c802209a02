"""One pass over a schema's subschemas, gathering what the checks read."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mdlserve.server.errors import ApiError, bad_request

from .const_enum import broken_const, broken_keyword, emitted_values
from .keywords import ONE_SCHEMA, SCHEMA_LIST, SCHEMA_MAP
from .limits import (
    MAX_DEPTH,
    MAX_ENUM_VALUES,
    MAX_LITERAL_CHARS,
    MAX_OPTIONAL_PROPERTIES,
    MAX_PATTERN_CHARS,
    MAX_PATTERN_REPEAT,
    MAX_PATTERN_SIZE,
    MAX_STRING_PATTERNS,
    MAX_SUBSCHEMAS,
    count_literal_chars,
)
from .misread_keywords import draft04_refusal, ignored_keywords, narrowed_refusal
from .no_value import Satisfiability
from .numeric import range_refusal
from .patterns import pattern_size, repeat_copies
from .refs import escape, id_keyword, is_local, own_base, resolve
from .refusal import PARAM, WHERE, limit_refusal, shown_value
from .value_check import TooDeep, ValueCheck, too_deep


@dataclass
class Walk:
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
    bases: list[tuple[str, str]] = field(default_factory=list)  # (pointer, $id) of subschemas with a base of their own
    values: "ValueCheck" = field(init=False)  # enum and const values against the keywords beside them

    def __post_init__(self) -> None:
        self.values = ValueCheck(self.root)

    def schema(self, node: object, pointer: str, depth: int) -> None:
        if not isinstance(node, dict) or id(node) in self.nodes:
            return
        if len(self.nodes) == MAX_SUBSCHEMAS:
            raise limit_refusal(
                "subschemas (the root, properties, items, anyOf branches, $defs, ...)",
                f"more than {MAX_SUBSCHEMAS}",
                MAX_SUBSCHEMAS,
            )
        if depth > MAX_DEPTH:
            raise limit_refusal("levels of nested subschemas", f"more than {MAX_DEPTH}", MAX_DEPTH, f" (at {pointer})")
        self.nodes[id(node)] = (node, pointer)
        if node is not self.root and (base := own_base(node, id_keyword(self.root))) is not None:
            self.bases.append((pointer, base))
        if isinstance(node.get("propertyNames"), dict):
            self.key_schemas.add(id(node["propertyNames"]))
        self._count(node)
        self._check_patterns(node, pointer)
        self.ignored += ignored_keywords(node, pointer, id(node) in self.key_schemas)
        if self.narrowed is None:
            self.narrowed = narrowed_refusal(self.root, node, pointer)
        if self.draft04_bound is None:
            self.draft04_bound = draft04_refusal(node, pointer)
        for key, child in self._children(node, pointer):
            self.schema(child, key, depth + 1)

    @staticmethod
    def _children(node: dict[str, Any], pointer: str) -> Iterator[tuple[str, object]]:
        for key in ONE_SCHEMA:
            if isinstance(node.get(key), dict):
                yield f"{pointer}/{key}", node[key]
        for key in SCHEMA_MAP:
            if isinstance(node.get(key), dict):
                for name, child in node[key].items():
                    yield f"{pointer}/{key}/{escape(name)}", child
        for key in SCHEMA_LIST:
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
            self.literal_chars += count_literal_chars(node["enum"], MAX_LITERAL_CHARS - self.literal_chars)
        if "const" in node:
            self.literal_chars += count_literal_chars(node["const"], MAX_LITERAL_CHARS - self.literal_chars)
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
            regexes += [(f"{where}/{escape(key)}", key) for key in node["patternProperties"]]
        for where, regex in regexes:
            if self.pattern_refusal is not None:
                return
            self.pattern_chars += len(regex)
            if self.pattern_chars > MAX_PATTERN_CHARS:
                self.pattern_refusal = limit_refusal(
                    "characters of pattern strings in all",
                    f"more than {MAX_PATTERN_CHARS}",
                    MAX_PATTERN_CHARS,
                    f" (passed at the {where})",
                )
                return
            size, repeat = pattern_size(regex, MAX_PATTERN_SIZE - self.pattern_size)
            self.pattern_size += size
            if repeat is not None:
                copies = repeat_copies(repeat)
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
                self.pattern_refusal = limit_refusal(
                    what, f"more than {MAX_PATTERN_SIZE}", MAX_PATTERN_SIZE, f" (passed at the {where})"
                )

    def ref_targets(self) -> None:
        """Walk the targets of local refs that no subschema position reached (a pointer
        into any keyword is followed by xgrammar), as one level below the root."""
        while self.refs:
            ref = self.refs.pop()
            target = resolve(self.root, ref)
            if isinstance(target, dict) and id(target) not in self.nodes:
                self.schema(target, ref, 1)

    def note_refs_under_an_id(self) -> None:
        """Note each local `$ref` in a subschema below the root with a `$id` of its own
        (`own_base`), after the walk has found them all. JSON Schema resolves its pointer
        against that subschema, xgrammar 0.2.8 against the root (it reads no `$id`): with
        "b" {"$id": "http://x.test/b.json", "$defs": {"c": integer}, "properties": {"q":
        {"$ref": "#/$defs/c"}}} beside the root's own "c" (a string), it took {"q": "s"} and
        refused {"q": 1}, and without the root's "c" it failed to compile ("Cannot find
        field c"); "#" there it read as the root. A `$id` with no local `$ref` under it
        changes nothing xgrammar reads."""
        for node, pointer in self.nodes.values():
            ref = node.get("$ref")
            if not isinstance(ref, str) or not is_local(ref):
                continue
            for where, base in self.bases:
                if pointer == where or pointer.startswith(where + "/"):
                    keyword = id_keyword(self.root)
                    why = (
                        f"it resolves the pointer against the root, and JSON Schema against the `{keyword}` "
                        f"{base!r} at {where}; leave that `{keyword}` out and write the pointer from the root"
                    )
                    self.ignored.append((f"`$ref` {ref!r} under a `{keyword}`", pointer, why))
                    break

    def check_limits(self) -> None:
        if self.enum_values > MAX_ENUM_VALUES:
            raise limit_refusal("enum values in all", self.enum_values, MAX_ENUM_VALUES)
        if self.literal_chars > MAX_LITERAL_CHARS:
            raise limit_refusal(
                "characters of property names, enum and const values in all",
                f"more than {MAX_LITERAL_CHARS}",
                MAX_LITERAL_CHARS,
            )
        if self.optional > MAX_OPTIONAL_PROPERTIES:
            raise limit_refusal(
                "optional properties (not in their object's required) in all",
                self.optional,
                MAX_OPTIONAL_PROPERTIES,
                "; list more of them in required",
            )
        if self.patterns > MAX_STRING_PATTERNS:
            raise limit_refusal("pattern and format strings in all", self.patterns, MAX_STRING_PATTERNS)
        if self.pattern_refusal is not None:
            raise self.pattern_refusal

    def broken_value(self) -> ApiError | None:
        """The 400 for the first enum or const value, in walk order, that breaks a keyword
        beside it, or None. xgrammar emits each as it is, so {"type": "string", "enum":
        ["a", 1]} could be answered 1, and so could a property whose values all break its
        type where it is optional (the schema admits a value: one without it). Runs after
        the limits, which bound the values it reads."""
        for node, pointer in self.nodes.values():
            for what, where, value in emitted_values(node, pointer):
                try:
                    reason = (
                        broken_const(node, self.values)
                        if what == "`const`"
                        else broken_keyword(value, node, self.values)
                    )
                except TooDeep:
                    return too_deep(pointer)
                if reason is not None:
                    return bad_request(
                        f"{WHERE} allows an answer that does not validate: {what} {shown_value(value)} at {where} "
                        f"{reason}; the structured-output backend would answer it (it emits enum and const values "
                        "as they are, reading no keyword beside them): remove the value or change the keyword",
                        param=PARAM,
                    )
        return None

    def uncompiled_range(self) -> ApiError | None:
        """The 400 for the first numeric range, in walk order, that xgrammar cannot compile
        (`range_refusal`), or None. Runs after the metaschema check: bounds are numbers,
        a `type` a name or a list of them."""
        for node, pointer in self.nodes.values():
            refusal = range_refusal(node, pointer) if id(node) not in self.key_schemas else None
            if refusal is not None:
                return refusal
        return None

    def no_value(self) -> ApiError | None:
        """The 400 for a subschema that admits no finite JSON value (`Satisfiability`), or None."""
        return Satisfiability(self.root, self.nodes, self.values).refusal()
