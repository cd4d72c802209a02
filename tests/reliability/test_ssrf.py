"""SSRF: audio_url must never reach loopback, private, link-local or otherwise non-public
addresses, however they are spelled, resolved or redirected to, and must be refused before
any connection is attempted."""

import asyncio
import ipaddress
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from mdlserve.server.fetch import AudioFetcher, FetchError

from .conftest import TEST_HOSTS
from .traffic import captioning_body

# (case, URL). Hostnames ending .test are answered by the server's hooked resolver (conftest).
SSRF_URLS = [
    ("loopback", "http://127.0.0.1/audio.wav"),
    ("loopback, other /8 address", "http://127.8.9.10/audio.wav"),
    ("loopback with a port", "http://127.0.0.1:22/"),
    ("https to loopback", "https://127.0.0.1/audio.wav"),
    ("localhost", "http://localhost/audio.wav"),
    ("localhost, upper case with trailing dot", "http://LOCALHOST./audio.wav"),
    ("unspecified 0.0.0.0", "http://0.0.0.0/audio.wav"),
    ("unspecified as 0", "http://0/audio.wav"),
    ("private 10/8", "http://10.0.0.1/audio.wav"),
    ("private 172.16/12", "http://172.16.5.4/audio.wav"),
    ("private 192.168/16", "http://192.168.1.1/audio.wav"),
    ("carrier-grade NAT 100.64/10", "http://100.64.0.1/audio.wav"),
    ("link-local metadata 169.254.169.254", "http://169.254.169.254/latest/meta-data/"),
    ("multicast", "http://224.0.0.1/audio.wav"),
    ("broadcast", "http://255.255.255.255/audio.wav"),
    ("IPv6 loopback", "http://[::1]/audio.wav"),
    ("IPv6 unspecified", "http://[::]/audio.wav"),
    ("IPv6 ULA", "http://[fd00::1]/audio.wav"),
    ("IPv6 link-local", "http://[fe80::1]/audio.wav"),
    ("IPv4-mapped IPv6 loopback", "http://[::ffff:127.0.0.1]/audio.wav"),
    ("IPv4-mapped IPv6 metadata", "http://[::ffff:169.254.169.254]/audio.wav"),
    ("IPv4-mapped IPv6 loopback, hex", "http://[::ffff:7f00:1]/audio.wav"),
    ("NAT64 of loopback", "http://[64:ff9b::7f00:1]/audio.wav"),
    ("decimal IPv4", "http://2130706433/audio.wav"),
    ("octal IPv4", "http://0177.0.0.1/audio.wav"),
    ("hexadecimal IPv4", "http://0x7f000001/audio.wav"),
    ("short-form IPv4 127.1", "http://127.1/audio.wav"),
    ("octal single number", "http://017700000001/audio.wav"),
    ("decimal metadata address", "http://2852039166/latest/meta-data/"),
    ("DNS name -> private", "http://private-alias.test/audio.wav"),
    ("DNS name -> metadata", "http://metadata-alias.test/latest/meta-data/"),
    ("DNS name -> ULA", "http://ula-alias.test/audio.wav"),
    ("DNS name -> loopback", "http://loopback-alias.test/audio.wav"),
    ("DNS name -> IPv6 loopback", "http://loopback-v6-alias.test/audio.wav"),
    ("DNS name -> public and private (rebinding)", "http://mixed-alias.test/audio.wav"),
    ("credentials in the URL", "http://user:secret@93.184.216.34/audio.wav"),
    ("file:// without a media dir", "file:///etc/passwd"),
    ("gopher scheme", "gopher://127.0.0.1:25/_HELO"),
    ("ftp scheme", "ftp://127.0.0.1/audio.wav"),
]
REDIRECT_TARGETS = [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/audio.wav", "http://192.168.1.1/",
    "http://[::1]/audio.wav", "http://[fd00::1]/", "http://[::ffff:169.254.169.254]/", "http://0.0.0.0/",
    "http://100.64.0.1/", "file:///etc/passwd", "gopher://10.0.0.1/",
]


def _audio_url_body(url: str) -> dict:
    body = captioning_body()
    body["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": url}}
    return body


def _target_addresses() -> set[str]:
    """Every address an SSRF case could have made the server connect to."""
    addresses = {address for values in TEST_HOSTS.values() for address in values}
    for _, url in SSRF_URLS + [("", target) for target in REDIRECT_TARGETS]:
        host = urllib.parse.urlsplit(url).hostname
        try:
            addresses.add(str(ipaddress.ip_address(host)))
        except ValueError:
            pass
    return addresses | {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.parametrize(("case", "url"), SSRF_URLS, ids=[case for case, _ in SSRF_URLS])
def test_audio_url_to_non_public_address_is_refused(guarded_server, auth, reliability_report, case, url):
    """400 invalid_audio_url, and the server's connect() log (an audit hook in its process)
    gains no entry while handling it: refused before any connection attempt."""
    connects_before = len(guarded_server.connected_to())
    response = httpx.post(guarded_server.url + "/v1/chat/completions", json=_audio_url_body(url), headers=auth,
                          timeout=30)
    attempted = guarded_server.connected_to()[connects_before:]
    error = response.json().get("error", {})
    refused = response.status_code == 400 and error.get("code") == "invalid_audio_url" and not attempted
    message = error.get("message", "") + (f"; connect() attempted to {attempted}" if attempted else "")
    reliability_report.add_ssrf(case, url, response.status_code, message, refused)
    assert refused, (response.status_code, error, attempted)


def test_server_never_connected_to_an_ssrf_target(guarded_server):
    """Over the whole session (other suites' requests included), the guarded server's
    connect() log holds none of the addresses the SSRF cases name."""
    attempted = {host for host, _ in guarded_server.connected_to()}
    assert not attempted & _target_addresses(), sorted(attempted)


class _Redirector:
    """127.0.0.1 server answering GET /?to=<url> with a 302 to <url>."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                target = httpx.URL(self.path).params.get("to", "/")
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Destinations of this process's connect() calls while a redirect test records them.
_connects: list[tuple] | None = None


def _record_connects(event: str, args: tuple) -> None:
    if _connects is not None and event == "socket.connect" and isinstance(args[1], tuple):
        _connects.append(args[1])


sys.addaudithook(_record_connects)


@pytest.fixture(scope="module")
def redirector():
    server = _Redirector()
    yield server
    server.close()


@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_redirect_to_non_public_address_is_refused(redirector, reliability_report, target):
    """The gateway's own fetcher, with only the redirector's 127.0.0.1 allowed besides public
    addresses (`allowed_networks`, as --allowed-networks sets it): each redirect hop is
    checked like the first URL, and
    nothing but the redirector is ever connected to (a Python audit hook records connects)."""
    global _connects
    fetcher = AudioFetcher(timeout=5, max_bytes=1 << 20, allowed_domains=[], media_dir=None,
                           allowed_networks=[ipaddress.ip_network("127.0.0.1/32")])
    url = str(httpx.URL(redirector.url, params={"to": target}))

    async def fetch() -> str:
        try:
            await fetcher.fetch(url)
            return "fetched"
        except FetchError as exc:
            return str(exc)
        finally:
            await fetcher.aclose()

    _connects = []
    try:
        message = asyncio.run(fetch())
        connected = {address[0] for address in _connects}
    finally:
        _connects = None
    refused = message != "fetched" and connected <= {"127.0.0.1"}
    reliability_report.add_ssrf(f"redirect to {target} (in-process fetcher)", url, None, message, refused)
    assert refused, (message, connected)
    assert "non-public" in message or "unsupported scheme" in message, message

