"""JSON bodies parsed within limits: element count checked before parsing, nesting bounded,
large bodies parsed in a worker thread, bodies of many elements validated there too.

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

A body of many elements is parsed and validated in a worker thread whatever its size: a
1 MB chat body of 33000 one-character messages (99,000 elements, under the bound) took
0.36 s of FastAPI's validation, 0.2 s of the unknown-field check and 0.26 s of building
the conversation, all on the event loop, which stalled /health/live and every stream for
up to a second. Each element costs 5-10 microseconds of that work, so bodies of up to
INLINE_ELEMENTS elements (a real request has a few dozen) keep the loop for a few
milliseconds at most and stay on it, without a thread hand-off. A body that fails
validation there is answered as FastAPI's RequestValidationError is (errors.py), its
message written in the worker thread as well.
"""

import asyncio
import json
from collections.abc import Callable
from functools import partial
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pydantic_core
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from mdlserve.server.errors import ApiError, validation_error

MAX_JSON_ELEMENTS = 100_000
# Bodies larger than this are joined and parsed off the event loop: a 30 s clip as base64
# 16-bit WAV (1.3 MB) stays on it; its parse takes well under a millisecond.
INLINE_PARSE_BYTES = 2 << 20
# Bodies with more elements than this are parsed and validated off the event loop, and the
# routes build their prompts from them there too (run_for_elements): a few ms of the loop at most.
INLINE_ELEMENTS = 256


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


def elements_within_bound(data: bytes, what: str = "the request body") -> int:
    """`count_elements(data)`; more than MAX_JSON_ELEMENTS is a 400."""
    elements = count_elements(data, stop_above=MAX_JSON_ELEMENTS)
    if elements > MAX_JSON_ELEMENTS:
        raise BodyRefused(f"{what} has too many JSON elements (over {MAX_JSON_ELEMENTS})")
    return elements


def loads_bounded(raw: bytes | str, what: str = "the request body") -> object:
    """Parse with the element, depth and Unicode checks; other syntax errors are raised as
    json.JSONDecodeError, which the callers (and FastAPI) answer as invalid JSON."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    elements_within_bound(data, what)
    return _parse(data, what)


def _parse(data: bytes, what: str) -> object:
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("recursion limit exceeded"):
            raise BodyRefused(f"{what} is nested too deeply") from None
        if any(word in message for word in ("surrogate", "unicode", "hex escape")):
            raise BodyRefused(f"{what} is not valid Unicode ({message})") from None
        raise json.JSONDecodeError(message, data.decode("utf-8", "replace"), 0) from None


P = ParamSpec("P")
T = TypeVar("T")


async def run_for_elements(elements: int, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)`, in a worker thread when it walks more than INLINE_ELEMENTS
    JSON elements, else here on the event loop."""
    if elements > INLINE_ELEMENTS:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


def body_elements(request: Request) -> int:
    """The JSON elements of the request's body, as BoundedJsonRequest counted them."""
    return getattr(request.state, "json_elements", 0)


class BodyInvalid(StarletteHTTPException):
    """The answer to a body that failed validation off the loop: the ApiError its
    RequestValidationError is answered with (errors.validation_error). Raised where FastAPI
    reads the body, which passes only HTTPExceptions through unchanged; BoundedJsonRoute
    raises the ApiError."""

    def __init__(self, error: ApiError):
        super().__init__(error.status, error.message)
        self.error = error


class BoundedJsonRequest(Request):
    """A request whose JSON body is parsed within the limits (loads_bounded). A body of more
    than INLINE_ELEMENTS elements is also validated, in the worker thread that parses it,
    with `validate_body`, FastAPI's validation of the route's body (set by BoundedJsonRoute):
    `json()` then returns the validated model, which FastAPI's own validation passes through
    as it is (an instance of the model is not validated again), or raises BodyInvalid."""

    validate_body: Callable[[object], tuple[object, list[dict[str, Any]]]] | None = None

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
            if len(body) > INLINE_PARSE_BYTES:  # counted off the loop too
                self._json, elements = await asyncio.to_thread(self._read, body)
            else:
                elements = elements_within_bound(body)
                self._json, _ = await run_for_elements(elements, self._read, body, elements)
            self.state.json_elements = elements
        return self._json

    def _read(self, body: bytes, elements: int | None = None) -> tuple[object, int]:
        """The parsed body (validated when it has many elements) and its element count."""
        if elements is None:
            elements = elements_within_bound(body)
        value = _parse(body, "the request body")
        if elements <= INLINE_ELEMENTS or self.validate_body is None:
            return value, elements
        model, error = self._validated(value)
        del value  # this frame stays in BodyInvalid's traceback: the parsed body is freed here
        if error is not None:
            raise BodyInvalid(error)
        return model, elements

    def _validated(self, value: object) -> tuple[object, ApiError | None]:
        """The model, or the ApiError for FastAPI's errors (as errors.py answers them), read
        in this thread and freed with this frame: the 66,000 errors of 33000 messages with a
        number as content took 0.1 s to free on the event loop after the answer."""
        assert self.validate_body is not None
        model, errors = self.validate_body(value)
        if not errors:
            return model, None
        return None, validation_error(self, RequestValidationError(errors, body=value))


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


class BoundedJsonRoute(APIRoute):
    """Routes whose JSON bodies are read by BoundedJsonRequest: within the limits, and
    validated off the loop when they have many elements, with the same errors."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()
        # What FastAPI calls to validate the body (dependencies.utils.request_body_to_args).
        validate_body = partial(self.body_field.validate, values={}, loc=("body",)) if self.body_field else None

        async def bounded(request: Request) -> Response:
            bounded_request = BoundedJsonRequest(request.scope, request.receive)
            bounded_request.validate_body = validate_body
            try:
                return await handler(bounded_request)
            except BodyInvalid as exc:
                raise exc.error from None

        return bounded
