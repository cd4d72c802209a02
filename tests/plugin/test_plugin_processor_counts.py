"""The processor's token counts and padding against values worked out by hand.

The parity test against vLLM's built-in (test_plugin_builtin_parity.py) cannot check the
processor: the generated checkpoint ships our processing.py as its remote code, so both
sides load the same file. These numbers come from the published recipe, not from our code:
a clip of L samples (zero-padded to 3200 if shorter) has L // 160 + 1 centred mel frames,
4 frames make a patch, 5 patches make a decoder token.
"""

import numpy as np
import pytest
from transformers import AutoProcessor

from mdlserve.model_plugin import register

from .conftest import PROMPT

# samples -> decoder tokens, by hand: frames = L // 160 + 1, patches = frames // 4,
# tokens = patches // 5.
HAND_COUNTS = {
    1: 1,  # padded to 3200: 21 frames, 5 patches, 1 token
    1600: 1,  # 0.1 s, padded to 3200
    3199: 1,  # one short of the minimum, padded
    3200: 1,  # 21 frames -> 5 patches -> 1 token
    6399: 2,  # 39 + 1 = 40 frames -> 10 patches -> 2 tokens
    6400: 2,  # 40 + 1 = 41 frames -> 10 patches -> 2 tokens
    15839: 4,  # 98 + 1 = 99 frames -> 24 patches -> 4 tokens
    15840: 5,  # 99 + 1 = 100 frames -> 25 patches -> 5 tokens
    16000: 5,  # 1 s: 101 frames -> 25 patches -> 5 tokens
    161280: 50,  # 10.08 s: 1009 frames -> 252 patches -> 50 tokens
    480000: 150,  # 30 s: 3001 frames -> 750 patches -> 150 tokens
}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    register()
    return AutoProcessor.from_pretrained(tiny_checkpoint)


def audio_run(processor, ids) -> list[int]:
    """Lengths of the runs of consecutive <|AUDIO|> tokens in a sequence of token ids."""
    runs, current = [], 0
    for token in list(ids) + [None]:
        if token == processor.audio_token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("num_samples, tokens", sorted(HAND_COUNTS.items()))
def test_placeholder_count_per_clip(processor, num_samples, tokens):
    clip = np.full(num_samples, 0.1, dtype=np.float32)
    out = processor(text=PROMPT, audio=[clip], return_tensors="np")
    assert audio_run(processor, out["input_ids"][0]) == [tokens]
    assert out["audio_length"].tolist() == [max(num_samples, 3200)]


def test_short_clip_is_zero_padded_to_3200_samples(processor):
    clip = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    out = processor(text=PROMPT, audio=[clip], return_tensors="np")
    values = out["input_values"][0]
    assert values.shape == (3200,)
    np.testing.assert_array_equal(values[:1000], clip)
    assert not values[1000:].any()


def test_two_clips_in_one_prompt_are_padded_to_the_longest(processor):
    """Two placeholders, clips of 1 s and 0.1 s: runs of 5 and 1 tokens in prompt order,
    the shorter clip zero-padded to the longer, lengths counting only real samples."""
    long_clip = np.full(16000, 0.25, dtype=np.float32)
    short_clip = np.full(1600, -0.25, dtype=np.float32)
    prompt = PROMPT.replace("<|AUDIO|>", "<|AUDIO|> then <|AUDIO|>")
    out = processor(text=prompt, audio=[long_clip, short_clip], return_tensors="np")
    assert audio_run(processor, out["input_ids"][0]) == [5, 1]
    assert out["audio_length"].tolist() == [16000, 3200]
    values = out["input_values"]
    assert values.shape == (2, 16000)
    np.testing.assert_array_equal(values[0], long_clip)
    np.testing.assert_array_equal(values[1, :1600], short_clip)
    assert not values[1, 1600:].any()  # its own zero padding to 3200, then the batch's


def test_placeholder_and_clip_counts_must_agree(processor):
    with pytest.raises(ValueError, match=r"1 <\|AUDIO\|> placeholder\(s\) but 2 audio clip\(s\)"):
        processor(text=PROMPT, audio=[np.zeros(3200, np.float32)] * 2)
