"""Multipart bodies checked for their content type and their closing boundary.

A body sent with another content type (a JSON body posted to a form route) used to be read
as an empty form and answered "file: Field required; model: Field required"; it is a 415
naming the content type, as the JSON routes answer a form.

python-multipart parses a body that stops before its closing delimiter (`--BOUNDARY--`)
without complaint: the part it was cut in is dropped, and the request then failed as
"file: Field required", which sent the client looking at its form instead of at a body cut
short (a client that stopped sending mid-file, a proxy that truncated it). The routes'
request watches the body go by for the closing delimiter and refuses it by name when the
body ends without one. A delimiter split across two received chunks is found too.
"""

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import parse_options_header

from mdlserve.server.errors import has_body
from mdlserve.server.jsonbody import BodyRefused, route_reading_with


def close_delimiter(headers: Headers) -> bytes | None:
    """`--BOUNDARY--` of a multipart/form-data body, or None for any other body."""
    content_type, params = parse_options_header(headers.get("content-type") or "")
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        return None
    return b"--" + boundary + b"--"


# What Starlette parses as a form; any other content type it reads as an empty form.
FORM_MEDIA_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


class CheckedFormRequest(Request):
    async def _get_form(self, **limits) -> FormData:
        """Starlette's form, after refusing a body of another content type (415)."""
        content_type = self.headers.get("content-type")
        media, _ = parse_options_header(content_type or "")
        if media not in FORM_MEDIA_TYPES and (content_type or has_body(self)):
            given = f"not {content_type!r}" if content_type else "none given"
            raise StarletteHTTPException(415, f"the request body must be multipart/form-data ({given})")
        return await super()._get_form(**limits)

    async def stream(self) -> AsyncGenerator[bytes, None]:
        delimiter = close_delimiter(self.headers)
        if delimiter is None:
            async for chunk in super().stream():
                yield chunk
            return
        # Only the seam between chunks is joined (the last len - 1 bytes before it and the
        # first len - 1 after): no upload is copied whole.
        closed, tail, seam = False, b"", len(delimiter) - 1
        async for chunk in super().stream():
            if not closed and chunk:
                closed = delimiter in tail + chunk[:seam] or delimiter in chunk
                tail = (tail + chunk[-seam:])[-seam:]
            yield chunk
        if not closed:
            shown = delimiter.decode("latin-1")
            shown = shown if len(shown) <= 74 else f"{shown[:72]}...--"  # boundaries: at most 70 (RFC 2046)
            raise BodyRefused(
                f"the multipart/form-data body ends before its closing boundary ({shown}): it was cut short"
            )


# Routes whose multipart bodies must carry their closing boundary.
CheckedFormRoute = route_reading_with(CheckedFormRequest)
