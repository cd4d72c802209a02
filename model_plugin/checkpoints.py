"""Generate MiDashengLM checkpoints with the published file layout (no model hub here).

`tiny`: random weights small enough for CPU tests and the demo. `7b`: the published
shapes without weights, for vLLM's `load_format="dummy"`. Both get a real byte-level BPE
tokenizer with the Qwen2 special tokens, a ChatML chat template that renders audio parts
as `<|audio_bos|><|AUDIO|><|audio_eos|>`, generation and processor configs, and a copy of
the processor module with an `auto_map` (what `trust_remote_code` users, such as vLLM's
built-in implementation, load).
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from . import processing
from .processing import SAMPLE_RATE

DEFAULT_SYSTEM_PROMPT = "You are a helpful language and speech assistant."
CAPTION_PROMPT = "Caption the audio."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['audio', 'audio_url', 'input_audio'] -%}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Text the tiny tokenizer's merges are learned from: a few captions and questions.
_TINY_CORPUS = [
    "Caption the audio.",
    "What is happening in this recording?",
    "A man is speaking while music plays in the background.",
    "A dog barks twice and a car passes by on a wet road.",
    "Birds are chirping and wind is blowing through the trees.",
    "A woman sings a slow song accompanied by a piano.",
    "Is there speech in this clip? Yes, a child is talking.",
    "The sound of rain falling on a metal roof, with distant thunder.",
    "You are a helpful language and speech assistant.",
]


@dataclass(frozen=True)
class Preset:
    encoder: dict
    decoder: dict
    regular_vocab: int  # byte-level BPE tokens before the special tokens
    with_weights: bool
    dtype: str
    extra: dict = field(default_factory=dict)


PRESETS = {
    "tiny": Preset(
        encoder=dict(embed_dim=64, depth=2, num_heads=4),
        decoder=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
        ),
        regular_vocab=490,
        with_weights=True,
        dtype="float32",
    ),
    "7b": Preset(
        encoder=dict(embed_dim=1280, depth=32, num_heads=16),
        decoder=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
        ),
        regular_vocab=151643,
        with_weights=False,
        dtype="bfloat16",
    ),
}


def encoder_config(preset: Preset) -> dict:
    return dict(
        preset.encoder,
        patch_size=[64, 4],
        patch_stride=[64, 4],
        input_channels=1,
        target_length=1008,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=None,
        f_min=0.0,
        f_max=8000.0,
        center=True,
        win_length=512,
        hop_length=160,
        sample_rate=SAMPLE_RATE,
        n_fft=512,
        n_mels=64,
    )


def build_tokenizer(regular_vocab: int, vocab_size: int) -> Tokenizer:
    """Byte-level BPE; every id below `vocab_size` is a token, so any id decodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainable = min(regular_vocab, 1024)
    trainer = trainers.BpeTrainer(
        vocab_size=trainable, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    tokenizer.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    vocab = tokenizer.get_vocab()
    if len(vocab) < regular_vocab:
        # Pad the vocabulary to the published size with multi-byte tokens that no merge
        # produces: they only need to exist so that sampled ids decode.
        symbols = sorted(alphabet)
        i = 0
        while len(vocab) < regular_vocab:
            token = symbols[i % len(symbols)] + symbols[(i // len(symbols)) % len(symbols)] + "~" + str(i)
            if token not in vocab:
                vocab[token] = len(vocab)
            i += 1
        pairs = (m.split(" ") if isinstance(m, str) else m for m in _merges(tokenizer))
        merges = [(first, second) for first, second in pairs]
        tokenizer.model = models.BPE(vocab=vocab, merges=merges)
    elif len(vocab) > regular_vocab:
        raise ValueError(f"trained vocabulary ({len(vocab)}) exceeds {regular_vocab}")
    extra = [f"<|reserved_{i}|>" for i in range(vocab_size - regular_vocab - len(SPECIAL_TOKENS))]
    tokenizer.add_special_tokens(SPECIAL_TOKENS + extra)
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _merges(tokenizer: Tokenizer) -> list:
    return json.loads(tokenizer.to_str())["model"]["merges"]


def random_weights(enc: dict, dec: dict, subsample: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published tensor names (fp32)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    e, h = enc["embed_dim"], dec["hidden_size"]
    w: dict[str, torch.Tensor] = {
        "audio_encoder.init_bn.weight": 1.0 + rand(64, std=0.1),
        "audio_encoder.init_bn.bias": rand(64, std=0.1),
        "audio_encoder.init_bn.running_mean": -40.0 + rand(64, std=5.0),
        "audio_encoder.init_bn.running_var": 300.0 + rand(64, std=20.0).abs(),
        "audio_encoder.init_bn.num_batches_tracked": torch.tensor(1000),
        "audio_encoder.patch_embed.proj.weight": rand(e, 1, 64, 4, std=0.05),
        "audio_encoder.patch_embed.proj.bias": rand(e),
        "audio_encoder.time_pos_embed": rand(1, e, 1, 252, std=0.5),
        "audio_encoder.freq_pos_embed": rand(1, e, 1, 1, std=0.5),
        "audio_encoder.norm.weight": 1.0 + rand(e, std=0.1),
        "audio_encoder.norm.bias": rand(e),
    }
    for i in range(enc["depth"]):
        p = f"audio_encoder.blocks.{i}."
        hidden = int(e * 4)
        w.update({
            p + "norm1.weight": 1.0 + rand(e, std=0.1), p + "norm1.bias": rand(e),
            p + "attn.qkv.weight": rand(3 * e, e, std=0.15), p + "attn.qkv.bias": rand(3 * e),
            p + "attn.proj.weight": rand(e, e, std=0.1), p + "attn.proj.bias": rand(e),
            p + "norm2.weight": 1.0 + rand(e, std=0.1), p + "norm2.bias": rand(e),
            p + "mlp.fc1.weight": rand(hidden, e, std=0.1), p + "mlp.fc1.bias": rand(hidden),
            p + "mlp.fc2.weight": rand(e, hidden, std=0.1), p + "mlp.fc2.bias": rand(e),
        })  # fmt: skip
    w.update({
        "audio_projector.net.0.weight": rand(h, e * subsample, std=0.05),
        "audio_projector.net.0.bias": rand(h),
        "audio_projector.net.2.weight": rand(h, h, std=0.1),
        "audio_projector.net.2.bias": rand(h),
    })  # fmt: skip
    inter, heads, kv = dec["intermediate_size"], dec["num_attention_heads"], dec["num_key_value_heads"]
    head_dim = h // heads
    w["decoder.model.embed_tokens.weight"] = rand(dec["vocab_size"], h, std=0.5)
    for i in range(dec["num_hidden_layers"]):
        p = f"decoder.model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1.0 + rand(h, std=0.1),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, h, std=0.1),
            p + "self_attn.q_proj.bias": rand(heads * head_dim),
            p + "self_attn.k_proj.weight": rand(kv * head_dim, h, std=0.1),
            p + "self_attn.k_proj.bias": rand(kv * head_dim),
            p + "self_attn.v_proj.weight": rand(kv * head_dim, h, std=0.1),
            p + "self_attn.v_proj.bias": rand(kv * head_dim),
            p + "self_attn.o_proj.weight": rand(h, heads * head_dim, std=0.1),
            p + "post_attention_layernorm.weight": 1.0 + rand(h, std=0.1),
            p + "mlp.gate_proj.weight": rand(inter, h, std=0.1),
            p + "mlp.up_proj.weight": rand(inter, h, std=0.1),
            p + "mlp.down_proj.weight": rand(h, inter, std=0.1),
        })  # fmt: skip
    w["decoder.model.norm.weight"] = 1.0 + rand(h, std=0.1)
    w["decoder.lm_head.weight"] = rand(dec["vocab_size"], h, std=0.5)
    return w


def frontend_buffers() -> dict[str, torch.Tensor]:
    """The STFT window and mel filterbank some published snapshots also store."""
    import torchaudio.functional as AF

    fb = AF.melscale_fbanks(n_freqs=257, f_min=0.0, f_max=8000.0, n_mels=64, sample_rate=SAMPLE_RATE)
    return {
        "audio_encoder.front_end.0.mel_scale.fb": fb,
        "audio_encoder.front_end.0.spectrogram.window": torch.hann_window(512),
    }


def make_checkpoint(
    preset_name: str, out_dir: str | Path, *, seed: int = 0, frontend_buffer_keys: bool = False
) -> Path:
    """Write a checkpoint directory and return its path. Overwrites existing files."""
    preset = PRESETS[preset_name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dec = preset.decoder
    tokenizer = build_tokenizer(preset.regular_vocab, dec["vocab_size"])
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    config: dict[str, Any] = {
        "architectures": ["MiDashengLMModel"],
        "model_type": "midashenglm",
        "audio_encoder_config": encoder_config(preset),
        "subsample_factor": 5,
        "text_config": dict(
            dec,
            model_type="qwen2",
            hidden_act="silu",
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            torch_dtype=preset.dtype,
        ),
        "audio_token_id": ids["<|AUDIO|>"],
        "torch_dtype": preset.dtype,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                 "special": True}
        for t, i in sorted(((t, i) for t, i in tokenizer.get_vocab().items() if t.startswith("<|")), key=lambda x: x[1])
    }  # fmt: skip
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": dec["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(
        out / "preprocessor_config.json",
        {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "processor_class": "MiDashengLMProcessor",
            "feature_size": 1,
            "sampling_rate": SAMPLE_RATE,
            "padding_value": 0.0,
            "padding_side": "right",
            "do_normalize": False,
            "return_attention_mask": True,
            "auto_map": {"AutoProcessor": "processing_midashenglm.MiDashengLMProcessor"},
        },
    )
    _write_json(
        out / "processor_config.json",
        {
            "processor_class": "MiDashengLMProcessor",
            "auto_map": {"AutoProcessor": "processing_midashenglm.MiDashengLMProcessor"},
        },
    )
    shutil.copyfile(processing.__file__, out / "processing_midashenglm.py")

    weights_file = out / "model.safetensors"
    if preset.with_weights:
        weights = random_weights(config["audio_encoder_config"], dec, config["subsample_factor"], seed)
        if frontend_buffer_keys:
            weights.update(frontend_buffers())
        save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_file), metadata={"format": "pt"})
    elif weights_file.exists():
        weights_file.unlink()
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
