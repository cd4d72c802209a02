"""In-process units: the SSRF guard and URL fetching (against local HTTP servers), settings
from env and flags, admission arithmetic, audio decoding."""

import asyncio
import base64
import http.server
import io
import ipaddress
import re
import socket
import struct
import threading
import time
import warnings

import numpy as np
import pytest
import soundfile
from pydantic import ValidationError

from mdlserve.server.admission import Admission, request_weight
from mdlserve.server.audio import AudioDecodeError, _decode_with_soundfile, decode_audio, decode_input
from mdlserve.server.cli import build_parser
from mdlserve.server.errors import ApiError
from mdlserve.server.fetch import AudioFetcher, FetchError, is_public_address
from mdlserve.server.metrics import GatewayMetrics
from mdlserve.server.settings import Settings, default_max_audio_seconds

LOCAL_ORIGIN = [ipaddress.ip_network("127.0.0.1/32")]  # the test HTTP server, as --allowed-networks
CLIP = b"RIFF-pretend-audio" * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        action = self.routes.get(self.path)
        if action is None:
            self.send_response(404)
            self.end_headers()
            return
        action(self)

    def log_message(self, *args):
        pass


def _redirect(location):
    def go(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.end_headers()
    return go


def _body(data, declared=True):
    def go(h):
        h.send_response(200)
        if declared:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return go


def _not_http(h):
    h.wfile.write(b"\x00\x01 no status line\r\n\r\n")
    h.close_connection = True


def _truncated(h):
    h.send_response(200)
    h.send_header("Content-Length", str(len(CLIP) + 1000))
    h.end_headers()
    h.wfile.write(CLIP)
    h.close_connection = True


def _slow(h):
    time.sleep(3)
    try:
        _body(CLIP)(h)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up, as it should


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    _Handler.routes = {
        "/clip.wav": _body(CLIP),
        "/undeclared": _body(b"x" * 5000, declared=False),
        "/big": _body(b"x" * 5000),
        "/hop": _redirect("/clip.wav"),
        "/to-private": _redirect(f"http://127.0.0.2:{port}/clip.wav"),
        "/to-file": _redirect("file:///etc/passwd"),
        "/loop": _redirect("/loop"),
        "/slow": _slow,
        "/not-http": _not_http,
        "/truncated": _truncated,
        "/host": lambda h: _body(h.headers["Host"].encode())(h),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()


def fetch(url, **kwargs):
    async def run():
        options = dict(timeout=2, max_bytes=4096, allowed_domains=[], media_dir=None, allowed_networks=LOCAL_ORIGIN)
        options.update(kwargs)
        fetcher = AudioFetcher(**options)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("::ffff:127.0.0.1", False), ("ff02::1", False),
])  # fmt: skip
def test_public_address_classification(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_fetch_and_redirect(origin):
    assert fetch(origin + "/clip.wav") == CLIP
    assert fetch(origin + "/hop") == CLIP
    # The connection goes to the checked IP, with the original Host header.
    assert fetch(origin + "/host") == origin.removeprefix("http://").encode()


def test_redirect_to_private_address_is_refused(origin):
    with pytest.raises(FetchError, match=r"non-public address \(127\.0\.0\.2\)"):
        fetch(origin + "/to-private")


def test_redirect_to_other_scheme_and_loops_are_refused(origin):
    with pytest.raises(FetchError, match="redirected to unsupported scheme 'file'"):
        fetch(origin + "/to-file")
    with pytest.raises(FetchError, match="redirected more than 5 times"):
        fetch(origin + "/loop")


def test_size_limits_declared_or_not(origin):
    with pytest.raises(FetchError, match="exceeds 4096 bytes"):
        fetch(origin + "/big")
    with pytest.raises(FetchError, match="exceeds 4096 bytes"):
        fetch(origin + "/undeclared")


def test_fetch_timeout(origin):
    with pytest.raises(FetchError, match="timed out after 0.5 s"):
        fetch(origin + "/slow", timeout=0.5)


def test_upstream_errors(origin):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(origin + "/missing")


def test_connection_failures_are_named_without_exception_classes(origin):
    """The message says what went wrong; it said "could not fetch audio_url (ConnectError)"
    or "(RemoteProtocolError)", the HTTP client's exception classes."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # nothing listens once the socket is closed
    cases = [
        (f"http://127.0.0.1:{closed_port}/clip.wav",
         f"could not connect to audio_url host '127.0.0.1' (port {closed_port})"),
        (origin + "/not-http", "audio_url host '127.0.0.1' answered with something that is not HTTP"),
        (origin + "/truncated", "audio_url host closed the connection before the body was complete"),
    ]  # fmt: skip
    for url, message in cases:
        with pytest.raises(FetchError) as raised:
            fetch(url)
        assert str(raised.value).startswith(message), str(raised.value)
        assert not re.search(r"\w(Error|Exception)\b", str(raised.value)), str(raised.value)


def test_default_guard_refuses_loopback_an_allowed_network_or_a_batch_job_reaches_it(origin):
    with pytest.raises(FetchError, match=r"non-public address \(127\.0\.0\.1\)"):
        fetch(origin + "/clip.wav", allowed_networks=[])
    with pytest.raises(FetchError, match="non-public address"):
        fetch(origin + "/clip.wav", allowed_networks=[ipaddress.ip_network("10.0.0.0/8")])
    assert fetch(origin + "/clip.wav", allowed_networks=[ipaddress.ip_network("127.0.0.0/8")]) == CLIP
    assert fetch(origin + "/clip.wav", allowed_networks=[], allow_private=True) == CLIP  # batch manifests


@pytest.mark.parametrize(("address", "allowed"), [
    ("127.0.0.1", True), ("::ffff:127.0.0.1", True), ("10.1.2.3", True), ("8.8.8.8", True),
    ("127.0.0.2", False), ("::1", False), ("10.2.0.1", False), ("fd00::1", False), ("169.254.169.254", False),
])  # fmt: skip
def test_allowed_networks_add_to_the_public_addresses_and_nothing_else(address, allowed):
    fetcher = AudioFetcher(timeout=1, max_bytes=1, allowed_domains=[], media_dir=None,
                           allowed_networks=[ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.1.0.0/16")])
    try:
        assert fetcher.address_allowed(ipaddress.ip_address(address)) is allowed
    finally:
        asyncio.run(fetcher.aclose())


def test_domain_allowlist(origin):
    with pytest.raises(FetchError, match="not in the allowed domains"):
        fetch(origin + "/clip.wav", allowed_domains=["example.com"])
    assert fetch(origin + "/clip.wav", allowed_domains=["127.0.0.1"]) == CLIP


def test_file_urls_stay_in_media_dir(tmp_path):
    media = (tmp_path / "media").resolve()
    media.mkdir()
    (media / "a.wav").write_bytes(CLIP)
    (tmp_path / "secret.wav").write_bytes(b"secret")
    (media / "link.wav").symlink_to(tmp_path / "secret.wav")
    assert fetch(f"file://{media}/a.wav", media_dir=media) == CLIP
    for escape in (f"file://{media}/../secret.wav", f"file://{media}/link.wav", "file:///etc/passwd"):
        with pytest.raises(FetchError, match="outside the media directory"):
            fetch(escape, media_dir=media)
    with pytest.raises(FetchError, match="file:// audio URLs are disabled"):
        fetch(f"file://{media}/a.wav")


def test_data_urls():
    assert fetch("data:audio/wav;base64,UklGRg==") == b"RIFF"
    assert fetch("data:,hello%20world") == b"hello world"
    with pytest.raises(FetchError, match="exceeds 4096 bytes"):
        fetch("data:audio/wav;base64," + "A" * 8000)


def test_settings_from_env_and_flags(monkeypatch):
    monkeypatch.setenv("MDL_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("MDL_API_KEYS", "a, b,,c")
    monkeypatch.setenv("MDL_ALLOWED_DOMAINS", "Example.com,cdn.test.")
    monkeypatch.setenv("MDL_ENFORCE_EAGER", "true")
    settings = Settings()
    assert settings.max_num_seqs == 7 and settings.enforce_eager is True
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.allowed_domains == ["example.com", "cdn.test"]
    args = build_parser().parse_args(["serve", "--max-num-seqs", "3", "--no-enforce-eager"])
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    assert overrides == {"max_num_seqs": 3, "enforce_eager": False}  # flags only where given
    assert Settings(**overrides).max_num_seqs == 3  # a flag wins over the environment


def test_allowed_networks_from_env_and_flag_and_a_bad_one_named(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("MDL_ALLOWED_NETWORKS", "10.20.0.0/16, fd00::/8")
    assert Settings().allowed_networks == [ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("fd00::/8")]
    args = build_parser().parse_args(["serve", "--allowed-networks", "127.0.0.1/32"])
    assert Settings(allowed_networks=args.allowed_networks).allowed_networks == [ipaddress.ip_network("127.0.0.1/32")]
    for bad in ("10.0.0.1/8", "example.com", "10.0.0.0/33"):
        with pytest.raises(ValidationError, match="allowed_networks"):
            Settings(allowed_networks=bad)


def test_every_contract_flag_exists_and_no_flag_turns_the_ssrf_guard_off():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings if option.startswith("--")}
    expected = {
        "model", "served-model-name", "dtype", "max-model-len", "max-num-seqs", "max-num-batched-tokens",
        "gpu-memory-utilization", "tensor-parallel-size", "quantization", "load-format", "kv-cache-bytes",
        "enforce-eager", "cudagraph-mode", "cudagraph-capture-sizes", "stream-interval", "host", "port", "api-keys", "api-key-file",
        "auth-health-metrics",
        "max-queue", "request-timeout", "drain-timeout", "max-upload-bytes", "max-audio-seconds", "max-audio-parts",
        "fetch-timeout", "fetch-max-bytes", "allowed-domains", "allowed-networks", "media-dir", "decode-workers",
        "log-level",
    }  # fmt: skip
    assert {"--" + f for f in expected} <= flags
    assert not any("unsafe" in f or "private" in f for f in flags)


def test_defaults_and_derived_limits(tmp_path):
    settings = Settings()
    assert (settings.served_model_name, settings.max_model_len, settings.max_num_seqs, settings.max_queue) == (
        "midashenglm-7b", 4096, 512, 512)
    assert settings.max_upload_bytes == 25 << 20 and settings.max_audio_parts == 8
    # (4096 - 512) / 5 tokens per second
    assert settings.max_audio_seconds == default_max_audio_seconds(4096) == 716
    assert Settings(max_model_len=2048).max_audio_seconds == 307
    assert settings.decode_workers >= 2
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n")
    assert Settings(api_keys="x", api_key_file=keys).all_api_keys() == ["x", "file-key"]


def test_a_step_budget_beyond_the_sequences_is_refused_naming_both_limits():
    """vLLM 0.26 only warns, and its engine then fails on the GPU while starting."""
    assert Settings(max_num_seqs=2, max_model_len=1024, max_num_batched_tokens=2048).max_num_batched_tokens == 2048
    with pytest.raises(ValidationError, match=r"max_num_batched_tokens \(2049\) is more than max_num_seqs x "
                                              r"max_model_len \(2 x 1024 = 2048\)"):  # fmt: skip
        Settings(max_num_seqs=2, max_model_len=1024, max_num_batched_tokens=2049)


def test_default_step_budget_holds_no_more_than_the_sequences(tiny_checkpoint):
    from mdlserve.server.engine import engine_config

    def budget(**limits) -> int:
        settings = Settings(model=tiny_checkpoint, enforce_eager=True, kv_cache_bytes=1 << 30, **limits)
        return engine_config(settings).scheduler_config.max_num_batched_tokens

    assert budget(max_num_seqs=2, max_model_len=4096) == 4096  # vllm.LLM's default for one CPU worker
    assert budget(max_num_seqs=1, max_model_len=1024) == 1024


def test_admission_counts_clip_units():
    async def run():
        admission = Admission(max_num_seqs=2, max_queue=2, metrics=GatewayMetrics())
        assert request_weight(num_clips=0, n=1) == 1 and request_weight(num_clips=3, n=2) == 6
        first = admission.admit(3)
        with pytest.raises(ApiError) as full:
            admission.admit(2)
        assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
        with pytest.raises(ApiError) as never:
            admission.admit(5)
        assert never.value.status == 400
        second = admission.admit(1)
        assert admission.metrics.queue_length._value.get() == 2
        first.release()
        first.release()  # idempotent
        second.release()
        await asyncio.wait_for(admission.wait_idle(), 1)
        assert admission.in_flight == 0

    asyncio.run(run())


def test_admission_reservations_pass_to_the_admitted_ticket():
    """AdmissionGateMiddleware reserves one unit per request before its body is read; the
    route's admit() counts it towards the real weight, and a request that does not get
    admitted gives it back at once (the middleware's release after the response is then a
    no-op)."""
    async def run():
        admission = Admission(max_num_seqs=2, max_queue=1, metrics=GatewayMetrics())
        a, b, c = admission.reserve(), admission.reserve(), admission.reserve()
        assert admission.in_flight == 3 and admission.reserve() is None  # full: 429 before the body
        ticket = admission.admit(1, reserved=a)
        assert a.released and ticket.weight == 1 and admission.in_flight == 3
        with pytest.raises(ApiError) as full:
            admission.admit(2, reserved=b)  # b's unit plus one more does not fit
        assert full.value.status == 429 and b.released and admission.in_flight == 2
        # The units of others, and what the refused request needed.
        assert "(2 of 3 clip slots in use, this request needs 2)" in full.value.message
        two = admission.admit(2, reserved=c)  # the unit b gave back
        assert c.released and admission.in_flight == 3
        c.release()  # no-op: taken over
        assert admission.in_flight == 3
        ticket.release()
        two.release()
        await asyncio.wait_for(admission.wait_idle(), 1)
        assert admission.metrics.clips_in_flight._value.get() == 0
        d = admission.reserve()
        with pytest.raises(ApiError) as never:
            admission.admit(4, reserved=d, slots="one per window")
        assert never.value.status == 400 and d.released and admission.in_flight == 0
        assert never.value.message == "the request needs 4 sequence slots (one per window) but the server admits at most 3"

    asyncio.run(run())


def test_admission_ticket_splits_into_equal_shares_released_one_by_one():
    """A request admitted as a whole that runs as several engine requests (a transcript's
    windows): each share goes back as its engine request ends."""
    admission = Admission(max_num_seqs=2, max_queue=2, metrics=GatewayMetrics())
    shares = admission.admit(4).split(2)
    assert [s.weight for s in shares] == [2, 2] and admission.in_flight == 4
    shares[0].release()
    assert admission.in_flight == 2
    shares[1].release()
    shares[1].release()  # idempotent
    assert admission.in_flight == 0
    with pytest.raises(ValueError):
        admission.admit(3).split(2)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
@pytest.mark.parametrize("channels", [1, 2, 5])
def test_decoded_samples_are_libsndfiles_channel_mean(subtype, channels):
    """16-bit PCM is scaled by us rather than libsndfile; every path gives libsndfile's
    float samples averaged over channels, across block boundaries (3 blocks here). 16-bit
    mono at 16 kHz stays int16: libsndfile's integers, which scaled by 2**-15 are its
    float samples bit for bit."""
    rng = np.random.default_rng(channels)
    frames = 150_000
    buf = io.BytesIO()
    soundfile.write(buf, (rng.standard_normal((frames, channels)) * 0.2).clip(-1, 1), 16000, format="WAV", subtype=subtype)
    expected = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float64", always_2d=True)[0].mean(axis=1)
    decoded = decode_audio(buf.getvalue())
    pcm16_kept = subtype == "PCM_16" and channels == 1
    assert decoded.dtype == (np.int16 if pcm16_kept else np.float32) and decoded.shape == (frames,)
    samples = decoded * np.float32(2**-15) if pcm16_kept else decoded
    np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-6)
    if pcm16_kept:
        assert np.array_equal(decoded, soundfile.read(io.BytesIO(buf.getvalue()), dtype="int16")[0])
        assert np.array_equal(samples, soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32")[0])


def test_16_bit_pcm_at_other_rates_is_resampled_to_float32():
    """Only 16 kHz mono 16-bit PCM is passed on as int16: at another rate the samples are
    resampled, which needs floats."""
    buf = io.BytesIO()
    soundfile.write(buf, np.full(8000, 0.25), 8000, format="WAV", subtype="PCM_16")
    decoded = decode_audio(buf.getvalue())
    assert decoded.dtype == np.float32 and decoded.size == 16000


def _wav(frames, rate=16000, channels=1, subtype="PCM_16", format="WAV", title=None, comment=None):
    """A WAV written by soundfile (libsndfile): `title` goes into a LIST chunk before the
    samples, `comment` into one after them."""
    rng = np.random.default_rng(frames)
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", rate, channels, subtype, format=format) as f:
        if title is not None:
            f.title = title
        f.write(rng.uniform(-1, 1, (frames, channels)))
        if comment is not None:
            f.comment = comment
    return buf.getvalue()


def _chunk(chunk_id, payload, pad=b"\0"):
    """A RIFF chunk: id, little-endian size, payload and, after an odd payload, `pad`."""
    return chunk_id + struct.pack("<I", len(payload)) + payload + (pad if len(payload) % 2 else b"")


def _respliced(wav, before_fmt=b"", fmt_extra=b"", before_data=b"", data_size_delta=0):
    """soundfile's plain WAV (RIFF, a 16-byte `fmt `, `data`) with chunks inserted before
    `fmt ` and before `data`, bytes appended to `fmt `, or the `data` size changed; the
    RIFF size follows."""
    assert wav[12:16] == b"fmt " and wav[16:20] == struct.pack("<I", 16) and wav[36:40] == b"data"
    fmt = _chunk(b"fmt ", wav[20:36] + fmt_extra)
    (data_size,) = struct.unpack("<I", wav[40:44])
    data = b"data" + struct.pack("<I", data_size + data_size_delta) + wav[44:]
    body = b"WAVE" + before_fmt + fmt + before_data + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


FFMPEG_LIST = _chunk(b"LIST", b"INFO" + _chunk(b"ISFT", b"Lavf62.12.102\0"))  # what ffmpeg writes before `data`
CANONICAL_LAYOUTS = {
    "plain": lambda n: _wav(n),
    "LIST before data": lambda n: _wav(n, title="a title"),
    "odd chunk before data": lambda n: _respliced(_wav(n), before_data=_chunk(b"JUNK", b"odd")),
    "odd chunk before fmt": lambda n: _respliced(_wav(n), before_fmt=_chunk(b"JUNK", b"x" * 7)),
    "18-byte fmt": lambda n: _respliced(_wav(n), fmt_extra=b"\0\0"),
    "ffmpeg's LIST": lambda n: _respliced(_wav(n), before_data=FFMPEG_LIST),
}


@pytest.mark.parametrize("layout", CANONICAL_LAYOUTS)
@pytest.mark.parametrize("frames", [1, 2, 3, 1000, 150_000])
def test_a_canonical_wav_is_its_data_chunk_as_int16_without_decoding(layout, frames):
    """16 kHz mono 16-bit PCM in a WAV that libsndfile reads plainly: the samples are a
    view of the upload's own bytes (not decoded, not copied), bit for bit what libsndfile
    reads, also across its block boundary (150,000 frames). Bytes cannot back a writable
    view: from them the samples are copied once."""
    wav = CANONICAL_LAYOUTS[layout](frames)
    expected = soundfile.read(io.BytesIO(wav), dtype="int16")[0]
    assert expected.shape == (frames,)
    upload = bytearray(wav)
    decoded = decode_audio(upload, max_seconds=600)
    assert decoded.dtype == np.int16 and np.array_equal(decoded, expected)
    assert np.array_equal(decoded, _decode_with_soundfile(wav, None))  # today's path, bit for bit
    assert np.shares_memory(decoded, upload) and decoded.flags.writeable
    copied = decode_audio(wav, max_seconds=600)
    assert copied.dtype == np.int16 and np.array_equal(copied, expected) and copied.flags.writeable


NON_CANONICAL_WAVS = {
    "44.1 kHz": lambda: _wav(4410, rate=44100),
    "8 kHz": lambda: _wav(800, rate=8000),
    "stereo": lambda: _wav(1000, channels=2),
    "24-bit": lambda: _wav(1000, subtype="PCM_24"),
    "8-bit": lambda: _wav(1000, subtype="PCM_U8"),
    "float": lambda: _wav(1000, subtype="FLOAT"),
    "extensible": lambda: _wav(1000, format="WAVEX"),
    "data runs past the end": lambda: _wav(1000)[:-101],
    "odd data size": lambda: _respliced(_wav(1000) + b"\1", data_size_delta=1),
    "LIST after data": lambda: _wav(1000, comment="a comment"),
    "fact before data": lambda: _respliced(_wav(1000), before_data=_chunk(b"fact", struct.pack("<I", 1000))),
    "pad byte not zero": lambda: _respliced(_wav(1000), before_data=_chunk(b"JUNK", b"odd", pad=b"x")),
    "bytes after data": lambda: _wav(1000) + b"\0\0",
}


@pytest.mark.parametrize("case", NON_CANONICAL_WAVS)
def test_other_wavs_decode_as_libsndfile_decodes_them(case):
    """Any other WAV, or a canonical one with anything odd about it (libsndfile cuts a
    short data chunk, drops an odd byte, reads on past `data`), is decoded by libsndfile
    as before: the same samples and dtype, none of them a view of the upload."""
    wav = NON_CANONICAL_WAVS[case]()
    upload = bytearray(wav)
    decoded = decode_audio(upload, max_seconds=600)
    expected = _decode_with_soundfile(wav, 600)
    assert decoded.dtype == expected.dtype and np.array_equal(decoded, expected)
    assert not np.shares_memory(decoded, upload)


def test_a_canonical_wav_past_the_limit_is_refused_as_libsndfile_refuses_it():
    """The limit is checked on the data chunk's size before the samples are touched, with
    the soundfile path's message; a clip exactly at the limit passes."""
    too_long = _wav(16_001)
    with pytest.raises(AudioDecodeError) as fast:
        decode_audio(bytearray(too_long), max_seconds=1)
    with pytest.raises(AudioDecodeError) as decoded:
        _decode_with_soundfile(too_long, 1)
    assert str(fast.value) == str(decoded.value) == "the audio is longer than the limit of 1 s (--max-audio-seconds)"
    at_limit = bytearray(_wav(16_000))
    assert np.shares_memory(decode_audio(at_limit, max_seconds=1), at_limit)
    with pytest.raises(AudioDecodeError, match="^the audio decodes to zero samples$"):
        decode_audio(bytearray(_wav(0)))


def test_decoded_wavs_go_to_torch_without_a_non_writable_warning():
    """The gateway's path: base64 (an input_audio part) or bytes (a form upload, a URL)
    through the decode pool's function into the model plugin's tensors. A read-only
    array would make torch.from_numpy warn; torch warns once a process, so the arrays'
    flag is checked as well."""
    from mdlserve.model_plugin.model import MiDashengLMMultiModalProcessor

    wav = _wav(20_000)
    audio_tensors = MiDashengLMMultiModalProcessor.audio_tensors  # uses nothing of the instance
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (base64.b64encode(wav).decode(), wav):
            samples = decode_input(data, 600)
            assert samples.dtype == np.int16 and samples.flags.writeable
            tensors = audio_tensors(None, [samples])  # type: ignore[arg-type]
            assert tensors["input_pcm16"][0].numpy().tobytes() == wav[44:]


def test_json_elements_are_counted_block_by_block_and_stop_past_the_limit():
    from mdlserve.server.jsonbody import COUNT_BLOCK_BYTES, count_elements

    body = b'{"a": [' + b"0," * COUNT_BLOCK_BYTES + b'{"b": [1]}]}'  # spans three blocks
    assert count_elements(body) == body.count(b",") + body.count(b"[") + body.count(b"{")
    partial = count_elements(body, stop_above=10)
    assert 10 < partial < count_elements(body)  # stopped after the first block


def test_engine_config_applies_the_host_thread_rule_for_its_device_before_any_engine_process_starts(
    tiny_checkpoint, monkeypatch
):
    import mdlserve.model_plugin.model as model
    from mdlserve.server.engine import engine_config

    devices = []
    monkeypatch.setattr(model, "limit_host_threads", devices.append)
    config = engine_config(Settings(model=tiny_checkpoint, enforce_eager=True, kv_cache_bytes=1 << 30))
    assert devices == [config.device_config.device_type] == ["cpu"]


def _read_form_body(chunks: list[bytes], boundary: bytes = b"xyz") -> bytes:
    from mdlserve.server.formbody import CheckedFormRequest

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    async def read() -> bytes:
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)]}  # fmt: skip
        return b"".join([chunk async for chunk in CheckedFormRequest(scope, receive).stream()])

    return asyncio.run(read())


def test_a_multipart_body_needs_its_closing_boundary_in_whatever_chunks_it_arrives():
    """The closing delimiter is found however the body is split into received chunks (one
    byte at a time included); a body that ends without it is refused by name."""
    from mdlserve.server.jsonbody import BodyRefused

    body = b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--xyz--\r\n'
    for size in range(1, len(body) + 1):
        assert _read_form_body([body[i : i + size] for i in range(0, len(body), size)]) == body
    for cut in (len(body) - 4, len(body) - 3, 20):  # "...--xyz", "...--xyz-", inside the part
        with pytest.raises(BodyRefused, match=r"ends before its closing boundary \(--xyz--\): it was cut short"):
            _read_form_body([body[:cut][i : i + 7] for i in range(0, cut, 7)])
    # An opening or inner delimiter (--xyz) is not the closing one (--xyz--).
    with pytest.raises(BodyRefused):
        _read_form_body([b"--xyz\r\n\r\n1\r\n--xyz\r\n"])


def test_a_cut_short_body_names_a_long_boundary_shortened():
    from mdlserve.server.jsonbody import BodyRefused

    with pytest.raises(BodyRefused) as refused:
        _read_form_body([b"--" + b"q" * 5000 + b"\r\n"], boundary=b"q" * 5000)
    assert refused.value.detail == (
        f"the multipart/form-data body ends before its closing boundary (--{'q' * 70}...--): it was cut short"
    )


def test_stream_interval_reaches_vllms_engine_args_and_defaults_to_every_token(monkeypatch):
    from mdlserve.server.engine import engine_args

    assert engine_args(Settings()).stream_interval == 1
    args = build_parser().parse_args(["serve", "--stream-interval", "8"])
    assert engine_args(Settings(stream_interval=args.stream_interval)).stream_interval == 8
    monkeypatch.setenv("MDL_STREAM_INTERVAL", "3")
    assert engine_args(Settings()).stream_interval == 3
    with pytest.raises(ValidationError, match="stream_interval"):
        Settings(stream_interval=0)


def test_cudagraph_mode_flag_reaches_vllms_compilation_config_and_unset_leaves_vllms_default():
    from vllm.config import CompilationConfig, CUDAGraphMode

    from mdlserve.server.engine import engine_args

    args = build_parser().parse_args(["serve", "--cudagraph-mode", "FULL"])
    chosen = engine_args(Settings(cudagraph_mode=args.cudagraph_mode)).compilation_config
    assert isinstance(chosen, CompilationConfig) and chosen.cudagraph_mode == CUDAGraphMode.FULL
    assert engine_args(Settings()).compilation_config.cudagraph_mode is None  # vLLM decides per platform
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cudagraph-mode", "full-ish"])
    with pytest.raises(ValidationError, match="cudagraph_mode"):
        Settings(cudagraph_mode="ALL")


def test_capture_sizes_flag_reaches_vllms_compilation_config_sorted_and_bad_sizes_are_named():
    from mdlserve.server.engine import engine_args

    args = build_parser().parse_args(["serve", "--cudagraph-capture-sizes", "512, 1,64,2,64"])
    settings = Settings(cudagraph_capture_sizes=args.cudagraph_capture_sizes, cudagraph_mode="FULL")
    chosen = engine_args(settings).compilation_config
    assert chosen.cudagraph_capture_sizes == [1, 2, 64, 512]
    assert chosen.cudagraph_mode.name == "FULL"  # both settings reach the one config
    assert engine_args(Settings()).compilation_config.cudagraph_capture_sizes is None  # vLLM's own sizes
    for bad, message in (("", "at least one size"), ("0,8", "at least 1 (got 0)"), ("8,x", "valid integer")):
        with pytest.raises(ValidationError, match="cudagraph_capture_sizes") as refused:
            Settings(cudagraph_capture_sizes=bad)
        assert message in str(refused.value)
    with pytest.raises(ValidationError, match="cudagraph_capture_sizes has 1024, more than max_num_batched_tokens"):
        Settings(cudagraph_capture_sizes="8,1024", max_num_batched_tokens=512)
    assert Settings(cudagraph_capture_sizes="8,512", max_num_batched_tokens=512).cudagraph_capture_sizes == [8, 512]
