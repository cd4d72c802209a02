"""`pattern` strings: their size as xgrammar's automaton grows with it (limits.py says why
it is bounded), and whether an enum or const value certainly does not match one."""

import re
import time
from dataclasses import dataclass, field

from .limits import MAX_PATTERN_REPEAT

PATTERN_SEARCH_SECONDS = 0.2  # enum and const values matched against their `pattern`, in all, per schema
# One token of a `pattern` (ECMA-262 syntax, as xgrammar reads it), matched where the last
# one ended: a character class (to its `]`, or to the end when unterminated), an escape, a
# counted repeat, a group's opening, or any other character. Every loop is possessive and
# no token is retried, so a scan stays linear in the pattern's length however it is built.
_PATTERN_TOKEN = re.compile(
    r"(?P<charclass>\[(?:\\[\s\S]|[^\]\\])*+(?:\]|\\?\Z))"
    r"|(?P<escape>\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|c[A-Za-z]|[\s\S])?)"
    r"|(?P<repeat>\{(?P<least>[0-9]++)(?:,(?P<most>[0-9]*+))?\})"
    r"|(?P<open>\((?:\?(?:[:=!]|<[=!]|P?<\w{1,64}>))?)"
    r"|[\s\S]"
)


def _copies(digits: str) -> int:
    """A repeat count; past 10**9 (int() refuses more than 4300 digits) as 10**9."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


def repeat_copies(repeat: re.Match) -> int:
    """The copies a counted repeat makes at most: n of `{n}` and `{m,n}`, m of `{m,}`
    (xgrammar writes m copies and a loop)."""
    least = _copies(repeat["least"])
    return max(least, _copies(repeat["most"])) if repeat["most"] else least


def pattern_size(pattern: str, budget: int) -> tuple[int, re.Match | None]:
    """The size of `pattern` as xgrammar's automaton grows with it, counted up to just past
    `budget`: each character, class, escape, group and operator one, times the copies of
    every counted repeat it is under; and the first counted repeat of more than
    MAX_PATTERN_REPEAT copies, which xgrammar cannot compile, or None."""
    groups = [[0, 0]]  # per open group: its size so far, and the size of its last part
    size = position = 0
    while position < len(pattern) and size <= budget:
        token = _PATTERN_TOKEN.match(pattern, position)
        assert token is not None  # its last alternative matches any character
        position = token.end()
        group = groups[-1]
        if token["repeat"]:
            copies = repeat_copies(token)
            if copies > MAX_PATTERN_REPEAT:
                return size, token
            added = group[1] * (max(copies, 1) - 1)
            group[0] += added
            group[1] += added
            size += added
        elif token["open"]:
            groups.append([1, 0])
            size += 1
        elif token.group() == ")" and len(groups) > 1:
            inner = groups.pop()[0]
            groups[-1][0] += inner
            groups[-1][1] = inner
        else:
            group[0] += 1
            group[1] = 0 if token.group() == "|" else 1
            size += 1
    return size, None


# Pattern text Python's regular expressions read otherwise than ECMA-262 (JSON Schema's
# dialect) does: the escapes \a (bell), \A and \Z (anchors), \U and \N (characters), which
# ECMA-262 reads as the letter; `[:`, a POSIX class to the regex module; a brace that is no
# counted repeat (`{,3}` is {0,3} to Python, a literal to ECMA-262). A pattern with any of
# them goes unchecked (over-matching: a `\{` is taken for a bare brace, which only skips).
_NOT_ECMA = re.compile(r"(?<!\\)(?:\\\\)*\\[aAZUN]|\[:|\{(?![0-9]+(?:,[0-9]*)?\})")


@dataclass
class PatternSearch:
    r"""Whether an enum or const value certainly does not match its `pattern`, searched as
    JSON Schema does (unanchored). Python's search backtracks, and a hostile pattern and
    value could take hours holding the GIL, so it runs in the regex module (re's syntax,
    the GIL released) under a deadline shared by every search of one schema: a search cut
    short, or a pattern Python reads otherwise (`_NOT_ECMA`), proves nothing (one Python
    cannot compile, the metaschema check has refused: "is not a 'regex'"). A value is
    refused only when it misses both with Unicode classes and with ASCII ones: ECMA-262's
    \d, \w and \b are ASCII (Python's \D, \W would refuse "٣"), its \s takes the Unicode
    spaces (Python's ASCII \s would refuse a no-break space)."""

    deadline: float = 0.0
    seen: dict[tuple[str, str], bool] = field(default_factory=dict)

    def misses(self, pattern: str, value: str) -> bool:
        if (pattern, value) not in self.seen:
            self.seen[pattern, value] = self._misses(pattern, value)
        return self.seen[pattern, value]

    def _misses(self, pattern: str, value: str) -> bool:
        import regex

        if _NOT_ECMA.search(pattern) is not None:
            return False
        if not self.deadline:
            self.deadline = time.monotonic() + PATTERN_SEARCH_SECONDS
        for flags in (0, regex.ASCII):
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                if regex.search(pattern, value, flags=flags, concurrent=True, timeout=left) is not None:
                    return False
            except (regex.error, TimeoutError, OverflowError, RecursionError, ValueError):
                return False
        return True
