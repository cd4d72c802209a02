"""The plugin's audio embeddings against the plain-PyTorch reference, clip by clip.

The embeddings come from the engine's own model instance (`LLM.apply_model`), so the
weights are the ones vLLM loaded; the reference reads model.safetensors itself.
"""

import numpy as np
import pytest
import torch

from mdlserve.model_plugin.encoder import ChunkLayout
from mdlserve.model_plugin.processing import MIN_AUDIO_SAMPLES, num_audio_tokens

from .conftest import SR, TRAILING_PATCH_SAMPLES, make_clip

# 0.1 s, 1 s, 10 s, exactly one chunk (10.08 s), just over (10.1 s), 30 s, 61 s, the
# extra-trailing-patch case, and a sub-0.2 s clip the processor zero-pads.
LENGTHS = {
    "0.1s": 1600,
    "1s": SR,
    "10s": 10 * SR,
    "10.08s": 161280,
    "10.1s": 161600,
    "30s": 30 * SR,
    "61s": 61 * SR,
    "trailing_patch": TRAILING_PATCH_SAMPLES,
    "under_min": 3199,
}
CLIPS = {name: make_clip(n, seed=i) for i, (name, n) in enumerate(LENGTHS.items())}


def processor_ready(clip: np.ndarray) -> np.ndarray:
    """The documented processor step: clips under 3200 samples are zero-padded to 3200."""
    return np.pad(clip, (0, max(0, MIN_AUDIO_SAMPLES - clip.shape[0])))


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() < 1e-4 * max(scale, 1.0)


@pytest.fixture(scope="module")
def reference_embeddings(reference):
    return {name: reference.audio_embeddings(clip) for name, clip in CLIPS.items()}


@pytest.fixture(scope="module")
def alone_embeddings(plugin_embeddings):
    return {name: plugin_embeddings([processor_ready(clip)])[0] for name, clip in CLIPS.items()}


@pytest.mark.parametrize("name", list(LENGTHS))
def test_single_clip_matches_reference(name, alone_embeddings, reference_embeddings):
    ours, ref = alone_embeddings[name], reference_embeddings[name]
    assert ours.shape[0] == num_audio_tokens(LENGTHS[name])
    assert_close_to_reference(ours, ref)


@pytest.mark.parametrize(
    "names",
    [
        ["0.1s", "61s", "10.08s"],
        ["10.1s", "1s", "trailing_patch", "30s", "under_min"],
        ["10s", "10s", "1s"],  # equal lengths next to each other
        list(LENGTHS),
    ],
    ids=["short-long-chunk", "five-mixed", "equal-lengths", "all"],
)
def test_batched_clips_are_identical_to_alone(names, plugin_embeddings, alone_embeddings, reference_embeddings):
    """Batch invariance: a clip's embeddings do not depend on the other clips in the call.

    Equal up to fp32 rounding, not bit for bit: the CPU GEMM and attention kernels
    accumulate in an order that depends on the batch's shape (rows, chunk grid width),
    which moves the last bits. Any real leak between clips (padding, a shared top-dB
    floor, cross-clip attention) is orders of magnitude above this bound.
    """
    batched = plugin_embeddings([processor_ready(CLIPS[n]) for n in names])
    assert len(batched) == len(names)
    for name, ours in zip(names, batched):
        alone = alone_embeddings[name]
        assert ours.shape == alone.shape, name
        assert (ours - alone).abs().max().item() < 2e-6 * max(alone.abs().max().item(), 1.0), name
        assert_close_to_reference(ours, reference_embeddings[name])


def test_trailing_patch_without_valid_key_attends_over_its_chunk(reference, alone_embeddings):
    """The last chunk of a 640*504+500-sample clip holds one patch and no valid key; by
    the documented rule it attends over itself. The rule is visible in the output: the
    last token differs from what a zero attention output would give, and ours follows
    the rule (the other tokens do not depend on it)."""
    layout = ChunkLayout.build([TRAILING_PATCH_SAMPLES], chunk_patches=252, samples_per_patch=640, hop=160)
    assert layout.num_patches == [505]
    assert layout.chunk_lens == [252, 252, 1]
    assert layout.key_mask[:, 0].tolist() == [True, True, True]
    assert layout.key_mask.sum(dim=1).tolist() == [252, 252, 1]

    ref = reference.audio_embeddings(CLIPS["trailing_patch"])
    zeroed = reference.audio_embeddings(CLIPS["trailing_patch"], empty_chunk_attends_self=False)
    assert ref.shape[0] == 101  # patches 500..504 form the last token, including the extra one
    assert torch.equal(ref[:100], zeroed[:100])
    assert (ref[100] - zeroed[100]).abs().max().item() > 1e-2
    ours = alone_embeddings["trailing_patch"]
    assert_close_to_reference(ours[100:], ref[100:])


def test_key_mask_counts_only_valid_patches():
    """L // 640 valid patches; partial chunks and the L % 640 >= 480 extra patch."""
    layout = ChunkLayout.build([161600, 16000, 3200], chunk_patches=252, samples_per_patch=640, hop=160)
    # 161600 samples: 1011 frames -> 252 patches (one chunk) ... (161600//160+1)//4 = 252
    assert layout.num_patches == [252, 25, 5]
    assert layout.key_mask.sum(dim=1).tolist() == [252, 25, 5]
    layout = ChunkLayout.build([640 * 10 + 500], chunk_patches=252, samples_per_patch=640, hop=160)
    assert layout.num_patches == [11]
    assert layout.key_mask.sum(dim=1).tolist() == [10]


@pytest.mark.parametrize(
    "num_samples, tokens",
    [
        (30 * SR, 150),
        (61 * SR, 305),
        (10 * SR, 50),
        (161280, 50),
        (161600, 50),
        (TRAILING_PATCH_SAMPLES, 101),
        (SR, 5),
        (3200, 1),
        (3199, 1),  # zero-padded to 3200
        (1600, 1),
        (1, 1),
        (3999, 1),  # 25 frames -> 6 patches -> 1 token
        (4000, 1),  # 26 frames -> 6 patches
        (6240, 2),  # 40 frames -> 10 patches -> 2 tokens
        (6239, 1),  # 39 frames -> 9 patches -> 1 token
    ],
)
def test_num_audio_tokens(num_samples, tokens):
    assert num_audio_tokens(num_samples) == tokens
    assert num_audio_tokens(num_samples) == max(1, (max(num_samples, 3200) // 160 + 1) // 4 // 5)


def _padded_clip_features(names: list[str]):
    """Callable for `LLM.apply_model`: per clip, its eager features and those of
    `embed_padded_clip` (the lone-clip CUDA graph's body) over the clip zero-padded to
    whole chunks, its tail's patches in a padding chunk of their own."""

    def run(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        encoder = model.audio_encoder
        per_chunk = encoder.chunk_patches * encoder.samples_per_patch
        out = {}
        with torch.no_grad():
            for name in names:
                clip = torch.from_numpy(processor_ready(CLIPS[name]))
                n = clip.shape[0]
                eager, (tokens,) = encoder(clip, [n])
                samples = torch.zeros(-(-n // per_chunk) * per_chunk, dtype=clip.dtype)
                samples[:n] = clip
                own = encoder.layout([n])
                pad = samples.shape[0] // encoder.samples_per_patch - tokens
                layout = ChunkLayout.from_chunks(
                    [tokens, pad], own.chunk_lens + [pad] * (pad > 0), own.chunk_keys + [pad] * (pad > 0)
                )
                padded = encoder.embed_padded_clip(samples, torch.tensor([n]), layout)
                out[name] = (eager, padded[:tokens], padded.shape[0])
        return out

    return run


def test_a_clip_padded_to_whole_chunks_keeps_its_own_features(engine):
    """A lone clip's CUDA graph runs the encoder over the clip zero-padded to whole
    chunks, with its length as a tensor: its reflect padding, top-dB floor, patches and
    chunks must stay its own, whatever the padding holds."""
    names = ["0.1s", "1s", "10s", "10.08s", "10.1s", "30s", "trailing_patch", "under_min"]
    results = engine.apply_model(_padded_clip_features(names))[0]
    for name in names:
        eager, padded, padded_tokens = results[name]
        assert padded_tokens % 252 == 0 and padded_tokens >= eager.shape[0], name
        assert padded.shape == eager.shape, name
        assert (padded - eager).abs().max().item() < 2e-6 * max(eager.abs().max().item(), 1.0), name
