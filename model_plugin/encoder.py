"""Dasheng audio encoder, run over every 10.08 s chunk of every clip in one pass.

The published encoder pads a batch to its longest clip and loops over chunk positions,
masking padded patches. Here the clips stay packed: a clip's log-mel is computed from its
own samples (its own reflect padding, its own top-dB floor), its patches are laid end to
end with every other clip's, and attention runs over all chunks at once with each chunk
seeing only its own valid patches. A clip's embeddings therefore never depend on what
else is in the batch, and no compute is spent on padding in the linear layers.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF

from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig

from .config import DashengConfig


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass
class ChunkLayout:
    """How the packed patch sequence of a batch of clips splits into attention chunks.

    Built once per encoder call on the CPU from the clips' sample counts. Tokens are the
    patches of clip 0, then clip 1, ...; a clip's patches split into chunks of
    `chunk_patches`, the last one shorter. In each chunk, the keys are the chunk's valid
    patches: those with index < num_samples // 640 in their clip. A chunk with no valid
    patch (the lone extra patch that centred framing can add) attends over itself.
    """

    num_patches: list[int]  # per clip
    chunk_lens: list[int]  # per chunk, query count
    positions: torch.Tensor  # (N,) patch index inside its chunk, for the time embedding
    scatter_index: torch.Tensor  # (N,) slot of each token in the (chunks, max_q) grid
    key_mask: torch.Tensor  # (chunks, max_q) bool, True where a key may be attended
    max_q: int
    # The same for variable-length kernels: queries are all tokens, keys the valid ones.
    key_index: torch.Tensor  # (K,) tokens that serve as keys
    cu_seqlens_q: torch.Tensor  # (chunks + 1,) int32
    cu_seqlens_k: torch.Tensor  # (chunks + 1,) int32
    max_k: int

    @classmethod
    def build(
        cls, num_samples: list[int], chunk_patches: int, samples_per_patch: int, hop: int
    ) -> "ChunkLayout":
        num_patches, chunk_lens, chunk_valid, positions = [], [], [], []
        for n in num_samples:
            patches = (n // hop + 1) // (samples_per_patch // hop)
            valid = n // samples_per_patch
            num_patches.append(patches)
            for start in range(0, patches, chunk_patches):
                length = min(chunk_patches, patches - start)
                valid_here = min(max(valid - start, 0), length)
                chunk_lens.append(length)
                chunk_valid.append(valid_here if valid_here > 0 else length)
                positions.append(np.arange(length))
        max_q = max(chunk_lens)
        lens = np.asarray(chunk_lens)
        slot_in_chunk = np.concatenate(positions)
        chunk_of_token = np.repeat(np.arange(len(lens)), lens)
        valid = np.asarray(chunk_valid)
        key_mask = np.arange(max_q)[None, :] < valid[:, None]
        cu_q = np.concatenate([[0], np.cumsum(lens)])
        return cls(
            num_patches=num_patches,
            chunk_lens=chunk_lens,
            positions=torch.from_numpy(slot_in_chunk),
            scatter_index=torch.from_numpy(chunk_of_token * max_q + slot_in_chunk),
            key_mask=torch.from_numpy(key_mask),
            max_q=max_q,
            key_index=torch.from_numpy(np.nonzero(slot_in_chunk < valid[chunk_of_token])[0]),
            cu_seqlens_q=torch.from_numpy(cu_q.astype(np.int32)),
            cu_seqlens_k=torch.from_numpy(np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)),
            max_k=int(valid.max()),
        )

    def to(self, device: torch.device) -> "ChunkLayout":
        tensors = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("positions", "scatter_index", "key_mask", "key_index", "cu_seqlens_q", "cu_seqlens_k")
        }
        return replace(self, **tensors)


class LogMelFrontEnd(nn.Module):
    """Power mel spectrogram in dB, per clip, always in fp32."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        self.n_fft = config.n_fft
        self.hop = config.hop_length
        self.win_length = config.win_length
        self.register_buffer("window", torch.hann_window(config.win_length), persistent=False)
        fbanks = AF.melscale_fbanks(
            n_freqs=config.n_fft // 2 + 1,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            sample_rate=config.sample_rate,
        )
        self.register_buffer("mel_fbanks", fbanks.T.contiguous(), persistent=False)  # (mels, freqs)

    def forward(self, waveforms: torch.Tensor, num_samples: list[int]) -> torch.Tensor:
        # waveforms: (total_samples,) clips end to end -> (clips, mels, max_frames) dB
        pad = self.n_fft // 2
        clips = torch.split(waveforms.float(), num_samples)
        lengths = torch.tensor(num_samples, device=waveforms.device)
        # Buffers follow the model dtype when vLLM casts the model; the front end stays fp32.
        # Each clip sits at offset `pad` of its row; reflect-pad both of its own ends.
        batch = F.pad(nn.utils.rnn.pad_sequence(list(clips), batch_first=True), (pad, pad))
        batch[:, :pad] = batch[:, pad + 1 : 2 * pad + 1].flip(-1)
        k = torch.arange(1, pad + 1, device=waveforms.device)
        last = (pad + lengths - 1)[:, None]
        batch.scatter_(1, last + k, batch.gather(1, last - k))

        spec = torch.stft(
            batch,
            n_fft=self.n_fft,
            hop_length=self.hop,
            win_length=self.win_length,
            window=self.window.float(),
            center=False,
            return_complex=True,
        )  # (clips, freqs, max_frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_fbanks.float(), power)  # (clips, mels, max_frames)
        db = 10.0 * torch.log10(mel.clamp(min=1e-10))
        frames = lengths // self.hop + 1
        valid = torch.arange(db.shape[-1], device=db.device)[None, :] < frames[:, None]
        peak = db.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2))
        return torch.maximum(db, (peak - 120.0)[:, None, None])


class MelBatchNorm(nn.BatchNorm2d):
    """BatchNorm over mel bins with its running statistics (inference only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (clips, mels, frames)
        # The statistics are kept in the model dtype; normalise in the input's (fp32).
        stats = (self.running_mean, self.running_var, self.weight, self.bias)
        mean, var, weight, bias = (t.to(x.dtype) for t in stats)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = (n_mels, 4): one 40 ms patch per 4 frames."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        kernel = _pair(config.patch_size)
        if _pair(config.patch_stride) != kernel or kernel[0] != config.n_mels:
            raise ValueError(
                f"Dasheng patches must span all {config.n_mels} mel bins without overlap; "
                f"got patch_size {config.patch_size}, patch_stride {config.patch_stride}"
            )
        self.frames_per_patch = kernel[1]
        self.proj = nn.Conv2d(config.input_channels, config.embed_dim, kernel, kernel)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: (clips, mels, frames) -> (clips, patches, embed_dim); non-overlapping
        # patches make the convolution a plain matmul over (mels x 4 frames) blocks.
        clips, mels, frames = mel.shape
        patches = frames // self.frames_per_patch
        x = mel[:, :, : patches * self.frames_per_patch]
        x = x.reshape(clips, mels, patches, self.frames_per_patch).permute(0, 2, 1, 3)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(x.reshape(clips, patches, -1), weight, self.proj.bias)


def _flash_attn_version(head_dim: int) -> int | None:
    """vLLM's bundled FlashAttention version for this GPU, or None (CPU, fp32, no FA)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda() or torch.get_default_dtype() not in (torch.float16, torch.bfloat16):
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    except ImportError:
        return None
    return get_flash_attn_version(head_size=head_dim)


class DashengAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if num_heads % tp_size:
            raise ValueError(f"encoder heads ({num_heads}) must divide by tensor parallel size ({tp_size})")
        self.num_heads = num_heads // tp_size
        self.head_dim = dim // num_heads
        self.qkv = QKVParallelLinear(
            dim, self.head_dim, num_heads, bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv"
        )
        self.proj = RowParallelLinear(dim, dim, quant_config=quant_config, prefix=f"{prefix}.proj")
        self.flash_attn_version = _flash_attn_version(self.head_dim)

    def forward(self, x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        # x: (N, dim) packed patches of all clips
        qkv, _ = self.qkv(x)  # (N, 3 * heads * head_dim)
        if self.flash_attn_version is not None and qkv.is_cuda:
            out = self._flash_attention(qkv, layout)
        else:
            out = self._masked_sdpa(qkv, layout)
        out, _ = self.proj(out)
        return out

    def _flash_attention(self, qkv: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        """Variable-length FlashAttention: no padding, keys gathered to the valid ones."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        q, k, v = qkv.view(qkv.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        out = flash_attn_varlen_func(
            q,
            k[layout.key_index],
            v[layout.key_index],
            max_seqlen_q=layout.max_q,
            cu_seqlens_q=layout.cu_seqlens_q,
            max_seqlen_k=layout.max_k,
            cu_seqlens_k=layout.cu_seqlens_k,
            softmax_scale=self.head_dim**-0.5,
            causal=False,
            fa_version=self.flash_attn_version,
        )
        return out.reshape(qkv.shape[0], -1)

    def _masked_sdpa(self, qkv: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        """Chunks padded to a grid, padded keys masked (CPU and any device without FA)."""
        chunks = len(layout.chunk_lens)
        grid = qkv.new_zeros(chunks * layout.max_q, qkv.shape[-1])
        grid[layout.scatter_index] = qkv
        grid = grid.view(chunks, layout.max_q, 3, self.num_heads, self.head_dim)
        q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # each (chunks, heads, max_q, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask[:, None, None, :])
        return out.transpose(1, 2).reshape(chunks * layout.max_q, -1)[layout.scatter_index]


class DashengMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden, quant_config=quant_config, prefix=f"{prefix}.fc1")
        self.act = get_act_fn("gelu")
        self.fc2 = RowParallelLinear(hidden, dim, quant_config=quant_config, prefix=f"{prefix}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc1(x)
        x, _ = self.fc2(self.act(x))
        return x


class DashengBlock(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, config: DashengConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DashengAttention(dim, config.num_heads, config.qkv_bias, quant_config, f"{prefix}.attn")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DashengMlp(dim, int(dim * config.mlp_ratio), quant_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


class DashengEncoder(nn.Module):
    """Waveforms (16 kHz mono, packed) -> one embedding per 40 ms patch (packed)."""

    def __init__(self, config: DashengConfig, quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        if config.init_values:
            raise ValueError("Dasheng encoders with LayerScale (init_values) are not supported")
        self.front_end = LogMelFrontEnd(config)
        self.init_bn = MelBatchNorm(config.n_mels, momentum=0.01)
        self.patch_embed = PatchEmbed(config)
        self.samples_per_patch = config.hop_length * self.patch_embed.frames_per_patch
        self.chunk_patches = config.target_length // self.patch_embed.frames_per_patch
        self.time_pos_embed = nn.Parameter(torch.empty(1, config.embed_dim, 1, self.chunk_patches))
        self.freq_pos_embed = nn.Parameter(torch.empty(1, config.embed_dim, 1, 1))
        self.blocks = nn.ModuleList(
            DashengBlock(config, quant_config, f"{prefix}.blocks.{i}") for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.hop = config.hop_length

    def layout(self, num_samples: list[int]) -> ChunkLayout:
        return ChunkLayout.build(num_samples, self.chunk_patches, self.samples_per_patch, self.hop)

    def forward(self, waveforms: torch.Tensor, num_samples: list[int]) -> tuple[torch.Tensor, list[int]]:
        # waveforms: (total_samples,) fp32 -> ((N, embed_dim) patches, patches per clip)
        layout = self.layout(num_samples).to(waveforms.device)
        dtype = self.time_pos_embed.dtype
        mel = self.init_bn(self.front_end(waveforms, num_samples))  # fp32 up to here
        patches = self.patch_embed(mel.to(dtype))  # (clips, max_patches, dim)
        counts = torch.tensor(layout.num_patches, device=waveforms.device)
        keep = torch.arange(patches.shape[1], device=waveforms.device)[None, :] < counts[:, None]
        x = patches[keep]  # (N, dim), clip-major
        time_table = self.time_pos_embed.reshape(self.time_pos_embed.shape[1], -1).T  # (chunk, dim)
        x = x + time_table[layout.positions] + self.freq_pos_embed.reshape(1, -1)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x), layout.num_patches
