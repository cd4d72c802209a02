"""The encoder's mel front-end against librosa, an implementation it shares no code with.

`model_plugin.encoder.LogMelFrontEnd` is what the engine runs (on the GPU in production,
here on the CPU: the same module). librosa computes the published recipe independently:
centred STFT with reflect padding, n_fft 512, periodic Hann window of 512, hop 160, power 2,
64 HTK mel bins over 0-8 kHz without normalisation, 10*log10 floored at 1e-10, and the clip's
own maximum minus 120 dB as the floor (`power_to_db(..., top_db=120)`).
"""

import librosa
import numpy as np
import pytest
import torch

from mdlserve.model_plugin.config import DashengConfig
from mdlserve.model_plugin.encoder import LogMelFrontEnd

from .conftest import SR, make_clip

CONFIG = DashengConfig()
# Around a hop boundary, a sub-0.2 s clip, one 10.08 s chunk, 30 s.
LENGTHS = [3200, 15839, 15840, 16000, 161280, 30 * SR]


def librosa_log_mel(clip: np.ndarray) -> np.ndarray:
    power = librosa.feature.melspectrogram(
        y=clip, sr=CONFIG.sample_rate, n_fft=CONFIG.n_fft, hop_length=CONFIG.hop_length,
        win_length=CONFIG.win_length, window="hann", center=True, pad_mode="reflect", power=2.0,
        n_mels=CONFIG.n_mels, fmin=CONFIG.f_min, fmax=CONFIG.f_max, htk=True, norm=None,
    )
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=120.0)


@pytest.fixture(scope="module")
def front_end() -> LogMelFrontEnd:
    return LogMelFrontEnd(CONFIG).eval()


def ours(front_end: LogMelFrontEnd, clips: list[np.ndarray]) -> list[np.ndarray]:
    """The front end on clips laid end to end, each cut to its own frames."""
    with torch.no_grad():
        db = front_end(torch.from_numpy(np.concatenate(clips)), [c.size for c in clips])
    return [db[i, :, : c.size // CONFIG.hop_length + 1].numpy() for i, c in enumerate(clips)]


def test_mel_filterbank_matches_librosa(front_end):
    expected = librosa.filters.mel(sr=CONFIG.sample_rate, n_fft=CONFIG.n_fft, n_mels=CONFIG.n_mels,
                                   fmin=CONFIG.f_min, fmax=CONFIG.f_max, htk=True, norm=None)
    assert front_end.mel_fbanks.shape == expected.shape == (64, 257)
    np.testing.assert_allclose(front_end.mel_fbanks.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("num_samples", LENGTHS)
def test_stft_framing_matches_librosa(front_end, num_samples):
    """Frame count and placement: a clip of L samples has L // 160 + 1 centred frames (what
    `num_audio_tokens` assumes), and the batch holds no frame beyond its longest clip's."""
    clip = make_clip(num_samples, seed=3)
    expected_frames = librosa.stft(clip, n_fft=CONFIG.n_fft, hop_length=CONFIG.hop_length, center=True).shape[1]
    assert expected_frames == num_samples // CONFIG.hop_length + 1
    with torch.no_grad():
        db = front_end(torch.from_numpy(clip), [num_samples])
    assert db.shape == (1, CONFIG.n_mels, expected_frames)


@pytest.mark.parametrize("num_samples", LENGTHS)
def test_log_mel_values_match_librosa(front_end, num_samples):
    clip = make_clip(num_samples, seed=4)
    (got,) = ours(front_end, [clip])
    expected = librosa_log_mel(clip)
    assert got.shape == expected.shape
    # fp32 on both sides; dB differences of float rounding are far below 0.01 dB.
    np.testing.assert_allclose(got, expected, atol=1e-2)


def test_each_clip_of_a_batch_matches_librosa_alone(front_end):
    """Batched clips of different lengths: each gets its own reflect padding and its own
    top-dB floor, exactly as librosa computes the clip alone."""
    clips = [make_clip(n, seed=10 + i) for i, n in enumerate([16000, 3200, 161280, 15839])]
    clips[1] *= 1e-3  # a quiet clip next to loud ones: a shared floor would show here
    for got, clip in zip(ours(front_end, clips), clips):
        np.testing.assert_allclose(got, librosa_log_mel(clip), atol=1e-2)


def test_comparison_detects_a_wrong_front_end(front_end):
    """Control: librosa with the Slaney mel scale (a plausible mistake) is far outside the
    tolerance the tests above use."""
    clip = make_clip(16000, seed=5)
    (got,) = ours(front_end, [clip])
    power = librosa.feature.melspectrogram(y=clip, sr=SR, n_fft=512, hop_length=160, n_mels=64, fmax=8000, htk=False)
    assert np.abs(got - librosa.power_to_db(power, amin=1e-10, top_db=120.0)).max() > 1.0


def test_int16_pcm_gives_exactly_the_features_of_its_float32_samples(front_end):
    """16-bit PCM (int16, as the gateway passes a 16-bit 16 kHz mono file) is scaled to
    x / 32768 inside the front end: the features equal those of the float32 samples bit
    for bit, and match librosa."""
    pcm = [np.round(make_clip(n, seed=30 + i).clip(-1, 1) * 32767).astype(np.int16) for i, n in enumerate([3200, 16000])]
    floats = [(p * np.float32(2**-15)).astype(np.float32) for p in pcm]
    for got, expected, clip in zip(ours(front_end, pcm), ours(front_end, floats), floats):
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(got, librosa_log_mel(clip), atol=1e-2)


def test_the_processor_keeps_int16_pcm_and_converts_a_mixed_request_to_float32():
    """vLLM's processor sends int16 clips as they are (half the bytes of float32) under
    their own key; a request mixing int16 and float clips gets float32 for both (an
    encoder batch holds one form)."""
    from mdlserve.model_plugin.model import MiDashengLMMultiModalProcessor

    pcm = np.array([-32768, -1, 0, 16384], dtype=np.int16)
    floats = np.full(4000, 0.25, dtype=np.float32)
    audio_tensors = MiDashengLMMultiModalProcessor.audio_tensors  # uses nothing of the instance
    kept = audio_tensors(None, [np.pad(pcm, (0, 3996))])  # type: ignore[arg-type]
    assert set(kept) == {"input_pcm16", "audio_length"}
    assert kept["input_pcm16"][0].dtype == torch.int16 and kept["input_pcm16"][0][:4].tolist() == pcm.tolist()
    mixed = audio_tensors(None, [np.pad(pcm, (0, 3996)), floats])  # type: ignore[arg-type]
    assert set(mixed) == {"input_values", "audio_length"}
    assert [t.dtype for t in mixed["input_values"]] == [torch.float32, torch.float32]
    assert mixed["input_values"][0][:4].tolist() == [-1.0, -(2**-15), 0.0, 0.5]
    assert mixed["audio_length"].tolist() == [4000, 4000]
