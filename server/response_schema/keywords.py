"""Tables of JSON Schema keywords: where subschemas sit, and how xgrammar 0.2.8 reads each
keyword (what it ignores, what it reads a subschema by)."""

# Schema-valued keywords: one schema, a name -> schema map, a list of schemas.
ONE_SCHEMA = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")  # fmt: skip
SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
SCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
IGNORED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
           "contains", "minContains", "maxContains", "$dynamicRef", "$recursiveRef")  # fmt: skip
BROKEN = "an answer that breaks it would be accepted"
# What xgrammar reads a subschema by: the first of these it has ($ref, then const, enum,
# anyOf or oneOf, allOf, type; without those, an object where a properties keyword is and
# an array where an items keyword is). A subschema with none of them is any JSON value.
SHAPING = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf", "type", "properties", "additionalProperties",
           "unevaluatedProperties", "items", "prefixItems", "unevaluatedItems")  # fmt: skip
# Keywords that bound values of one type, and the type: on a subschema xgrammar reads as
# any JSON value, it ignores them (tried one by one: {"minLength": 3} accepted "a").
TYPED = {"patternProperties": "object", "propertyNames": "object", "minProperties": "object",
         "maxProperties": "object", "minItems": "array", "maxItems": "array", "pattern": "string", "format": "string",
         "minLength": "string", "maxLength": "string", "minimum": "number", "maximum": "number",
         "exclusiveMinimum": "number", "exclusiveMaximum": "number", "multipleOf": "number"}  # fmt: skip
# Of those, the ones vLLM refuses for xgrammar beside their type ("features not supported
# by xgrammar"), and what to write instead.
REFUSED_TYPED = {"patternProperties": "name the keys in `properties`, or give every value's schema in "
                                      "`additionalProperties`",
                 "propertyNames": "name the keys in `properties`",
                 "multipleOf": "leave it out, or list the values in an `enum`"}  # fmt: skip
UNTYPED = "it reads a subschema with no `type` (nor `properties`, `items` or another keyword it takes one from) "
UNTYPED += "as any JSON value"
# Keywords that constrain a value: beside a $ref, xgrammar ignores them (annotations such
# as description, and $defs, are fine there).
VALIDATION = ("type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
              "propertyNames", "minProperties", "maxProperties", "items", "prefixItems", "additionalItems",
              "minItems", "maxItems", "unevaluatedItems", "unevaluatedProperties", "minLength", "maxLength",
              "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
              "anyOf", "oneOf", "allOf")  # fmt: skip
APPLICATORS = ("anyOf", "oneOf", "allOf")  # in the order xgrammar looks for them: it reads the first it finds
# A bare object or array schema: its type and these annotations alone. xgrammar reads one
# as any object (array) in place, as `{}` (`[]`) alone through an allOf or a $ref; with any
# other keyword beside the type (even `x-foo` or `minItems: 0`) as `{}` (`[]`) everywhere.
BARE_KEYS = frozenset({"type", "title", "description", "default", "examples", "$comment", "deprecated",
                       "readOnly", "writeOnly", "$schema"})  # fmt: skip
BARE_FIXES = {"object": ("`{}`", '"additionalProperties": true'), "array": ("`[]`", '"items": true')}
