"""--max-audio-seconds is the real limit end to end (issue 10, section 4), on the real tiny
engine in process: a clip exactly at the limit is answered although its tokens exceed the
encoder budget vLLM picks by default for an engine built as the gateway builds it (2048
tokens: 409 s); one just past the limit is refused from its header, before anything is
decoded."""

import io

import httpx
import numpy as np
import pytest
import soundfile

from mdlserve.model_plugin.processing import SAMPLE_RATE, num_audio_tokens
from mdlserve.server.app import create_app
from mdlserve.server import engine
from mdlserve.server.engine import engine_config
from mdlserve.server.settings import Settings

from .helpers import b64, metric
from .inprocess import DEADLINE_S, chat_body, until

pytestmark = pytest.mark.anyio
ENGINE_START_S = 900  # vLLM's start on a busy 2-core machine
LIMIT_S = 450  # 2250 audio tokens, more than vLLM's default budget of 2048


@pytest.fixture
def anyio_backend():
    return "asyncio"


def settings(checkpoint: str, **overrides) -> Settings:
    return Settings(
        model=checkpoint,
        enforce_eager=True,
        dtype="float32",
        max_model_len=4096,
        max_num_seqs=2,
        kv_cache_bytes=1 << 30,
        max_audio_seconds=LIMIT_S,
        max_upload_bytes=64 << 20,
        **overrides,
    )


def quiet_flac(seconds: float) -> bytes:
    """A low tone (compresses well, unlike noise) of exactly `seconds`."""
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.01 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def audio_request(seconds: float) -> dict:
    part = {"type": "input_audio", "input_audio": {"data": b64(quiet_flac(seconds)), "format": "flac"}}
    return chat_body([part, {"type": "text", "text": "Caption the audio."}], max_tokens=1, temperature=0)


@pytest.mark.slow
async def test_audio_at_the_limit_is_answered_and_past_it_refused_before_decoding(tiny_checkpoint):
    app = create_app(settings(tiny_checkpoint))
    async with app.router.lifespan_context(app):
        engine = app.state.gateway.engine
        await until(lambda: engine.up or engine.gone, "the engine started", deadline_s=ENGINE_START_S)
        assert app.state.gateway.engine.up
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://g", timeout=DEADLINE_S * 5) as client:
            at_limit = await client.post("/v1/chat/completions", json=audio_request(LIMIT_S))
            assert at_limit.status_code == 200, at_limit.text
            assert at_limit.json()["usage"]["prompt_tokens"] > num_audio_tokens(LIMIT_S * SAMPLE_RATE)
            decoded = metric((await client.get("/metrics")).text, "mdl_audio_seconds_total")
            assert decoded == pytest.approx(LIMIT_S)

            past = await client.post("/v1/chat/completions", json=audio_request(LIMIT_S + 0.5))
            assert past.status_code == 400, past.text
            error = past.json()["error"]
            assert error["code"] == "invalid_audio" and "longer than the limit of 450 s" in error["message"]
            # Refused from the header: not one more second was decoded.
            assert metric((await client.get("/metrics")).text, "mdl_audio_seconds_total") == decoded


def test_engine_step_budget_is_vllms_offline_default(tiny_checkpoint):
    """Not vLLM's 2048 for an engine built as the gateway builds it: `vllm.LLM`'s default for
    the hardware, 4096 for one CPU worker (16384 on an H200)."""
    assert engine_config(settings(tiny_checkpoint)).scheduler_config.max_num_batched_tokens == 4096
    given = settings(tiny_checkpoint, max_num_batched_tokens=3000)
    assert engine_config(given).scheduler_config.max_num_batched_tokens == 3000


def test_engine_budget_follows_the_audio_limit(tiny_checkpoint, monkeypatch):
    needed = num_audio_tokens(LIMIT_S * SAMPLE_RATE)
    monkeypatch.setattr(engine, "default_step_tokens", lambda args: 2048)  # below one clip at the limit
    assert engine_config(settings(tiny_checkpoint)).scheduler_config.max_num_batched_tokens == needed
    with pytest.raises(ValueError, match=f"--max-num-batched-tokens 1024 is below the {needed} tokens"):
        engine_config(settings(tiny_checkpoint, max_num_batched_tokens=1024))
