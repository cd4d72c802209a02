"""Plain-PyTorch reference of MiDashengLM's audio path: Dasheng encoder + projector.

Written from the published architecture description, independent of `model_plugin`:
one clip at a time, an explicit loop over 10.08 s chunks, explicit softmax attention,
weights read straight from `model.safetensors` under the published tensor names. It is
slow and simple on purpose; the plugin's packed encoder is tested against it.

Semantics (published model, plus our documented rule for the one case it leaves open):
- the processor zero-pads clips shorter than 3200 samples (0.2 s) to 3200;
- log-mel: centred STFT (reflect), n_fft 512, window 512 (Hann), hop 160, power 2,
  64 HTK mel bins over 0-8 kHz, 10*log10(max(x, 1e-10)), floored at the clip's own
  maximum minus 120 dB;
- BatchNorm over mel bins with running statistics; Conv2d patches of 64 mels x 4 frames;
- a clip of L samples has (L // 160 + 1) // 4 patches, of which the first L // 640 are
  valid; patches are split into chunks of target_length // 4 = 252; each chunk adds the
  time positional embedding from index 0, attends only within itself and only to valid
  keys; a chunk holding no valid patch attends over all of its own patches;
- projector: drop patches that do not fill a group of 5, concatenate each group,
  Linear -> GELU (erf) -> Linear.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from safetensors.torch import load_file

MIN_SAMPLES = 3200


class ReferenceMiDashengLMAudio:
    def __init__(self, checkpoint_dir: str | Path):
        checkpoint_dir = Path(checkpoint_dir)
        config = json.loads((checkpoint_dir / "config.json").read_text())
        enc = config["audio_encoder_config"]
        self.w = {k: v.float() for k, v in load_file(str(checkpoint_dir / "model.safetensors")).items()}
        self.sample_rate = enc["sample_rate"]
        self.n_fft = enc["n_fft"]
        self.win_length = enc["win_length"]
        self.hop = enc["hop_length"]
        self.n_mels = enc["n_mels"]
        self.f_min, self.f_max = enc["f_min"], enc["f_max"]
        self.embed_dim = enc["embed_dim"]
        self.num_heads = enc["num_heads"]
        self.depth = enc["depth"]
        self.frames_per_patch = enc["patch_stride"][1]
        self.chunk_patches = enc["target_length"] // self.frames_per_patch
        self.subsample = config["subsample_factor"]

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (n_mels, frames) in dB."""
        spec = AF.spectrogram(
            wav.float(),
            pad=0,
            window=torch.hann_window(self.win_length),
            n_fft=self.n_fft,
            hop_length=self.hop,
            win_length=self.win_length,
            power=2.0,
            normalized=False,
            center=True,
            pad_mode="reflect",
        )  # (freqs, frames)
        fbanks = AF.melscale_fbanks(
            n_freqs=self.n_fft // 2 + 1,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            sample_rate=self.sample_rate,
        )  # (freqs, mels)
        mel = fbanks.T @ spec
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        return torch.maximum(db, db.max() - 120.0)

    def encode(self, wav: torch.Tensor, empty_chunk_attends_self: bool = True) -> torch.Tensor:
        """One clip (samples,), already padded to >= 3200 -> (patches, embed_dim).

        `empty_chunk_attends_self=False` gives a chunk without valid keys a zero attention
        output instead (what a fully masked softmax that returns zeros does); it exists
        only to show that the documented rule matters for such clips.
        """
        w = self.w
        num_samples = wav.shape[0]
        mel = self.log_mel(wav)
        bn = "audio_encoder.init_bn."
        mel = (mel - w[bn + "running_mean"][:, None]) / torch.sqrt(w[bn + "running_var"][:, None] + 1e-5)
        mel = mel * w[bn + "weight"][:, None] + w[bn + "bias"][:, None]
        patches = F.conv2d(
            mel[None, None],
            w["audio_encoder.patch_embed.proj.weight"],
            w["audio_encoder.patch_embed.proj.bias"],
            stride=(self.n_mels, self.frames_per_patch),
        )[0, :, 0, :].T  # (patches, dim)
        samples_per_patch = self.hop * self.frames_per_patch
        num_patches = patches.shape[0]
        assert num_patches == (num_samples // self.hop + 1) // self.frames_per_patch
        valid = num_samples // samples_per_patch
        time_pos = w["audio_encoder.time_pos_embed"][0, :, 0, :].T  # (252, dim)
        freq_pos = w["audio_encoder.freq_pos_embed"][0, :, 0, 0]  # (dim,)

        outputs = []
        for start in range(0, num_patches, self.chunk_patches):
            x = patches[start : start + self.chunk_patches]
            n = x.shape[0]
            x = x + time_pos[:n] + freq_pos
            valid_here = min(max(valid - start, 0), n)
            if valid_here == 0 and not empty_chunk_attends_self:
                key_ok = torch.zeros(n, dtype=torch.bool)
            else:
                key_ok = torch.arange(n) < (valid_here if valid_here > 0 else n)
            for i in range(self.depth):
                x = self._block(x, f"audio_encoder.blocks.{i}.", key_ok)
            outputs.append(self._layer_norm(x, "audio_encoder.norm."))
        return torch.cat(outputs)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """(patches, dim) -> (patches // 5, hidden)."""
        w = self.w
        tokens = patches.shape[0] // self.subsample
        x = patches[: tokens * self.subsample].reshape(tokens, self.subsample * patches.shape[1])
        x = x @ w["audio_projector.net.0.weight"].T + w["audio_projector.net.0.bias"]
        x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return x @ w["audio_projector.net.2.weight"].T + w["audio_projector.net.2.bias"]

    def audio_embeddings(self, wav, empty_chunk_attends_self: bool = True) -> torch.Tensor:
        """What the decoder receives for one clip: processor padding, encoder, projector."""
        wav = torch.as_tensor(wav, dtype=torch.float32)
        if wav.shape[0] < MIN_SAMPLES:
            wav = F.pad(wav, (0, MIN_SAMPLES - wav.shape[0]))
        return self.project(self.encode(wav, empty_chunk_attends_self))

    def _layer_norm(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * self.w[prefix + "weight"] + self.w[prefix + "bias"]

    def _block(self, x: torch.Tensor, prefix: str, key_ok: torch.Tensor) -> torch.Tensor:
        w = self.w
        n, dim = x.shape
        head_dim = dim // self.num_heads
        h = self._layer_norm(x, prefix + "norm1.")
        qkv = h @ w[prefix + "attn.qkv.weight"].T + w[prefix + "attn.qkv.bias"]
        q, k, v = qkv.reshape(n, 3, self.num_heads, head_dim).permute(1, 2, 0, 3)  # each (heads, n, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~key_ok[None, None, :], float("-inf"))
        # A row with every key masked gets zero weights (only reachable on request).
        attn = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0) @ v  # (heads, n, hd)
        attn = attn.transpose(0, 1).reshape(n, dim)
        x = x + attn @ w[prefix + "attn.proj.weight"].T + w[prefix + "attn.proj.bias"]
        h = self._layer_norm(x, prefix + "norm2.")
        h = h @ w[prefix + "mlp.fc1.weight"].T + w[prefix + "mlp.fc1.bias"]
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return x + h @ w[prefix + "mlp.fc2.weight"].T + w[prefix + "mlp.fc2.bias"]
