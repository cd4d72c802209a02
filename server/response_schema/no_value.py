"""Schemas that admit no finite JSON value as xgrammar 0.2.8 reads them.

A schema that admits no finite value (`{"$ref": "#"}`, a required property that refers back
to its object) leaves the model no token to continue with; the engine then ends the request
with finish reason "error", so such schemas are refused, and so is a subschema that admits
none because it leads back to itself, an optional property's say: xgrammar let the answer
start it, and then allowed no token, or wrote `{"q": {"q": ` on to the token limit. So is
one whose `const` or `enum` values all break its own type, bounds or counts (const_enum.py).
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mdlserve.server.errors import ApiError, bad_request

from .const_enum import Contradiction, unmatched_values
from .refs import resolve
from .refusal import PARAM, WHERE
from .value_check import TooDeep, ValueCheck, too_deep


@dataclass
class Satisfiability:
    """Which subschemas admit a finite JSON value as xgrammar reads them: `refusal` says
    where none is. `nodes` are the walk's subschemas (id -> (subschema, pointer)), in walk
    order; `values` checks their enum and const values."""

    root: dict[str, Any]
    nodes: dict[int, tuple[dict[str, Any], str]]
    values: ValueCheck
    unmatched: dict[int, tuple[str, Contradiction] | None] = field(default_factory=dict)  # `unmatched_values`'s

    def refusal(self) -> ApiError | None:
        """The 400 for a root that admits no finite JSON value as xgrammar reads it, or for a
        subschema that admits none because it leads back to itself, or None.

        A least fixpoint: a subschema admits a value once its $ref target does, one of its
        anyOf/oneOf branches and all of its allOf do, and, where it must be an object or a
        non-empty array, its required properties or first items do; one with a const or
        enum only when a value of it keeps the subschema's own type, bounds and counts
        (`unmatched_values`). Everything else (a pattern no string matches, say) counts
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
            yield resolve(self.root, node["$ref"])
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
            try:
                self.unmatched[id(node)] = unmatched_values(node, self.values)
            except TooDeep:
                raise too_deep(self._pointer(node)) from None
        unmatched = self.unmatched[id(node)]
        if unmatched is not None:
            return unmatched
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = resolve(self.root, ref)
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
            if isinstance(child, Contradiction):
                steps[-1] += f" {child.reason}"
                break
            node = child
        if len(steps) > 7:
            steps[3:-3] = [f"({len(steps) - 6} more)"]
        return " -> ".join(steps)

    def _pointer(self, node: dict[str, Any]) -> str:
        return self.nodes[id(node)][1] if id(node) in self.nodes else "#"
