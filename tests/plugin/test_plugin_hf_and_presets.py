"""register(), Transformers auto classes without trust_remote_code, the 7b preset files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from mdlserve.model_plugin import register
from mdlserve.model_plugin.checkpoints import make_checkpoint
from mdlserve.model_plugin.config import MiDashengLMConfig
from mdlserve.model_plugin.processing import MiDashengLMProcessor

from .conftest import SR, make_clip

REGISTRY_PROBE = """
import json, sys
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()
ours_imported = "mdlserve.model_plugin.model" in sys.modules
if "mdlserve.model_plugin" in sys.modules:
    from mdlserve.model_plugin import register
    register()
cls = ModelRegistry._try_load_model_cls("MiDashengLMModel")
print(json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}", "ours_imported_early": ours_imported}))
"""


def probe_registry(plugins: str | None) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, "-c", REGISTRY_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plugin_loaded_by_default_registers_cheaply_and_twice():
    """vLLM loads the plugin when VLLM_PLUGINS is unset; register() runs in every vLLM
    process, so it imports no model code (torch layers) and a second call changes nothing.
    With VLLM_PLUGINS excluding ours the built-in is used: test_plugin_builtin_parity.py."""
    result = probe_registry(None)
    assert result == {"class": "mdlserve.model_plugin.model.MiDashengLMModel", "ours_imported_early": False}


def test_auto_classes_load_without_trust_remote_code(tiny_checkpoint):
    register()
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert type(config) is MiDashengLMConfig
    assert config.audio_encoder_config.target_length == 1008
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor) is MiDashengLMProcessor  # ours, not a dynamic module from the checkpoint

    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": "clip.wav"}, {"type": "text", "text": "Caption the audio."}],
        }
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")

    two_audio = rendered.replace("<|audio_eos|>", "<|audio_eos|><|audio_bos|><|AUDIO|><|audio_eos|>", 1)
    clips = [make_clip(30 * SR, seed=1), make_clip(1000, seed=2)]
    inputs = processor(text=two_audio, audio=clips)
    audio_id = processor.audio_token_id
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(audio_id) == 150 + 1
    assert inputs["audio_length"].tolist() == [30 * SR, 3200]  # the short clip zero-padded
    padded = inputs["input_values"][1].numpy()
    np.testing.assert_array_equal(padded[:1000], clips[1])
    assert not padded[1000:].any()

    with pytest.raises(ValueError) as excinfo:
        processor(text=rendered, audio=clips)
    assert "the text has 1 <|AUDIO|> placeholder(s) but 2 audio clip(s) were given" in str(excinfo.value)


def test_checkpoint_with_other_framing_is_refused_by_name(tiny_checkpoint):
    """Prompt-side token counts assume 160-sample hops, 4-frame patches and 5x subsampling;
    a checkpoint with other values would overflow or underfill its placeholders."""
    from mdlserve.model_plugin.model import _check_token_framing

    register()
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    _check_token_framing(config)
    config.audio_encoder_config.hop_length = 320
    config.subsample_factor = 4
    with pytest.raises(ValueError) as excinfo:
        _check_token_framing(config)
    assert str(excinfo.value) == ("unsupported MiDashengLM checkpoint: hop_length 320 (supported: 160), "
                                  "subsample_factor 4 (supported: 5)")


@pytest.fixture(scope="module")
def checkpoint_7b(tmp_path_factory):
    return make_checkpoint("7b", tmp_path_factory.mktemp("ckpt7b") / "7b")


def test_7b_preset_config_shapes(checkpoint_7b):
    config = json.loads((checkpoint_7b / "config.json").read_text())
    enc, dec = config["audio_encoder_config"], config["text_config"]
    assert (enc["embed_dim"], enc["depth"], enc["num_heads"]) == (1280, 32, 16)
    assert enc["target_length"] == 1008 and enc["patch_size"] == [64, 4] and enc["n_mels"] == 64
    assert dec["hidden_size"] == 3584
    assert dec["intermediate_size"] == 18944
    assert dec["num_hidden_layers"] == 28
    assert dec["num_attention_heads"] == 28
    assert dec["num_key_value_heads"] == 4
    assert dec["vocab_size"] == 151936
    assert dec["rope_theta"] == 1e6
    assert dec["tie_word_embeddings"] is False
    assert config["subsample_factor"] == 5
    assert not (checkpoint_7b / "model.safetensors").exists()  # shapes only, for load_format="dummy"
    register()
    loaded = AutoConfig.from_pretrained(checkpoint_7b)
    assert loaded.text_config.hidden_size == 3584 and loaded.text_config.tie_word_embeddings is False


def test_7b_tokenizer_decodes_every_id(checkpoint_7b):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_7b)
    assert len(tokenizer) == 151936
    texts = tokenizer.batch_decode([[i] for i in range(151936)])
    assert len(texts) == 151936
    assert texts[tokenizer.convert_tokens_to_ids("<|AUDIO|>")] == "<|AUDIO|>"
    ids = tokenizer.encode("Caption the audio.", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Caption the audio."
