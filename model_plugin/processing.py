"""Hugging Face processor for MiDashengLM: Qwen2 tokenizer + 16 kHz waveform extractor.

Keeps the published processor's behaviour (`processor.apply_chat_template(messages)`,
`processor(text=..., audio=[...])` returning `input_ids` with each `<|AUDIO|>` expanded,
`input_values` and `audio_length`). This file imports nothing but transformers and numpy
because generated checkpoints also carry a copy of it as `processing_midashenglm.py`
(with an `auto_map`), the way published checkpoints ship theirs for
`trust_remote_code` users such as vLLM's built-in implementation.
"""

import math

import numpy as np
from transformers import BatchFeature, ProcessorMixin

SAMPLE_RATE = 16000
HOP_LENGTH = 160
PATCH_FRAMES = 4
SUBSAMPLE_FACTOR = 5
MIN_AUDIO_SAMPLES = 3200
# 16-bit PCM (int16) -> float32 samples in [-1, 1): x * 2**-15, exact in float32 and what
# libsndfile's own int16 -> float conversion gives.
PCM16_SCALE = np.float32(2**-15)
# The placeholder the chat template puts in the prompt once per clip; the engine expands
# each into the clip's audio tokens, so a prompt must hold exactly one per clip.
AUDIO_TOKEN = "<|AUDIO|>"
# Full scale is 1.0. Far beyond it (|x| above ~1e15 for a 512-point STFT) the log-mel front
# end's fp32 power spectrum overflows to inf and the encoder turns the clip into NaN.
MAX_SAMPLE_MAGNITUDE = 1e12


def num_audio_tokens(num_samples: int) -> int:
    """Decoder tokens for a clip of `num_samples` samples at 16 kHz (150 for 30 s).

    Mel frames with centred STFT: L // hop + 1; one patch per 4 frames; one token per
    5 patches; at least one token.
    """
    num_samples = max(num_samples, MIN_AUDIO_SAMPLES)
    return max(1, (num_samples // HOP_LENGTH + 1) // PATCH_FRAMES // SUBSAMPLE_FACTOR)


def sample_range_problem(waveform: np.ndarray) -> str | None:
    """Why these float samples cannot go through the front end (NaN or infinite samples, or
    samples past MAX_SAMPLE_MAGNITUDE), or None. Two reductions and no temporary array:
    NaN and inf reach the extremes."""
    peak = max(float(waveform.max()), -float(waveform.min()))
    if not math.isfinite(peak):
        return "the waveform contains NaN or infinite samples"
    if peak > MAX_SAMPLE_MAGNITUDE:
        return (
            f"samples reach {peak:.3g}: full scale is 1.0, and past {MAX_SAMPLE_MAGNITUDE:g} "
            "the log-mel front end overflows"
        )
    return None


def float_samples(waveform: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] of a waveform given as floats or as int16 PCM (x / 32768)."""
    if waveform.dtype == np.int16:
        return waveform * PCM16_SCALE
    return np.asarray(waveform, dtype=np.float32)


class MiDashengLMProcessor(ProcessorMixin):
    attributes = ["feature_extractor", "tokenizer"]
    feature_extractor_class = "Wav2Vec2FeatureExtractor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        audio_token: str = AUDIO_TOKEN,
        audio_bos_token: str = "<|audio_bos|>",
        audio_eos_token: str = "<|audio_eos|>",
    ):
        if chat_template is None and tokenizer is not None:
            chat_template = tokenizer.chat_template
        self.audio_token = audio_token
        self.audio_bos_token = audio_bos_token
        self.audio_eos_token = audio_eos_token
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(audio_token)

    def __call__(self, text=None, audio=None, return_tensors="pt", **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("MiDashengLMProcessor needs `text`")
        texts = [text] if isinstance(text, str) else list(text)
        audios = [] if audio is None else ([audio] if isinstance(audio, np.ndarray) else list(audio))
        audios = [np.asarray(a, dtype=np.float32) for a in audios]
        for i, a in enumerate(audios):
            if a.ndim != 1:
                raise ValueError(f"audio {i} must be a 1-D mono waveform, got shape {a.shape}")
            if a.shape[0] < MIN_AUDIO_SAMPLES:
                audios[i] = np.pad(a, (0, MIN_AUDIO_SAMPLES - a.shape[0]))

        n_placeholders = sum(t.count(self.audio_token) for t in texts)
        if n_placeholders != len(audios):
            raise ValueError(
                f"the text has {n_placeholders} {self.audio_token} placeholder(s) "
                f"but {len(audios)} audio clip(s) were given"
            )
        counts = iter(num_audio_tokens(a.shape[0]) for a in audios)
        expanded = []
        for t in texts:
            pieces = t.split(self.audio_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.audio_token * next(counts) + piece
            expanded.append(out)

        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, padding=len(expanded) > 1))
        if audios:
            feats = self.feature_extractor(
                audios,
                sampling_rate=SAMPLE_RATE,
                padding="longest",
                return_attention_mask=True,
                return_tensors=return_tensors,
            )
            data["input_values"] = feats["input_values"]
            data["audio_length"] = feats["attention_mask"].sum(-1)
        return BatchFeature(data, tensor_type=None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "input_values", "audio_length"]
