"""Loading the bytes behind an `audio_url`: data:, http(s):// (SSRF-guarded) and file://.

http(s) fetches resolve the host themselves, refuse any non-public address (loopback,
private, link-local, multicast, reserved, ...), then connect to the checked IP (Host header
and TLS SNI keep the original name), so a DNS answer that changes between check and
connect cannot redirect us. Redirects are followed by hand, each hop checked the same way.
"""

import asyncio
import binascii
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pybase64

MAX_REDIRECTS = 5
# Longest http(s)/file URL we parse (data: URLs are bounded by --fetch-max-bytes instead).
MAX_URL_CHARS = 8192
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """The URL cannot be used; the message names the problem (a client error)."""


def unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:a.b.c.d); others unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    ip = unmapped(ip)
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


@dataclass(frozen=True)
class ParsedUrl:
    """The parts of an http(s)/file URL we use, each checked: urllib raises ValueError for
    a bad IPv6 literal or port only when the attribute is read."""

    scheme: str
    netloc: str
    host: str
    port: int | None
    path: str
    query: str
    has_credentials: bool


def parse_url(url: str) -> ParsedUrl:
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"audio_url is longer than {MAX_URL_CHARS} characters")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise FetchError("audio_url contains whitespace or control characters")
    try:
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname or ""
        port = parsed.port
    except ValueError as exc:  # urllib's message names the problem (port, IPv6 literal)
        raise FetchError(f"malformed audio_url: {exc}") from None
    if "%" in host:
        raise FetchError("audio_url host must not be percent-encoded")
    return ParsedUrl(
        parsed.scheme.lower(),
        parsed.netloc,
        host,
        port,
        parsed.path,
        parsed.query,
        parsed.username is not None or parsed.password is not None,
    )


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """RFC 2397 `data:[<mediatype>][;base64],<data>`; `;base64` in any case (`;BASE64`), as
    the media type and its parameters are case-insensitive."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise FetchError("malformed data: URL (no comma)")
    if header.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes:
            raise FetchError(f"data: URL payload exceeds {max_bytes} bytes")
        try:
            return pybase64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise FetchError("data: URL is not valid base64") from None
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise FetchError(f"data: URL payload exceeds {max_bytes} bytes")
    return data


class AudioFetcher:
    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        allowed_domains: list[str],
        media_dir: Path | None,
        allowed_networks: Sequence[IPNetwork] = (),
        allow_private: bool = False,
    ):
        """Every address a URL resolves to, redirects included, must be public or inside
        `allowed_networks` (--allowed-networks: an in-cluster media server, a test's local
        HTTP server). `allow_private` lifts the check for batch jobs, whose URLs come from the
        operator's own manifest, not from clients."""
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.allowed_domains = allowed_domains
        self.media_dir = media_dir
        self.allowed_networks = list(allowed_networks)
        self.allow_private = allow_private
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": "midashenglm-serve"},
        )

    def address_allowed(self, ip: IPAddress) -> bool:
        if self.allow_private or is_public_address(ip):
            return True
        ip = unmapped(ip)
        return any(ip in network for network in self.allowed_networks)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, self.max_bytes)
        if scheme == "file":
            return await self._read_file(url)
        if scheme not in ("http", "https"):
            raise FetchError(f"unsupported audio_url scheme {scheme!r}: use https, http, data or file")
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch_http(url)
        except TimeoutError:
            raise FetchError(f"fetching audio_url timed out after {self.timeout:g} s") from None

    async def _read_file(self, url: str) -> bytes:
        if self.media_dir is None:
            raise FetchError("file:// audio URLs are disabled (the server has no --media-dir)")
        parsed = parse_url(url)
        if parsed.netloc not in ("", "localhost"):
            raise FetchError("file:// URLs must not name a host")
        unquoted = urllib.parse.unquote(parsed.path)
        if "\x00" in unquoted:
            raise FetchError("file:// path contains a NUL character")
        # resolve() follows symlinks and '..', so nothing can point out of the directory.
        path = Path(unquoted).resolve()
        if not path.is_relative_to(self.media_dir):
            raise FetchError("file:// path is outside the media directory")
        return await asyncio.to_thread(self._read_bounded, path)

    def _read_bounded(self, path: Path) -> bytes:
        if not path.is_file():
            raise FetchError("file:// path does not exist in the media directory")
        if path.stat().st_size > self.max_bytes:
            raise FetchError(f"file exceeds {self.max_bytes} bytes (--fetch-max-bytes)")
        return path.read_bytes()

    async def _fetch_http(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            parsed = parse_url(url)
            if parsed.scheme not in ("http", "https"):
                raise FetchError(f"audio_url redirected to unsupported scheme {parsed.scheme!r}")
            host = parsed.host
            if not host:
                raise FetchError("audio_url has no host")
            if parsed.has_credentials:
                raise FetchError("audio_url must not contain credentials")
            self._check_domain(host)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            ip = await self._resolve_checked(host, port)
            try:
                request = self._client.build_request(
                    "GET", self._url_for_ip(parsed, ip), headers={"Host": parsed.netloc}
                )
            except (httpx.InvalidURL, UnicodeError) as exc:
                raise FetchError(f"malformed audio_url ({exc})") from None
            if parsed.scheme == "https":
                request.extensions["sni_hostname"] = host
            try:
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                raise FetchError(f"fetching audio_url timed out after {self.timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise _fetch_failure(exc, host, port) from None
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError("audio_url redirect has no Location header")
                    try:
                        url = urllib.parse.urljoin(url, location)
                    except ValueError:
                        raise FetchError("audio_url redirected to a malformed URL") from None
                    continue
                if response.status_code != 200:
                    raise FetchError(f"fetching audio_url failed: HTTP {response.status_code}")
                return await self._read_body(response)
            finally:
                await response.aclose()
        raise FetchError(f"audio_url redirected more than {MAX_REDIRECTS} times")

    def _check_domain(self, host: str) -> None:
        if not self.allowed_domains:
            return
        host = host.lower().rstrip(".")
        if not any(host == d or host.endswith("." + d) for d in self.allowed_domains):
            raise FetchError(f"audio_url host {host!r} is not in the allowed domains")

    async def _resolve_checked(self, host: str, port: int) -> IPAddress:
        try:
            literal = ipaddress.ip_address(host)
            addresses = [literal]
        except ValueError:  # a name, not an address literal
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError, ValueError):  # gaierror, IDNA, embedded NUL
                raise FetchError(f"audio_url host {host!r} does not resolve") from None
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
            if not addresses:
                raise FetchError(f"audio_url host {host!r} does not resolve") from None
        for ip in addresses:
            if not self.address_allowed(ip):
                raise FetchError(
                    f"audio_url host {host!r} resolves to a non-public address ({ip}); "
                    "loopback, private, link-local, multicast and reserved addresses are refused"
                )
        return addresses[0]

    @staticmethod
    def _url_for_ip(parsed: ParsedUrl, ip: IPAddress) -> str:
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = f"{host}:{parsed.port}" if parsed.port else host
        return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path or "/", parsed.query, ""))

    async def _read_body(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise FetchError(f"audio_url content exceeds {self.max_bytes} bytes (--fetch-max-bytes)")
        chunks, total = [], 0
        try:
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > self.max_bytes:
                    raise FetchError(f"audio_url content exceeds {self.max_bytes} bytes (--fetch-max-bytes)")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise FetchError(f"fetching audio_url timed out after {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _read_failure(exc, response) from None
        return b"".join(chunks)


# What the HTTP client's failures mean, in words: a client learns nothing from the name of
# httpx's exception class ("could not fetch audio_url (RemoteProtocolError)", as it said).
def _fetch_failure(exc: httpx.HTTPError, host: str, port: int) -> FetchError:
    """A failure to connect or to get a response's head."""
    if isinstance(exc, httpx.ConnectError):
        reason = str(exc)
        if "SSL" in reason or "certificate" in reason:
            return FetchError(f"TLS handshake with audio_url host {host!r} failed ({_ssl_reason(reason)})")
        return FetchError(f"could not connect to audio_url host {host!r} (port {port})")
    if isinstance(exc, httpx.RemoteProtocolError):
        if "without sending a response" in str(exc):
            return FetchError(f"audio_url host {host!r} closed the connection without answering")
        return FetchError(f"audio_url host {host!r} answered with something that is not HTTP")
    if isinstance(exc, httpx.NetworkError):
        return FetchError(f"the connection to audio_url host {host!r} failed before it answered")
    return FetchError(f"could not fetch audio_url from host {host!r}")


def _read_failure(exc: httpx.HTTPError, response: httpx.Response) -> FetchError:
    """A failure while reading a 200 response's body."""
    if isinstance(exc, httpx.RemoteProtocolError):
        return FetchError("audio_url host closed the connection before the body was complete")
    if isinstance(exc, httpx.DecodingError):
        encoding = response.headers.get("content-encoding", "")[:40]
        return FetchError(f"audio_url body could not be decoded: it is not valid {encoding!r} (its Content-Encoding)")
    if isinstance(exc, httpx.NetworkError):
        return FetchError("the connection to the audio_url host broke while its body was being read")
    return FetchError("could not read the audio_url body")


def _ssl_reason(message: str) -> str:
    """OpenSSL's reason without its library code and source line: "[SSL:
    CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)"."""
    message = re.sub(r"^\[SSL(: [A-Z_]+)?\] ", "", message)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", message)[:200]
