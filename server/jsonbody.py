"""JSON bodies parsed within limits: element count checked before parsing, nesting bounded,
large bodies parsed in a worker thread.

A 25 MiB body of small numbers is ~12 million JSON elements: over a second of parsing on
the event loop and gigabytes of Python objects, for a request that is refused anyway.
Counting the structural characters (`,` `[` `{`, a C-speed byte count, an upper bound on
the elements) refuses it before any parsing; a real request has a few dozen elements
plus its base64 audio, which is one string. Nesting deeper than Python's parser allows
(about 1000 levels) is refused by name instead of becoming a generic error.
"""

import asyncio
import json

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_JSON_ELEMENTS = 100_000
# Bodies larger than this are parsed off the event loop.
INLINE_PARSE_BYTES = 256 << 10


class JsonRefused(StarletteHTTPException):
    """A 400 raised while FastAPI reads the body: an HTTPException passes through its body
    parsing (anything else would become its generic 'error parsing the body')."""

    def __init__(self, message: str):
        super().__init__(400, message)


def loads_bounded(raw: bytes | str, what: str = "the request body") -> object:
    """json.loads with the element and depth limits; JSONDecodeError is left to the caller."""
    structural = (b",", b"[", b"{") if isinstance(raw, bytes) else (",", "[", "{")
    elements = sum(raw.count(ch) for ch in structural)  # type: ignore[arg-type]
    if elements > MAX_JSON_ELEMENTS:
        raise JsonRefused(f"{what} has too many JSON elements (over {MAX_JSON_ELEMENTS})")
    try:
        return json.loads(raw)
    except RecursionError:
        raise JsonRefused(f"{what} is nested too deeply") from None


class BoundedJsonRequest(Request):
    async def json(self) -> object:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > INLINE_PARSE_BYTES:
                self._json = await asyncio.to_thread(loads_bounded, body)
            else:
                self._json = loads_bounded(body)
        return self._json


class BoundedJsonRoute(APIRoute):
    """An APIRoute whose handler parses its JSON body with `loads_bounded`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request):
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded
