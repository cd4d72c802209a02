"""Bad input: each case answered 4xx in OpenAI's error shape with a message that names the
problem, and the server still healthy (a real request succeeds) afterwards."""

import gzip
import json
import re
import struct

import httpx
import numpy as np
import pytest

from .conftest import AUTH, UPLOAD_LIMIT
from .helpers import MODEL, audio_file, audio_part, b64, chat_body, raw_exchange, wav_bytes

WAV = audio_file("wav", 16000, 1, seconds=1.0)
URL_PART = lambda url: {"type": "audio_url", "audio_url": {"url": url}}  # noqa: E731


def chat(**overrides):
    return ("POST", "/v1/chat/completions", {"json": {**chat_body(audio_part(WAV)), **overrides}})


def chat_parts(*parts, **overrides):
    return ("POST", "/v1/chat/completions", {"json": chat_body(*parts, **overrides)})


def transcribe(data=None, files=True, **form):
    fields = {"model": MODEL, **form}
    return ("POST", "/v1/audio/transcriptions",
            {"data": {k: v for k, v in fields.items() if v is not None},
             "files": {"file": ("clip.wav", WAV if data is None else data)} if files else None})


def raw_form(body: bytes, path: str = "/v1/audio/transcriptions"):
    return ("POST", path, {"content": body, "headers": {"content-type": "multipart/form-data; boundary=b"}})


# A transcription form written out by hand: the model field, an output limit (without one the
# random model may write to the end of its context, longer than the request timeout on a busy
# machine), the file, the closing boundary.
FORM = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + MODEL.encode() + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="max_completion_tokens"\r\n\r\n2\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + WAV + b"\r\n--b--\r\n")  # fmt: skip
CUT_SHORT = "the multipart/form-data body ends before its closing boundary (--b--): it was cut short"


def hand_form(**fields: bytes | tuple[bytes, bytes]) -> bytes:
    """A transcription form written out by hand: `fields` as text parts (a value, or a value
    and the part's Content-Type), then the file and the closing boundary."""
    parts = []
    for name, field in {"model": MODEL.encode(), **fields}.items():
        value, content_type = field if isinstance(field, tuple) else (field, None)
        head = f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n'.encode()
        head += b"Content-Type: " + content_type + b"\r\n" if content_type else b""
        parts.append(head + b"\r\n" + value + b"\r\n")
    return b"".join(parts) + FORM[FORM.index(b'--b\r\nContent-Disposition: form-data; name="file"') :]


def wav_with_fmt(**fields: int) -> bytes:
    """WAV with fields of its `fmt ` chunk replaced: tag, channels, rate, byte_rate, align, bits."""
    data = bytearray(WAV)
    at = data.index(b"fmt ") + 8
    names = ("tag", "channels", "rate", "byte_rate", "align", "bits")
    values = dict(zip(names, struct.unpack_from("<HHIIHH", data, at), strict=True))
    struct.pack_into("<HHIIHH", data, at, *{**values, **fields}.values())
    return bytes(data)


def audio_chat(**form):
    return ("POST", "/v1/audio/chat", {"data": form, "files": {"file": ("clip.wav", WAV)}})


def _empty_wav() -> bytes:
    return wav_bytes(np.zeros((0, 1), dtype=np.float32), 16000)


CASES = {
    # Body and schema
    "invalid json": (("POST", "/v1/chat/completions", {"content": b"{not json",
                                                       "headers": {"content-type": "application/json"}}),
                     400, "JSON"),
    "missing model": (("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}]}}),
                      400, "model: Field required"),
    "missing messages": (("POST", "/v1/chat/completions", {"json": {"model": MODEL}}), 400,
                         "messages: Field required"),
    "empty messages": (chat(messages=[]), 400, "messages: List should have at least 1 item"),
    "unknown model": (chat(model="gpt-4o"), 404, "model 'gpt-4o' does not exist"),
    "temperature too high": (chat(temperature=5), 400, "temperature: Input should be less than or equal to 2"),
    "temperature wrong type": (chat(temperature="hot"), 400, "temperature: Input should be a valid number"),
    "top_p zero": (chat(top_p=0), 400, "top_p: Input should be greater than 0"),
    "max_tokens zero": (chat(max_tokens=0), 400, "max_tokens: Input should be greater than or equal to 1"),
    "max_tokens beyond context": (chat(max_tokens=100000), 400, "max_tokens is 100000 but only"),
    "n zero": (chat(n=0), 400, "n: Input should be greater than or equal to 1"),
    "min_tokens above max_tokens": (chat(max_tokens=2, min_tokens=5), 400, "min_tokens"),
    "too many stops": (chat(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop sequences"),
    "unknown role": (chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    "content wrong type": (chat(messages=[{"role": "user", "content": 123}]), 400, "content"),
    "unknown part type": (chat_parts({"type": "image_url", "image_url": {"url": "x"}}), 400, "image_url"),
    "input_audio without data": (chat_parts({"type": "input_audio", "input_audio": {"format": "wav"}}), 400,
                                 "data: Field required"),
    "stream_options wrong type": (chat(stream=True, stream_options="yes"), 400, "stream_options"),
    # Audio content
    "wrong base64": (chat_parts({"type": "input_audio", "input_audio": {"data": "@@not base64@@", "format": "wav"}}),
                     400, "input_audio.data is not valid base64"),
    "base64 wrapped in lines": (chat_parts({"type": "input_audio", "input_audio": {"data": "AAAA\nAAAA\n"}}), 400,
                                "input_audio.data is not valid base64: it holds line breaks or spaces; send it "
                                "unwrapped (base64 -w0)"),
    "unsupported format": (chat_parts({"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "xyz"}}),
                           400, "unsupported audio format 'xyz'"),
    "corrupt audio": (chat_parts(audio_part(np.random.default_rng(1).bytes(5000))), 400, "could not decode audio"),
    "truncated mp3": (chat_parts(audio_part(audio_file("mp3", 44100, 2)[:120], "mp3")), 400,
                      "could not decode audio"),
    "truncated flac": (chat_parts(audio_part(audio_file("flac", 44100, 1)[:60], "flac")), 400,
                       "could not decode audio"),
    "zero-length audio": (chat_parts({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), 400,
                          "the audio is empty"),
    "wav without samples": (chat_parts(audio_part(_empty_wav())), 400, "zero samples"),
    "float wav far past full scale": (
        chat_parts(audio_part(wav_bytes(np.full(16000, -3e30, dtype=np.float32), 16000, "FLOAT"))), 400,
        "could not decode audio: samples reach 3e+30: full scale is 1.0, and past 1e+12 the log-mel front end overflows"),
    "audio too long": (chat_parts(audio_part(audio_file("wav", 8000, 1, seconds=25))), 400, "audio is longer than the limit of 20 s"),
    "audio too long in total": (chat_parts(*[audio_part(audio_file("wav", 8000, 1, seconds=12))] * 2), 400,
                                "audio too long: 24.0 s in this request (the limit is 20 s"),
    "too many audio parts": (chat_parts(*[audio_part(WAV)] * 9), 400, "too many audio parts: 9 (the limit is 8"),
    "audio in assistant message": (chat(messages=[{"role": "assistant", "content": [audio_part(WAV)]},
                                                  {"role": "user", "content": "x"}]),
                                   400, "audio is only allowed in user messages"),
    # audio_url
    "url to loopback": (chat_parts(URL_PART("http://127.0.0.1:9/a.wav")), 400, "non-public address (127.0.0.1)"),
    "url to localhost name": (chat_parts(URL_PART("http://localhost/a.wav")), 400, "non-public address"),
    "url to metadata service": (chat_parts(URL_PART("http://169.254.169.254/latest")), 400, "non-public address"),
    "url to private range": (chat_parts(URL_PART("https://10.1.2.3/a.wav")), 400, "non-public address (10.1.2.3)"),
    "url to ipv6 loopback": (chat_parts(URL_PART("http://[::1]:8000/a.wav")), 400, "non-public address (::1)"),
    "url to mapped loopback": (chat_parts(URL_PART("http://[::ffff:127.0.0.1]/a.wav")), 400, "non-public address"),
    "url unsupported scheme": (chat_parts(URL_PART("ftp://example.com/a.wav")), 400,
                               "unsupported audio_url scheme 'ftp'"),
    "url host does not resolve": (chat_parts(URL_PART("https://no-such-host.invalid/a.wav")), 400, "does not resolve"),
    "file url outside media dir": (chat_parts(URL_PART("file:///etc/passwd")), 400, "outside the media directory"),
    "malformed data url": (chat_parts(URL_PART("data:audio/wav;base64")), 400, "malformed data: URL"),
    "bad base64 data url": (chat_parts(URL_PART("data:audio/wav;base64,%%%")), 400, "data: URL is not valid base64"),
    # `;BASE64` was read as a percent-encoded payload: its base64 text was decoded as audio.
    "bad base64 data url in capitals": (chat_parts(URL_PART("data:audio/wav;BASE64,%%%")), 400,
                                        "data: URL is not valid base64"),
    # WAV headers that say nonsense: before, PyAV failed on them with "corrupt audio (AttributeError)".
    "wav of 0 bits per sample": (chat_parts(audio_part(wav_with_fmt(bits=0))), 400,
                                 "could not decode audio: unsupported WAV: 0 bits per sample"),
    "uploaded wav of 0 bits per sample": (transcribe(data=wav_with_fmt(bits=0)), 400,
                                          "file: could not decode audio: unsupported WAV: 0 bits per sample"),
    "wav of 65535 bits per sample": (chat_parts(audio_part(wav_with_fmt(bits=65535))), 400,
                                     "unsupported WAV: 65535 bits per sample"),
    "wav of 0 channels": (chat_parts(audio_part(wav_with_fmt(channels=0))), 400,
                          "unsupported WAV: 0 channels is outside the supported range 1-64"),
    "wav of 0 Hz": (chat_parts(audio_part(wav_with_fmt(rate=0))), 400,
                    "unsupported WAV: sample rate 0 Hz is outside the supported range 1000-768000 Hz"),
    "wav of format tag 0": (chat_parts(audio_part(wav_with_fmt(tag=0))), 400,
                            "unsupported WAV: format tag 0 (WAVE_FORMAT_UNKNOWN)"),
    # Multipart endpoints
    "transcription without file": (transcribe(files=False), 400, "file: Field required"),
    "transcription with the file sent as a text field": (
        transcribe(files=False, file="clip.wav"), 400,
        "invalid request: file: must be a file (a multipart part with a filename), not a text field"),
    "transcription with a filename of 10000 characters": (
        ("POST", "/v1/audio/transcriptions", {"data": {"model": MODEL}, "files": {"file": ("x" * 10_000 + ".wav", WAV)}}),
        400, "the multipart/form-data body could not be parsed (a part's header line is malformed or too long"),
    "transcription without a multipart boundary": (
        ("POST", "/v1/audio/transcriptions", {"content": b"--b\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}),
        400, "the Content-Type multipart/form-data needs its boundary parameter"),
    "transcription without model": (transcribe(model=None), 400, "model: Field required"),
    "transcription cut in the file": (raw_form(FORM[: len(FORM) // 2]), 400, CUT_SHORT),
    "transcription cut before the closing boundary": (raw_form(FORM[: -len(b"--\r\n")]), 400, CUT_SHORT),
    "audio analysis cut in the file": (raw_form(FORM[:-100], "/v1/audio/analysis"), 400, CUT_SHORT),
    "transcription bad response_format": (transcribe(response_format="xml"), 400, "response_format"),
    "transcription of a text file": (transcribe(data=b"hello, this is not audio at all" * 10), 400,
                                     "could not decode audio"),
    "transcription empty file": (transcribe(data=b""), 400, "the audio is empty"),
    "transcription bad temperature": (transcribe(temperature="warm"), 400, "temperature"),
    "transcription unknown model": (transcribe(model="whisper-1"), 404, "model 'whisper-1' does not exist"),
    "audio chat without question": (audio_chat(), 400, "send 'task'"),
    "audio chat messages not json": (audio_chat(messages="[{"), 400, "messages is not valid JSON"),
    # FastAPI and the repeated-field check scan the whole form per field name: bounded counts.
    "too many form fields": (audio_chat(**{f"f{i}": "x" for i in range(101)}), 400,
                             "Too many fields. Maximum number of fields is 100."),
    "too many form files": (("POST", "/v1/audio/transcriptions",
                             {"data": {"model": MODEL}, "files": [(f"f{i}", ("a.wav", WAV)) for i in range(11)]}),
                            400, "Too many files. Maximum number of files is 10."),
    "audio chat messages wrong shape": (audio_chat(messages=json.dumps([{"role": "user"}])), 400,
                                        "invalid request: messages[0].content: Field required"),
    "audio chat without user message": (audio_chat(messages=json.dumps([{"role": "system", "content": "x"}])), 400,
                                        "needs a user message"),
    # The audio placeholder typed as text: the prompt would hold one more <|AUDIO|> than clips
    "audio placeholder in a transcription prompt": (transcribe(prompt="names: <|AUDIO|>"), 400,
                                                    "prompt: Value error, text must not contain <|AUDIO|>"),
    "audio placeholder in an audio chat prompt": (audio_chat(prompt="<|AUDIO|>?"), 400,
                                                  "prompt: Value error, text must not contain <|AUDIO|>"),
    "audio placeholder in audio chat messages": (
        audio_chat(messages=json.dumps([{"role": "user", "content": "<|audio_bos|><|AUDIO|><|audio_eos|>"}])), 400,
        "messages[0].content: Value error, text must not contain <|AUDIO|>"),
    "transcription with two files": (("POST", "/v1/audio/transcriptions",
                                      {"data": {"model": MODEL}, "files": [("file", ("a.wav", WAV)), ("file", ("b.wav", WAV))]}),
                                     400, "file is sent 2 times in the form; send it once"),
    "audio chat with two prompts": (("POST", "/v1/audio/chat", {"data": {"prompt": ["one?", "two?"]},
                                                                "files": {"file": ("clip.wav", WAV)}}),
                                    400, "prompt is sent 2 times in the form; send it once"),
    # Routing
    "unknown endpoint": (("POST", "/v1/completions", {"json": {}}), 404, "no such endpoint: POST /v1/completions"),
    "wrong method": (("GET", "/v1/chat/completions", {}), 405, "method GET is not allowed"),
}


# (request, status, the whole message, param): the field named is where the problem is in the
# body as sent, without the union members pydantic tried (`content.str`, `list[tagged-union...]`).
NAMED = {
    "format of the second part": (
        chat_parts({"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {"data": "AA", "format": "xyz"}},
                   text=""),
        400, "invalid request: messages[0].content[1].input_audio.format: Value error, unsupported audio format 'xyz'; "
        "supported: wav, mp3, flac, ogg, opus, oga, webm, m4a, mp4, aac, aiff, aif",
        "messages[0].content[1].input_audio.format"),
    "image part": (
        chat_parts({"type": "image_url", "image_url": {"url": "x"}}), 400,
        "invalid request: messages[0].content[0]: Input tag 'image_url' found using 'type' does not match any of the "
        "expected tags: 'text', 'input_audio', 'audio_url'", "messages[0].content[0]"),
    "text part without text": (
        chat_parts({"type": "text"}), 400, "invalid request: messages[0].content[0].text: Field required",
        "messages[0].content[0].text"),
    "content neither string nor list": (
        chat(messages=[{"role": "user", "content": 123}]), 400,
        "invalid request: messages[0].content: Input should be a valid string or a valid list",
        "messages[0].content"),
    "audio placeholder typed into a text part": (
        chat_parts(audio_part(WAV), {"type": "text", "text": "and this one: <|AUDIO|>"}), 400,
        "invalid request: messages[0].content[1].text: Value error, text must not contain <|AUDIO|>, the model's "
        "audio placeholder: send audio as an input_audio or audio_url part", "messages[0].content[1].text"),
    "audio placeholder in a system message": (
        chat(messages=[{"role": "system", "content": "<|AUDIO|>"}, {"role": "user", "content": [audio_part(WAV)]}]),
        400, "invalid request: messages[0].content: Value error, text must not contain <|AUDIO|>, the model's audio "
        "placeholder: send audio as an input_audio or audio_url part", "messages[0].content"),
    "audio placeholder split over two text parts": (
        chat_parts({"type": "text", "text": "<|AU"}, {"type": "text", "text": "DIO|>"}, text=""), 400,
        "adjacent text parts join into <|AUDIO|>, the model's audio placeholder: send audio as an input_audio or "
        "audio_url part", "messages"),
    "audio placeholder split over three text parts beside a clip": (
        chat_parts(audio_part(WAV), {"type": "text", "text": "<"}, {"type": "text", "text": "|AUDIO|"},
                   {"type": "text", "text": ">"}, text=""), 400,
        "adjacent text parts join into <|AUDIO|>, the model's audio placeholder: send audio as an input_audio or "
        "audio_url part", "messages"),
    "audio placeholder split over the parts of an audio chat message": (
        audio_chat(messages=json.dumps([{"role": "user", "content": [{"type": "text", "text": "<|AUD"},
                                                                     {"type": "text", "text": "IO|>"}]}])), 400,
        "adjacent text parts join into <|AUDIO|>, the model's audio placeholder: send audio as an input_audio or "
        "audio_url part", "messages"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), 400,
                                      "invalid request: top_logprobs: Value error, top_logprobs requires logprobs: true",
                                      "top_logprobs"),
    "min_tokens over max_tokens": (chat(min_tokens=5, max_tokens=2), 400,
                                   "invalid request: min_tokens: Value error, min_tokens (5) must not exceed max_tokens "
                                   "(2)", "min_tokens"),
    "max_tokens as a string": (chat(max_tokens="3"), 400, "invalid request: max_tokens: Input should be a valid integer",
                               "max_tokens"),
    "max_tokens as a boolean": (chat(max_tokens=True), 400,
                                "invalid request: max_tokens: Input should be a valid integer", "max_tokens"),
    "stream as a string": (chat(stream="true"), 400, "invalid request: stream: Input should be a valid boolean",
                           "stream"),
    "temperature as a string": (chat(temperature="0.5"), 400,
                                "invalid request: temperature: Input should be a valid number", "temperature"),
    "second message without role": (
        chat(messages=[{"role": "user", "content": "x"}, {"content": "y"}]), 400,
        "invalid request: messages[1].role: Field required", "messages[1].role"),
    "body is null": (("POST", "/v1/chat/completions", {"content": b"null", "headers": {"content-type": "application/json"}}),
                     400, "the request body must be a JSON object", None),
    "body is a list": (("POST", "/v1/chat/completions", {"json": [chat_body()]}),
                       400, "the request body must be a JSON object", None),
    "body cut short": (("POST", "/v1/chat/completions", {"content": b'{"model": "x", "messages": [',
                                                         "headers": {"content-type": "application/json"}}),
                       400, "the request body is not valid JSON (EOF while parsing a list at line 1 column 28)", None),
    "gzip-compressed json": (
        ("POST", "/v1/chat/completions", {"content": gzip.compress(json.dumps(chat_body()).encode()),
                                          "headers": {"content-type": "application/json", "content-encoding": "gzip"}}),
        415, "request bodies are read uncompressed: Content-Encoding 'gzip' is not supported", None),
    "json sent as text/plain": (
        ("POST", "/v1/chat/completions", {"content": json.dumps(chat_body()).encode(),
                                          "headers": {"content-type": "text/plain"}}),
        415, "the request body must be JSON (Content-Type: application/json), not 'text/plain'", None),
    "json sent without a content type": (
        ("POST", "/v1/chat/completions", {"content": json.dumps(chat_body()).encode()}),
        415, "the request body must be JSON sent with Content-Type: application/json (none given)", None),
    "no body and no content type": (("POST", "/v1/chat/completions", {}),
                                    400, "the request body must be a JSON object", None),
    # A form route read any other body as an empty form: "file: Field required; model: ...".
    "json posted to the transcription form": (
        ("POST", "/v1/audio/transcriptions", {"json": {"model": MODEL, "file": b64(WAV)}}),
        415, "the request body must be multipart/form-data (not 'application/json')", None),
    "audio analysis body without a content type": (
        ("POST", "/v1/audio/analysis", {"content": WAV}),
        415, "the request body must be multipart/form-data (none given)", None),
    "gzip-compressed form": (
        ("POST", "/v1/audio/transcriptions", {"content": gzip.compress(FORM),
                                              "headers": {"content-type": "multipart/form-data; boundary=b",
                                                          "content-encoding": "gzip"}}),
        415, "request bodies are read uncompressed: Content-Encoding 'gzip' is not supported", None),
    "json with a content type of parameters only": (
        ("POST", "/v1/chat/completions", {"content": json.dumps(chat_body()).encode(),
                                          "headers": {"content-type": ";;;="}}),
        415, "the request body must be JSON (Content-Type: application/json), not ';;;='", None),
    "json with a content type of 5000 characters": (
        ("POST", "/v1/chat/completions", {"content": json.dumps(chat_body()).encode(),
                                          "headers": {"content-type": "application/" + "x" * 5000}}),
        415, "the request body must be JSON (Content-Type: application/json), not "
        f"{'application/' + 'x' * 88!r}... (5012 characters)", None),
    "form with a content type of parameters only": (
        ("POST", "/v1/audio/transcriptions", {"content": FORM, "headers": {"content-type": ";;;="}}),
        415, "the request body must be multipart/form-data (not ';;;=')", None),
    # Text fields that are not valid UTF-8 were read as Latin-1 and answered.
    "prompt field not UTF-8": (raw_form(hand_form(prompt=b"\xff\xfe")), 400,
                               "form field 'prompt' is not valid UTF-8", "prompt"),
    "model field not UTF-8": (raw_form(hand_form(model=b"midashenglm-7b\xff")), 400,
                              "form field 'model' is not valid UTF-8", "model"),
    "prompt field not valid in the charset its part declares": (
        raw_form(hand_form(prompt=(b"\x00", b"text/plain; charset=utf-16"))), 400,
        "form field 'prompt' is not valid utf-16", "prompt"),
    "audio chat message without content": (
        audio_chat(messages=json.dumps([{"role": "user", "content": "x"}, {"role": "user"}])), 400,
        "invalid request: messages[1].content: Field required", "messages[1].content"),
}


@pytest.fixture(scope="module")
def client(gateway):
    with httpx.Client(base_url=gateway.url, timeout=60, headers=AUTH) as c:
        yield c


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_a_named_4xx(client, case):
    (method, path, kwargs), status, message = CASES[case]
    response = client.request(method, path, **{k: v for k, v in kwargs.items() if v is not None})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    assert "Traceback" not in response.text and "/site-packages/" not in response.text
    assert not re.search(r"\w(Error|Exception)\b", error["message"]), error  # no exception class as the reason


def test_the_hand_written_form_is_answered_whole(client):
    """The control for the cut-short cases: the same bytes with their closing boundary."""
    method, path, kwargs = raw_form(FORM)
    response = client.request(method, path, **kwargs)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)


def test_data_url_base64_marker_in_any_case(client):
    """RFC 2397's `;base64` is matched without regard to case, as media type parameters are."""
    answers = [client.post("/v1/chat/completions", json=chat_body(URL_PART(f"data:audio/wav;{marker},{b64(WAV)}"),
                                                                  max_tokens=2, temperature=0))
               for marker in ("base64", "BASE64", "Base64")]  # fmt: skip
    for answer in answers:
        assert answer.status_code == 200, answer.text
    assert len({answer.json()["choices"][0]["message"]["content"] for answer in answers}) == 1


def test_form_text_fields_in_utf8_and_declared_charsets_are_answered(client):
    """The control for the UTF-8 cases: a prompt in UTF-8, and one in the charset its part declares."""
    latin1 = ("\u00e9?".encode("latin-1"), b"text/plain; charset=latin-1")
    for prompt in ("Qu'est-ce que c'est ? \u00e9".encode(), latin1):
        method, path, kwargs = raw_form(hand_form(prompt=prompt, max_completion_tokens=b"2"))
        response = client.request(method, path, **kwargs)
        assert response.status_code == 200, response.text


def test_form_fields_that_are_lists_may_repeat(client):
    """stop and timestamp_granularities[] take one value per part."""
    analysis = client.post("/v1/audio/analysis", files={"file": ("clip.wav", WAV)},
                           data={"task": "caption", "stop": ["zz", "yy"], "max_tokens": "2"})  # fmt: skip
    assert analysis.status_code == 200, analysis.text
    verbose = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", WAV)},
                          data={"model": MODEL, "response_format": "verbose_json", "max_completion_tokens": "2",
                                "timestamp_granularities[]": ["segment", "segment"]})  # fmt: skip
    assert verbose.status_code == 200, verbose.text
    assert len(verbose.json()["segments"]) == 1


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt"])
def test_timestamp_granularities_need_verbose_json(client, response_format):
    """Only verbose_json has segments to time: the field is refused rather than ignored."""
    response = client.post("/v1/audio/transcriptions", files={"file": ("clip.wav", WAV)},
                           data={"model": MODEL, "response_format": response_format, "max_completion_tokens": "2",
                                 "timestamp_granularities[]": "segment"})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "timestamp_granularities[]"
    assert f"response_format is {response_format}, which has none" in error["message"]


def test_float_audio_past_full_scale_is_answered_while_the_front_end_can_take_it(client):
    """Float WAVs may carry int16-scale samples (±32768): loud, not broken."""
    loud = wav_bytes(np.full(16000, 3e4, dtype=np.float32), 16000, "FLOAT")
    response = client.post("/v1/chat/completions", json=chat_body(audio_part(loud)))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case", list(NAMED), ids=list(NAMED))
def test_validation_errors_name_the_field_where_it_is_in_the_body(client, case):
    (method, path, kwargs), status, message, param = NAMED[case]
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"] == message
    assert response.json()["error"]["param"] == param


# (request, the message's start, param): an output limit sent as max_completion_tokens is
# named so (the forms have no max_tokens field at all); it said "max_tokens is ...".
OUTPUT_LIMIT_NAMED = {
    "chat max_completion_tokens past the context": (
        chat(max_tokens=None, max_completion_tokens=100000), "max_completion_tokens is 100000 but only ",
        "max_completion_tokens"),
    "chat max_completion_tokens beside max_tokens, past the context": (
        chat(max_tokens=2, max_completion_tokens=100000), "max_completion_tokens is 100000 but only ",
        "max_completion_tokens"),
    "chat max_tokens past the context": (chat(max_tokens=100000), "max_tokens is 100000 but only ", "max_tokens"),
    "chat min_tokens over max_completion_tokens": (
        chat(max_tokens=None, max_completion_tokens=2, min_tokens=5),
        "invalid request: min_tokens: Value error, min_tokens (5) must not exceed max_completion_tokens (2)",
        "min_tokens"),
    "transcription max_completion_tokens past the context": (
        transcribe(max_completion_tokens="100000"), "max_completion_tokens is 100000 but only ", "max_completion_tokens"),
    "translation max_completion_tokens past the context": (
        ("POST", "/v1/audio/translations", transcribe(max_completion_tokens="100000")[2]),
        "max_completion_tokens is 100000 but only ", "max_completion_tokens"),
}


@pytest.mark.parametrize("case", list(OUTPUT_LIMIT_NAMED), ids=list(OUTPUT_LIMIT_NAMED))
def test_output_limit_errors_name_the_field_sent(client, case):
    (method, path, kwargs), start, param = OUTPUT_LIMIT_NAMED[case]
    response = client.request(method, path, **{k: v for k, v in kwargs.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(start), error
    assert error["param"] == param, error


def test_declared_oversize_body_is_refused_before_upload(gateway):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Authorization: Bearer key-one\r\n"
            f"Content-Length: {UPLOAD_LIMIT + 1}\r\n\r\n")
    response = raw_exchange(gateway.url, head, [])  # no body sent at all
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"exceeds the limit of 2097152 bytes" in response


def test_chunked_oversize_body_is_cut_off_while_streaming(gateway):
    head = ("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            "Authorization: Bearer key-one\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    part_head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    # A well-formed file part whose 9 x 256 KiB pass the 2 MiB limit; the body never ends.
    response = raw_exchange(gateway.url, head, [chunk(part_head)] + [chunk(b"x" * (256 << 10))] * 9)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"exceeds the limit" in response


def test_server_healthy_after_bad_input(client):
    text = client.get("/metrics").text
    assert 'mdl_rejections_total{reason="bad_request"}' in text
    assert 'mdl_rejections_total{reason="payload_too_large"}' in text
    assert client.get("/health/ready").status_code == 200
    r = client.post("/v1/chat/completions", json=chat_body(audio_part(WAV), max_tokens=2))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
