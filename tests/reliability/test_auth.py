"""Authentication: only a configured key in `Authorization: Bearer` opens the API; keys are
compared in constant time and never appear in responses, metrics or the server log."""

import httpx
import pytest

from mdlserve.server import deps

from gateway.helpers import MODEL

from .conftest import API_KEY, OTHER_API_KEY
from .traffic import CLIP, captioning_body

CANARY_KEY = "sk-canary-never-valid-5c1d"
PROTECTED = [
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": captioning_body()}),
    ("POST", "/v1/audio/transcriptions", {"files": {"file": ("a.wav", CLIP, "audio/wav")}, "data": {"model": MODEL}}),
    ("POST", "/v1/audio/chat", {"files": {"file": ("a.wav", CLIP, "audio/wav")}, "data": {"prompt": "What is it?"}}),
]
BAD_CREDENTIALS = [
    ("no Authorization header", {}, "", "missing API key"),
    ("bearer scheme without a token", {"Authorization": "Bearer"}, "", "malformed Authorization header"),
    ("empty Authorization header", {"Authorization": ""}, "", "missing API key"),
    ("bearer null", {"Authorization": "Bearer null"}, "", "invalid API key"),
    ("wrong key", {"Authorization": f"Bearer {CANARY_KEY}"}, "", "invalid API key"),
    ("valid key minus its last character", {"Authorization": f"Bearer {API_KEY[:-1]}"}, "", "invalid API key"),
    ("valid key plus a character", {"Authorization": f"Bearer {API_KEY}x"}, "", "invalid API key"),
    ("both keys joined", {"Authorization": f"Bearer {API_KEY}{OTHER_API_KEY}"}, "", "invalid API key"),
    ("key as Basic credentials", {"Authorization": f"Basic {API_KEY}"}, "", "malformed Authorization header"),
    ("key without a scheme", {"Authorization": API_KEY}, "", "malformed Authorization header"),
    ("key after a tab", {"Authorization": f"Bearer\t{API_KEY}"}, "", "malformed Authorization header"),
    ("key in X-API-Key", {"X-API-Key": API_KEY}, "", "missing API key"),
    ("two Authorization headers, the first valid",
     [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {CANARY_KEY}")], "", "2 Authorization headers"),
    ("the valid key sent twice",
     [("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {API_KEY}")], "", "2 Authorization headers"),
    ("key in the query string", {}, f"?api_key={API_KEY}", "missing API key"),
    ("key in the query string as key=", {}, f"?key={API_KEY}", "missing API key"),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED, ids=[path for _, path, _ in PROTECTED])
@pytest.mark.parametrize(("case", "headers", "query", "words"), BAD_CREDENTIALS,
                         ids=[case for case, *_ in BAD_CREDENTIALS])
def test_bad_credentials_are_refused(guarded_server, reliability_report, method, path, kwargs, case, headers, query,
                                     words):
    response = httpx.request(method, guarded_server.url + path + query, headers=headers, timeout=30, **kwargs)
    message = response.json().get("error", {}).get("message", "")
    reliability_report.add_bad_input(f"auth: {case} ({method} {path})", response.status_code, message)
    assert response.status_code == 401, response.text
    assert words in message
    assert response.headers.get("www-authenticate") == "Bearer"
    assert API_KEY not in response.text and CANARY_KEY not in response.text


@pytest.mark.parametrize("key", [API_KEY, OTHER_API_KEY])
def test_each_configured_key_opens_the_api(guarded_server, key):
    response = httpx.post(guarded_server.url + "/v1/chat/completions", json=captioning_body(),
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("header", "words"), [("", "missing API key"), ("  ", "missing API key"),
                                               ("Bearer   ", "malformed Authorization header"),
                                               ("Bearer\tkey-a", "malformed Authorization header")])
def test_a_header_without_a_key_is_named_missing_or_malformed(header, words):
    """Clients can't send some of these (httpx refuses a value ending in spaces); proxies can."""
    refusal = deps.api_key_error([header], [b"key-a"])
    assert refusal is not None and refusal.message.startswith(words), refusal


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    """Every configured key goes through hmac.compare_digest, also after a match (no early
    exit that would tell which key position matched)."""
    compared: list[tuple[bytes, bytes]] = []
    real_compare = deps.hmac.compare_digest

    def recording_compare(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", recording_compare)
    keys = [b"key-a", b"key-b", b"key-c"]
    for token in ("key-a", "key-c", "nope"):
        compared.clear()
        accepted = deps.api_key_error([f"Bearer {token}"], keys) is None
        assert accepted == (token != "nope")
        assert compared == [(token.encode(), key) for key in keys]
