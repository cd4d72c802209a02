"""JSON values as JSON Schema compares them: their type names, integers, equality."""

from typing import TypeGuard

# The JSON type of each Python type the JSON reader makes.
JSON_TYPES = {type(None): "null", bool: "boolean", str: "string", list: "array", dict: "object",
              int: "number", float: "number"}  # fmt: skip


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def of_type(value: object, name: str) -> bool:
    """Whether `value` is of the JSON Schema type `name`: an integer is any number with a
    zero fraction (1.0 is one, true is not); a name that is no type (the metaschema check
    refused it) matches anything."""
    if name == "integer":
        return is_number(value) and (isinstance(value, int) or float(value).is_integer())
    return name not in JSON_TYPES.values() or JSON_TYPES.get(type(value)) == name


def json_equal(first: object, second: object) -> bool:
    """JSON equality as JSON Schema's `const` and `enum` use it: 1 equals 1.0, true equals
    no number, object keys in any order. Iterative: a value may nest as deep as the JSON
    reader allows."""
    pending: list[tuple[object, object]] = [(first, second)]
    while pending:
        one, other = pending.pop()
        if JSON_TYPES.get(type(one)) != JSON_TYPES.get(type(other)):
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
