"""The one synthetic clip generator of the test suite.

Deterministic per seed, with structure that an encoder sees and a lossy codec keeps: a
tone, a sweep, a slow envelope and a little noise.
"""

import numpy as np

SR = 16000


def make_clip(num_samples: int, seed: int = 0, rate: int = SR, channels: int | None = None) -> np.ndarray:
    """float32 within [-1, 1]: (num_samples,) mono, or (num_samples, channels) with the same
    signal in every channel."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    sweep = 0.2 * np.sin(2 * np.pi * (100 + 300 * t) * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t + seed)
    clip = ((tone + sweep) * envelope + 0.05 * rng.standard_normal(num_samples)).astype(np.float32)
    return clip if channels is None else np.repeat(clip[:, None], channels, axis=1)
