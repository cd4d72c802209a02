"""The size limits on a response_format schema, and why each is where it is.

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

A `pattern` is compiled into an automaton with each counted repeat (`{n}`, `{m,}`,
`{m,n}`) written out copy by copy (measured as above, one or two fresh compiles each; the
151936-token vocabulary is `mdl-serve make-checkpoint --preset 7b`'s). xgrammar cannot compile a repeat of more than 128
copies: `a{129}`, `a{2,500}`, `[ab]{300}`, `(ab){200}` fail ("Check failed:
per_rule_fsm_hashes"), after a time that grows with the square of the count: `a{1000}`
0.15 s, `a{5000}` 2.4 s, `a{30000}` about 100 s (the hostile probe), in the engine's one
compile thread. So such a repeat is refused. Nested repeats multiply and do compile
(`(a{128}){128}` 0.7-1.2 s, `((a{2}){128}){128}` 2.8-3.2 s, `(.{64}){128}` 6.8 s), as
does a long pattern, so patterns are bounded by their size with the repeats written out,
1000 in all. A `.` costs most: 1000 of them compiled in 0.2-0.5 s (1.1 s once, at load
10), eight `[^"]{124}` in 0.9 s, ten `.{99}` patterns in 0.8 s; 2000 took 1.1-1.8 s.
With a 151936-token vocabulary each `.` or negated-class position costs far more
(`.{128}` 3.2-5.8 s, `[^@]{1,128}@[^@]{1,128}` 10 s; `a{128}` 0.02 s; load 4-12).
String, array and object lengths (`maxLength`, `minItems`, `maxProperties`, ...) are not
written out: xgrammar keeps them as counted grammar repeats, and with the tiny tokenizer
their compile time stays flat from 128 to 10**9 (0.05-0.13 s). With the 151936-token
vocabulary a `maxLength` costs like a `.` pattern there (16: 3.6 s, 40: 11 s, 128: 45 s,
10**5: 60 s, load 4-12), but on an H200 serving host (16 cores, vLLM's 8 compile threads)
16: 0.14 s, 128: 1.2 s, 1000 and 10**5: 1.9 s (benchmarks/results/2026-12-04-h200-lease-f):
bounded in practice, and ordinary schemas use it, so it is not bounded here.
"""

MAX_DEPTH = 10  # subschema levels below the root, each applicator one (OpenAI: 10 levels of nesting)
MAX_SUBSCHEMAS = 500  # the root, each property's schema, anyOf branch, $defs entry, ...
MAX_OPTIONAL_PROPERTIES = 100  # properties not in their object's `required`, in all
MAX_STRING_PATTERNS = 100  # `pattern` and `format` strings, and patternProperties keys
MAX_ENUM_VALUES = 1000  # in all (OpenAI: 1000)
MAX_LITERAL_CHARS = 30000  # property names, enum and const values, in all (OpenAI: 120000)
MAX_PATTERN_REPEAT = 128  # copies one counted repeat (`{n}`, `{m,}`, `{m,n}`) of a pattern makes (xgrammar's own)
MAX_PATTERN_SIZE = 1000  # pattern characters in all, each repeated part once per copy (`pattern_size`)
MAX_PATTERN_CHARS = 10000  # pattern characters in all as written (bounds the check's own scan)


def count_literal_chars(value: object, budget: int) -> int:
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
