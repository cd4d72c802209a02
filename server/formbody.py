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

import codecs
from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import Request
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from mdlserve.server.errors import has_body, quoted_header, unsupported_encoding
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
# Text fields and files a form may hold (Starlette's defaults: 1000 of each); the forms
# declare at most 21 fields and one file. FastAPI (collecting undeclared fields) and
# deps.single_valued_form look each field name up by scanning the whole form, so the event
# loop's work grows with the square of the count: 990 unknown fields held it for 60 ms,
# 990 files for 80 ms. More is a 400 from the parser ("Too many fields").
MAX_FORM_FIELDS = 100
MAX_FORM_FILES = 10


class FormFieldRefused(StarletteHTTPException):
    """A 400 about one form field (`param`), raised while the form is parsed: an
    HTTPException passes through FastAPI's body parsing (server/errors.py keeps `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(400, message)
        self.param = param


class TextFieldsDecodedStrictly(MultiPartParser):
    """Starlette's multipart parser, except for how text fields are decoded: in the charset
    their part declares (`Content-Type: text/plain; charset=shift_jis`), else the form's
    (UTF-8 unless the request's Content-Type names another), and a field whose bytes are not
    valid in it is refused by name. Starlette ignores a part's charset and reads bytes that
    are not valid in the form's as Latin-1: `prompt` bytes b"\xff\xfe" reached the model
    as "ÿþ" and a 200 came back."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        charset = _text_encoding(self._charset) or "utf-8"
        for name, value in part.item_headers:
            if name == b"content-type" and (declared := parse_options_header(value)[1].get(b"charset")):
                charset = _text_encoding(declared.decode("latin-1")) or charset
        try:
            text = part.data.decode(charset)
        except ValueError:  # UnicodeDecodeError, or a UnicodeError of codecs such as idna
            shown = "UTF-8" if charset == "utf-8" else charset
            raise FormFieldRefused(
                f"form field {part.field_name!r} is not valid {shown}", param=part.field_name
            ) from None
        self.items.append((part.field_name, text))


def _text_encoding(name: str) -> str | None:
    """The codec's name for a charset, None for one Python does not know or one that is no
    text encoding (`base64`, `zlib`: bytes.decode refuses those with a LookupError)."""
    try:
        b"".decode(name)
        return codecs.lookup(name).name
    except LookupError:
        return None


class CheckedFormRequest(Request):
    async def _get_form(self, **limits) -> FormData:
        """Starlette's form, after refusing a body of another content type or a compressed
        one (415), with text fields decoded strictly (TextFieldsDecodedStrictly), of at most
        MAX_FORM_FIELDS fields and MAX_FORM_FILES files."""
        limits.update(max_fields=MAX_FORM_FIELDS, max_files=MAX_FORM_FILES)
        content_type = self.headers.get("content-type")
        media, _ = parse_options_header(content_type or "")
        if media not in FORM_MEDIA_TYPES and (content_type or has_body(self)):
            given = f"not {quoted_header(content_type)}" if content_type else "none given"
            raise StarletteHTTPException(415, f"the request body must be multipart/form-data ({given})")
        if (refusal := unsupported_encoding(self)) is not None:
            raise StarletteHTTPException(415, refusal)
        if self._form is None and media == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    self._form = await TextFieldsDecodedStrictly(self.headers, stream, **limits).parse()
            except MultiPartException as exc:  # as Starlette's own form parsing answers it
                raise StarletteHTTPException(400, exc.message) from None
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
