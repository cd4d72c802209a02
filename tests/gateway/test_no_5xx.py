"""No client input yields a 5xx (issue 10, section 2): each class of hostile input with
an explicit test naming what the 400 must say, then hypothesis property tests over the
JSON request schema and the multipart form that fail on any 5xx (or any stream that ends
in an internal error). In process, against the fake engine: the model does not matter
here, the request path does (schemas, request builder, audio intake, session)."""

import asyncio
import io
import json
import threading
from collections import Counter

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import audio_file, b64
from .inprocess import MODEL, Gateway, chat_body, running_gateway

pytestmark = pytest.mark.anyio
WAV = audio_file(seconds=0.5)
MAX_AUDIO_SECONDS = 20
# How many generated requests each property test sends (the report quotes these).
JSON_EXAMPLES = 600
FORM_EXAMPLES = 400


@pytest.fixture
def anyio_backend():
    return "asyncio"


def gateway(**overrides):
    limits = {
        "max_audio_seconds": MAX_AUDIO_SECONDS,
        "allowed_domains": "example.invalid",
        "fetch_timeout": 2.0,
        "max_upload_bytes": 4 << 20,
        **overrides,
    }
    return running_gateway(**limits)


async def post_json(gw: Gateway, raw: str | bytes, path: str = "/v1/chat/completions"):
    return await gw.client.post(
        path, content=raw if isinstance(raw, bytes) else raw.encode(), headers={"content-type": "application/json"}
    )


def refused(response, *words: str, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"] or word == error.get("param") or word == error.get("code"), error
    return error


# --- text that is not valid Unicode ---------------------------------------------------------


def with_model(template: str) -> str:
    """Raw JSON text (escapes such as \\ud800 kept as the client sent them), model filled in."""
    return template.replace("@MODEL@", MODEL)


SURROGATE_BODIES = {
    "message content": '{"model": "@MODEL@", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
    "text part": '{"model": "@MODEL@", "messages": [{"role": "user", '
    '"content": [{"type": "text", "text": "\\udfff"}]}]}',
    "model": '{"model": "m\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    "stop": '{"model": "@MODEL@", "stop": ["\\ud83d"], "messages": [{"role": "user", "content": "hi"}]}',
    "audio format": '{"model": "@MODEL@", "messages": [{"role": "user", "content": [{"type": "input_audio", '
    '"input_audio": {"data": "AAAA", "format": "\\ud800"}}]}]}',
}


@pytest.mark.parametrize("where", list(SURROGATE_BODIES))
async def test_lone_surrogates_in_json_are_a_400(where):
    async with gateway() as gw:
        refused(await post_json(gw, with_model(SURROGATE_BODIES[where])), "valid Unicode")


async def test_lone_surrogates_in_form_fields_are_a_400():
    async with gateway() as gw:
        messages = '[{"role": "user", "content": "what \\ud800?"}]'
        response = await gw.client.post(
            "/v1/audio/chat", files={"file": ("a.wav", WAV, "audio/wav")}, data={"messages": messages}
        )
        refused(response, "valid Unicode", "messages")


@pytest.mark.parametrize("charset", ["utf-8", "latin-1", "utf-16", "shift_jis", "no-such-charset"])
async def test_form_fields_in_any_declared_charset_are_answered(charset):
    boundary = "b0undary"
    prompt = "Qu'est-ce que c'est ? \u00e9\u3042".encode(
        charset if charset != "no-such-charset" else "utf-8", errors="replace"
    )
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode() + WAV + b"\r\n"
        + f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n'
        f"Content-Type: text/plain; charset={charset}\r\n\r\n".encode() + prompt + b"\r\n"
        + f"--{boundary}--\r\n".encode()
    )  # fmt: skip
    async with gateway() as gw:
        response = await gw.client.post(
            "/v1/audio/chat", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert response.status_code == 200, response.text


# --- numbers at and beyond the engine's ranges ------------------------------------------------

NUMBERS = {
    "seed above int64": ({"seed": 1 << 64}, "seed"),
    "negative seed": ({"seed": -5}, "seed"),
    "n 17": ({"n": 17}, "n"),
    "n 0": ({"n": 0}, "n"),
    "temperature 2.5": ({"temperature": 2.5}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens 10**30": ({"max_tokens": 10**30}, "max_tokens"),
    "max_tokens past the context": ({"max_tokens": 4090}, "max_tokens"),
    "min_tokens over max_tokens": ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    "min_tokens over the room": ({"min_tokens": 5000}, "min_tokens"),
    "greedy with n 2": ({"temperature": 0, "n": 2}, "n"),
    "empty stop": ({"stop": [""]}, "stop"),
    "five stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "max_tokens a float": ({"max_tokens": 1.5}, "max_tokens"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
async def test_out_of_range_numbers_are_a_400_naming_the_field(case):
    fields, name = NUMBERS[case]
    async with gateway() as gw:
        raw = json.dumps(chat_body(**fields), allow_nan=True)
        error = refused(await post_json(gw, raw))
        assert name in error["message"], error


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty", "min_p"])
async def test_non_finite_numbers_are_refused_as_not_finite(field, value):
    """NaN compares false with every bound, so a range check alone answered NaN with "should
    be less than or equal to 2"; the message names what is wrong with the number."""
    async with gateway() as gw:
        error = refused(await post_json(gw, json.dumps(chat_body(**{field: value}), allow_nan=True)))
        assert error["param"] == field and error["message"] == f"invalid request: {field}: Input should be a finite number"


async def test_numbers_at_the_edges_are_accepted():
    edges = [
        {"seed": 0},
        {"seed": (1 << 63) - 1},
        {"n": 16},
        {"temperature": 2},
        {"temperature": 0},
        {"top_p": 1},
        {"max_tokens": 1},
        {"min_tokens": 1, "max_tokens": 1},
        {"stop": ["x" * 256]},
    ]
    async with gateway() as gw:
        for fields in edges:
            response = await gw.client.post("/v1/chat/completions", json=chat_body(**fields))
            assert response.status_code == 200, (fields, response.text)


# --- malformed audio_url, every component -------------------------------------------------------

BAD_URLS = {
    "scheme": "gopher://example.invalid/a.wav",
    "no scheme": "example.invalid/a.wav",
    "userinfo": "https://user:pw@example.invalid/a.wav",
    "empty host": "https:///a.wav",
    "unclosed IPv6": "http://[::1/a.wav",
    "IPv6 zone": "http://[fe80::1%25eth0]/a.wav",
    "bad IPv6": "http://[:::::]/a.wav",
    "port out of range": "http://example.invalid:65536/a.wav",
    "port not a number": "http://example.invalid:http/a.wav",
    "percent-encoded host": "http://%65xample.invalid/a.wav",
    "control character": "http://example.invalid/a\x01.wav",
    "space": "http://example .invalid/a.wav",
    "too long": "https://example.invalid/" + "a" * 9000,
    "not allowed host": "https://other.example/a.wav",
    "data bad base64": "data:audio/wav;base64,@@@@",
    "data no comma": "data:audio/wav;base64",
    "data wrong media type": "data:text/plain,hello",
    "file without media dir": "file:///etc/passwd",
}


@pytest.mark.parametrize("case", list(BAD_URLS))
async def test_malformed_audio_urls_are_a_400(case):
    part = {"type": "audio_url", "audio_url": {"url": BAD_URLS[case]}}
    async with gateway() as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body([part]))
        error = refused(response)
        assert error["param"] == "messages[0].content[0].audio_url.url" or error["code"] == "invalid_audio", error


# --- deeply nested or very large JSON ---------------------------------------------------------------


async def test_deeply_nested_json_is_a_400():
    async with gateway() as gw:
        deep = with_model('{"model": "@MODEL@", "x": ' + "[" * 50_000 + "1" + "]" * 50_000 + ', "messages": []}')
        refused(await post_json(gw, deep), "nested too deeply")
        deep_extra = with_model('{"model": "@MODEL@", "x": ' + "[" * 5000 + "1" + "]" * 5000 + ', "messages": []}')
        refused(await post_json(gw, deep_extra), "nested too deeply")


async def test_json_with_too_many_elements_is_refused_before_parsing():
    async with gateway() as gw:
        many = with_model('{"model": "@MODEL@", "x": [' + ",".join(["0"] * 200_000) + '], "messages": []}')
        refused(await post_json(gw, many), "too many JSON elements")


async def test_large_json_bodies_refused_off_the_loop_are_named():
    """Bodies over INLINE_PARSE_BYTES are joined and parsed in a worker thread; its errors
    still come back as named 400s."""
    from mdlserve.server.jsonbody import INLINE_PARSE_BYTES

    async with gateway() as gw:
        pad = "a" * (INLINE_PARSE_BYTES + (64 << 10))
        cut_short = with_model('{"model": "@MODEL@", "pad": "' + pad + '", "messages": [')
        refused(await post_json(gw, cut_short), "not valid JSON")
        lone_surrogate = with_model('{"model": "@MODEL@", "pad": "' + pad + '\\ud800", "messages": []}')
        refused(await post_json(gw, lone_surrogate), "not valid Unicode")


async def test_json_form_field_limits():
    async with gateway() as gw:
        for messages, words in [
            ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
            ("[" + ",".join(["{}"] * 200_000) + "]", "too many JSON elements"),
            ("[{", "not valid JSON"),
        ]:
            response = await gw.client.post(
                "/v1/audio/chat", files={"file": ("a.wav", WAV, "audio/wav")}, data={"messages": messages}
            )
            refused(response, words)


# --- bodies of many elements, within the bound ---------------------------------------------------------------


def where_it_ran(monkeypatch, gw: Gateway) -> dict[str, list[tuple[bool, tuple, object]]]:
    """Records each call of the body's parse (and validation), the conversation's building
    and the prompt's rendering: whether it ran on the event loop's thread (this test's), its
    arguments and what it gave back."""
    from mdlserve.server import request as request_module
    from mdlserve.server.jsonbody import BoundedJsonRequest

    loop_thread = threading.get_ident()
    calls: dict[str, list[tuple[bool, tuple, object]]] = {"read": [], "conversation": [], "tokenize": []}

    def recording(name, work):
        def record(*args, **kwargs):
            result = work(*args, **kwargs)
            calls[name].append((threading.get_ident() == loop_thread, args, result))
            return result

        return record

    read = BoundedJsonRequest._read
    monkeypatch.setattr(BoundedJsonRequest, "_read", lambda self, *a: recording("read", read)(self, *a))
    monkeypatch.setattr(gw.state.builder, "conversation", recording("conversation", gw.state.builder.conversation))
    monkeypatch.setattr(request_module, "_tokenize", recording("tokenize", request_module._tokenize))
    return calls


MANY = 300  # messages: 900 JSON elements, over INLINE_ELEMENTS


async def test_a_body_of_many_elements_is_validated_and_built_off_the_event_loop(monkeypatch):
    """A 1 MB body of 33000 one-character messages held the event loop for a second in its
    validation, field check and conversation building; a body of more than INLINE_ELEMENTS
    elements is validated where it is parsed, in a worker thread, and its conversation is
    built and its prompt rendered there too. A small one stays on the loop (no hand-off)."""
    from mdlserve.server.jsonbody import INLINE_ELEMENTS
    from mdlserve.server.schemas import ChatCompletionRequest

    assert MANY * 3 > INLINE_ELEMENTS
    async with gateway() as gw:
        calls = where_it_ran(monkeypatch, gw)
        many = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}] * MANY}
        response = await gw.client.post("/v1/chat/completions", json=many)
        assert response.status_code == 200, response.text
        [(on_loop, _, (body, _))] = calls["read"]
        assert not on_loop and isinstance(body, ChatCompletionRequest)  # validated where it was parsed
        assert [on_loop for on_loop, _, _ in calls["conversation"]] == [False]
        assert [on_loop for on_loop, (_, messages), _ in calls["tokenize"] if len(messages) == MANY] == [False]
        for work in calls.values():
            work.clear()
        response = await gw.client.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2))
        assert response.status_code == 200, response.text
        [(on_loop, _, (body, _))] = calls["read"]
        assert on_loop and isinstance(body, dict)  # FastAPI validates it, on the loop
        assert [on_loop for on_loop, _, _ in calls["conversation"]] == [True]
        # The same for the messages of /v1/audio/chat, a JSON form field.
        form = {"model": MODEL, "max_tokens": "2", "messages": json.dumps(many["messages"])}
        response = await gw.client.post("/v1/audio/chat", data=form, files={"file": ("a.wav", WAV)})
        assert response.status_code == 200, response.text
        assert [on_loop for on_loop, _, _ in calls["conversation"]][-1] is False


def padded(messages: list, to: int = MANY) -> list:
    return messages + [{"role": "user", "content": "x"}] * (to - len(messages))


# A small body's error, and the same error in a body of many elements: same status, same JSON.
MANY_ELEMENT_ERRORS = {
    "a bad role": ([{"role": "robot", "content": "x"}], padded([{"role": "robot", "content": "x"}])),
    "every content a number": ([{"role": "user", "content": 1}] * 6, [{"role": "user", "content": 1}] * 33000),
    "an unknown part type": (
        [{"role": "user", "content": [{"type": "image_url"}]}],
        padded([{"role": "user", "content": [{"type": "image_url"}] + [{"type": "text", "text": "x"}] * 500}]),
    ),
    "an unknown field": (
        [{"role": "user", "content": "x", "name": "a"}],
        padded([{"role": "user", "content": "x", "name": "a"}]),
    ),
    "a message with audio past the limit": (
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(WAV)}}] * 9}],
        padded([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(WAV)}}] * 9}]),
    ),
}


@pytest.mark.parametrize("case", list(MANY_ELEMENT_ERRORS))
async def test_errors_in_a_body_of_many_elements_read_as_in_a_small_one(case):
    """Validated off the loop, a body of many elements gets the answer FastAPI's validation
    gets on it. "every content a number": 33000 messages, 66000 errors, whose reading into a
    message compared every error's path with every other's (half an hour of the loop)."""
    small, large = MANY_ELEMENT_ERRORS[case]
    async with gateway() as gw:
        answers = []
        for messages in (small, large):
            answers.append(await gw.client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}))
        assert answers[0].status_code == answers[1].status_code == 400, answers[0].text
        assert answers[0].json() == answers[1].json()
        not_objects = [await post_json(gw, json.dumps(["x"] * n)) for n in (1, 1000)]
        assert not_objects[0].json() == not_objects[1].json()
        assert not_objects[0].json()["error"]["message"] == "the request body must be a JSON object"


# --- audio that decodes to huge sample counts -----------------------------------------------------------


def silence(seconds: float, rate: int = 16000, channels: int = 1, fmt: str = "FLAC") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((int(seconds * rate), channels), np.float32), rate, format=fmt)
    return buffer.getvalue()


async def test_long_audio_is_refused_from_its_header():
    data = silence(3600)  # an hour of silence: 100 kB compressed
    async with gateway() as gw:
        response = await gw.client.post(
            "/v1/chat/completions",
            json=chat_body([{"type": "input_audio", "input_audio": {"data": b64(data), "format": "flac"}}]),
        )
        refused(response, "longer than the limit")
        # Nothing was decoded: the decode metric saw no audio seconds.
        assert "mdl_audio_seconds_total 0.0" in (await gw.client.get("/metrics")).text


async def test_very_high_rates_and_many_channels_are_refused():
    cases = [
        (silence(0.5, rate=1_000_000, fmt="WAV"), "sample rate"),
        (silence(0.1, rate=8000, channels=65, fmt="WAV"), "channels"),
    ]
    async with gateway() as gw:
        for data, words in cases:
            response = await gw.client.post(
                "/v1/chat/completions", json=chat_body([{"type": "input_audio", "input_audio": {"data": b64(data)}}])
            )
            error = refused(response, words)
            assert error["code"] == "invalid_audio"


# --- property tests: any generated request, no 5xx ---------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\udc00b"])
TEXT = st.one_of(st.text(max_size=20), SURROGATES, st.sampled_from(["", " ", MODEL, "user", "wav", "0"]))
NUMBER = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True),
    st.integers(min_value=-2, max_value=20),
    st.floats(min_value=-1, max_value=3),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
ANY_JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)

HOSTS = st.sampled_from(
    [
        "example.invalid",
        "[::1",
        "[fe80::1%25x]",
        "%41.invalid",
        "1.2.3.4",
        "[::ffff:127.0.0.1]",
        "exa mple.invalid",
        "\u00e9.invalid",
        "",
        "0x7f.1",
        "example.invalid.",
    ]
)
PORTS = st.one_of(
    st.just(""),
    st.integers(min_value=-1, max_value=70_000).map(lambda p: f":{p}"),
    st.sampled_from([":", ":abc", ":8\x00"]),
)
URLS = st.one_of(
    st.builds(
        lambda scheme, user, host, port, path: f"{scheme}://{user}{host}{port}/{path}",
        st.sampled_from(["http", "https", "HTTP", "ftp", "file", "javascript", ""]),
        st.sampled_from(["", "u@", "u:p@", "@", "%40@"]),
        HOSTS,
        PORTS,
        st.one_of(st.text(max_size=10), st.sampled_from(["%", "%zz", "%00", "a.wav?x=%ff"])),
    ),
    st.builds(
        lambda media, b64flag, payload: f"data:{media}{b64flag},{payload}",
        st.sampled_from(["", "audio/wav", "text/plain", "audio/wav;charset=x", ";;"]),
        st.sampled_from(["", ";base64"]),
        st.one_of(st.just(b64(WAV)), st.text(max_size=12)),
    ),
    TEXT,
)


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Valid nine times in ten: a request must get past the schema to reach the builder,
    the audio intake and the session, where the deeper failures would be."""
    return st.integers(0, 9).flatmap(lambda draw: hostile if draw == 9 else valid)


AUDIO_DATA = mostly(st.just(b64(WAV)), st.one_of(st.binary(max_size=64).map(b64), TEXT))
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": mostly(st.text(max_size=30), TEXT)}),
    st.fixed_dictionaries(
        {
            "type": st.just("input_audio"),
            "input_audio": st.fixed_dictionaries(
                {"data": AUDIO_DATA}, optional={"format": mostly(st.sampled_from(["wav", "mp3", "flac"]), TEXT)}
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("audio_url"), "audio_url": st.fixed_dictionaries({"url": URLS})}),
    ANY_JSON,
)
MESSAGE = st.fixed_dictionaries({
    "role": mostly(st.just("user"), st.one_of(st.sampled_from(["system", "assistant"]), TEXT)),
    "content": mostly(st.one_of(st.text(max_size=30), st.lists(PART, min_size=1, max_size=3)), ANY_JSON),
})  # fmt: skip
IN_RANGE = {
    "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "seed": st.integers(0, (1 << 63) - 1), "n": st.integers(1, 3),
    "min_tokens": st.integers(0, 2),
}  # fmt: skip
SAMPLING = {name: mostly(valid, st.one_of(NUMBER, ANY_JSON)) for name, valid in IN_RANGE.items()}
CHAT = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL), TEXT),
     "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=3), ANY_JSON)},
    optional={**SAMPLING, "stop": mostly(st.lists(st.text(min_size=1, max_size=5), max_size=4),
                                         st.one_of(TEXT, st.lists(TEXT, max_size=5), ANY_JSON)),
              "stream": mostly(st.booleans(), ANY_JSON),
              "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), ANY_JSON)},
)  # fmt: skip

FORM_FIELDS = (
    "model",
    "prompt",
    "messages",
    "response_format",
    "temperature",
    "stream",
    "max_completion_tokens",
    "seed",
    "language",
    "include_usage",
    "n",
    "max_tokens",
)
FORM_VALUE = st.one_of(
    TEXT,
    NUMBER.map(str),
    ANY_JSON.map(lambda v: json.dumps(v, ensure_ascii=True)),
    st.lists(MESSAGE, max_size=2).map(lambda m: json.dumps(m, ensure_ascii=True)),
)
FORM_VALID = {
    "model": st.just(MODEL), "prompt": st.text(max_size=20), "response_format": st.sampled_from(["json", "text"]),
    "temperature": st.floats(0, 2).map(str), "stream": st.sampled_from(["true", "false"]),
    "max_completion_tokens": st.integers(1, 8).map(str), "max_tokens": st.integers(1, 8).map(str),
    "seed": st.integers(0, 1 << 40).map(str), "n": st.just("1"), "language": st.just("en"),
    "include_usage": st.sampled_from(["true", "false"]),
    "messages": st.lists(MESSAGE, min_size=1, max_size=2).map(lambda m: json.dumps(m, ensure_ascii=True)),
}  # fmt: skip
CHARSETS = st.sampled_from([None, "utf-8", "latin-1", "utf-16", "shift_jis", "bogus"])
FORM = st.fixed_dictionaries(
    {
        "file": mostly(st.just(WAV), st.one_of(st.binary(max_size=64), st.just(silence(3600)))),
        # /v1/audio/chat takes exactly one of messages and prompt: usually one, sometimes both or none.
        "keep": mostly(st.sampled_from([("messages",), ("prompt",)]), st.sampled_from([("messages", "prompt"), ()])),
    },
    optional={name: st.tuples(mostly(FORM_VALID[name], FORM_VALUE), CHARSETS) for name in FORM_FIELDS},
)


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = "hypothesis-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'.encode()
        + fields["file"]
        + b"\r\n"
    ]
    for name in FORM_FIELDS:
        if name not in fields or (name in ("messages", "prompt") and name not in fields["keep"]):
            continue
        value, charset = fields[name]
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
        if charset:
            head += f"Content-Type: text/plain; charset={charset}\r\n"
        encoded = value.encode("utf-8", errors="surrogatepass")  # lone surrogates as raw bytes
        parts.append(head.encode() + b"\r\n" + encoded + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class PropertyRig:
    """One gateway on one event loop for all of a property test's examples; counts the
    statuses it saw (printed at the end: a run where nothing got through would prove little)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._context = gateway(max_num_seqs=64, max_queue=64)
        self.gw: Gateway = self.loop.run_until_complete(self._context.__aenter__())
        self.statuses: Counter[int] = Counter()

    def post(self, path: str, content: bytes, content_type: str):
        response = self.loop.run_until_complete(
            self.gw.client.post(path, content=content, headers={"content-type": content_type})
        )
        self.statuses[response.status_code] += 1
        return response

    def close(self) -> None:
        self.loop.run_until_complete(self._context.__aexit__(None, None, None))
        self.loop.close()


@pytest.fixture(scope="module")
def rig():
    rig = PropertyRig()
    yield rig
    rig.close()
    print(f"\nproperty tests: {sum(rig.statuses.values())} requests, statuses {dict(sorted(rig.statuses.items()))}")
    assert rig.statuses[200] > 0, "no generated request was accepted: the strategies are too hostile to test much"


def assert_no_server_error(response) -> None:
    assert response.status_code < 500, response.text[:500]
    assert "internal_error" not in response.text, response.text[:500]


def property_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.mark.anyio(False)
@property_settings(JSON_EXAMPLES)
@given(body=CHAT)
def test_generated_chat_requests_get_no_5xx(rig, body):
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    assert_no_server_error(rig.post("/v1/chat/completions", raw, "application/json"))


@pytest.mark.anyio(False)
@property_settings(FORM_EXAMPLES)
@given(fields=FORM, path=st.sampled_from(["/v1/audio/chat", "/v1/audio/transcriptions"]))
def test_generated_multipart_forms_get_no_5xx(rig, fields, path):
    content, content_type = multipart(fields)
    assert_no_server_error(rig.post(path, content, content_type))


async def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing():
    async with gateway(max_model_len=1024) as gw:
        response = await gw.client.post("/v1/chat/completions", json=chat_body("x" * (1024 * 128 + 1)))
        error = refused(response, "context_length_exceeded")
        assert "131073 characters" in error["message"]
        assert gw.engine.submitted == []


async def test_more_messages_than_the_context_can_hold_are_refused_before_rendering():
    """Each message costs the chat template's tokens whatever its text: 33000 one-character
    messages (a 1 MB body, 33000 characters of text) took 23 s of the API process's CPU to
    render and tokenize on the 2-core VM, and stalled /health/live for seconds, before their
    264023 tokens were refused. Now the count of messages refuses them unrendered."""
    async with gateway(max_model_len=1024) as gw:
        rendered: list[int] = []
        render = gw.engine.tokenizer.apply_chat_template

        def recording_render(conversation, **kwargs):
            rendered.append(len(conversation))
            return render(conversation, **kwargs)

        gw.engine.tokenizer.apply_chat_template = recording_render
        many = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}] * 2000}
        response = await gw.client.post("/v1/chat/completions", json=many)
        error = refused(response, "context_length_exceeded", "messages")
        assert error["message"].startswith("the prompt has 2000 messages, at least 12000 tokens of the chat template"), error
        assert max(rendered, default=0) < 10, rendered  # small conversations only (the template's cost per message)
        assert gw.engine.submitted == []
        # The control: as many messages as fit are rendered and answered.
        fitting = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}] * 100}
        response = await gw.client.post("/v1/chat/completions", json=fitting)
        assert response.status_code == 200, response.text
