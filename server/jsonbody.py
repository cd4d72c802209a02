"""JSON bodies parsed within limits: element count checked before parsing, nesting bounded,
large bodies parsed in a worker thread.

A 25 MiB body of small numbers is ~12 million JSON elements: over a second of parsing on
the event loop and gigabytes of Python objects, for a request that is refused anyway.
Counting the structural bytes (`,` `[` `{`, an upper bound on the elements) refuses it
before any parsing; a real request has a few dozen elements plus its base64 audio, which
is one string. The count is three vectorised comparisons (numpy, which releases the GIL)
and the parse is pydantic-core's JSON reader: on the H200 host, `bytes.count` and
`json.loads` over 1.3 MB chat bodies were 43 % of the samples in which the gateway held
the GIL (benchmarks/results/2026-12-01-h200); both are several times faster this way.
Nesting deeper than the reader allows (200 levels) and text that is not valid Unicode
(lone surrogates, as `\\ud800` escapes or raw bytes) are refused by name.

Large bodies are also joined from their received chunks in the worker thread: joining
25 MiB on the event loop (Starlette's `Request.body`) held it for 150 ms and more on a
loaded 2-core VM (the hostile benchmark's worst stalls). A body of a few MiB is joined and
parsed on the loop: the parse holds the GIL in a worker thread as well, so the thread only
added its two hand-overs, 1.4 ms of a lone 30 s clip's time to first token on the H200
host (benchmarks/results/2026-12-03-h200-ttft-split).
"""

import asyncio
import json

import numpy as np
import pydantic_core
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_JSON_ELEMENTS = 100_000
# Bodies larger than this are joined and parsed off the event loop: a 30 s clip as base64
# 16-bit WAV (1.3 MB) stays on it; its parse takes well under a millisecond.
INLINE_PARSE_BYTES = 2 << 20


class BodyRefused(StarletteHTTPException):
    """A 400 raised while FastAPI reads the body: an HTTPException passes through its body
    parsing (anything else would become its generic 'error parsing the body')."""

    def __init__(self, message: str):
        super().__init__(400, message)


# Bytes compared at once by count_elements: its temporary masks stay this small.
COUNT_BLOCK_BYTES = 1 << 20


def count_elements(raw: bytes, stop_above: int | None = None) -> int:
    """Structural bytes in `raw`: an upper bound on its JSON elements. Counted 1 MiB at a
    time (a whole 25 MiB body made a 25 MiB mask per character); with `stop_above`, counting
    stops in the block where the count passes it."""
    data = np.frombuffer(raw, np.uint8)
    total = 0
    for start in range(0, data.size, COUNT_BLOCK_BYTES):
        block = data[start : start + COUNT_BLOCK_BYTES]
        total += sum(int(np.count_nonzero(block == ord(ch))) for ch in ",[{")
        if stop_above is not None and total > stop_above:
            break
    return total


def loads_bounded(raw: bytes | str, what: str = "the request body") -> object:
    """Parse with the element, depth and Unicode checks; other syntax errors are raised as
    json.JSONDecodeError, which the callers (and FastAPI) answer as invalid JSON."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if count_elements(data, stop_above=MAX_JSON_ELEMENTS) > MAX_JSON_ELEMENTS:
        raise BodyRefused(f"{what} has too many JSON elements (over {MAX_JSON_ELEMENTS})")
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("recursion limit exceeded"):
            raise BodyRefused(f"{what} is nested too deeply") from None
        if any(word in message for word in ("surrogate", "unicode", "hex escape")):
            raise BodyRefused(f"{what} is not valid Unicode ({message})") from None
        raise json.JSONDecodeError(message, data.decode("utf-8", "replace"), 0) from None


class BoundedJsonRequest(Request):
    async def body(self) -> bytes:
        """The body; one over INLINE_PARSE_BYTES is joined from its chunks off the loop."""
        if not hasattr(self, "_body"):
            chunks = [chunk async for chunk in self.stream()]
            size = sum(len(chunk) for chunk in chunks)
            self._body = await asyncio.to_thread(b"".join, chunks) if size > INLINE_PARSE_BYTES else b"".join(chunks)
        return self._body

    async def json(self) -> object:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > INLINE_PARSE_BYTES:
                self._json = await asyncio.to_thread(loads_bounded, body)
            else:
                self._json = loads_bounded(body)
        return self._json


def route_reading_with(request_class: type[Request]) -> type[APIRoute]:
    """An APIRoute class whose handlers see each request as `request_class`, so FastAPI's own
    body parsing goes through that class's checks."""

    class CheckedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def checked(request: Request):
                return await handler(request_class(request.scope, request.receive))

            return checked

    return CheckedRoute


# Routes whose JSON bodies are parsed with `loads_bounded`.
BoundedJsonRoute = route_reading_with(BoundedJsonRequest)
