"""Dasheng audio encoder, run over every 10.08 s chunk of every clip in one pass.

The published encoder pads a batch to its longest clip and loops over chunk positions,
masking padded patches. Here the clips stay packed: a clip's log-mel is computed from its
own samples (its own reflect padding, its own top-dB floor), its patches are laid end to
end with every other clip's, and attention runs over all chunks at once with each chunk
seeing only its own valid patches. A clip's embeddings therefore never depend on what
else is in the batch, and no compute is spent on padding in the linear layers.
"""

from dataclasses import dataclass, replace
from typing import cast

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
from .processing import PCM16_SCALE


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def to_device(host: torch.Tensor | np.ndarray | list[int], device: torch.device) -> torch.Tensor:
    """A host tensor (or array, or list of ints) on `device`, queued behind the GPU's work
    rather than waiting for it: `torch.tensor(values, device=...)` and a blocking `.to()`
    synchronise the stream, so the host could not launch the encoder's next kernels (nor
    vLLM its next step) while the GPU worked. From pinned memory the copy is asynchronous,
    and the pinned block is not reused before the copy is done (torch's host allocator)."""
    tensor = host if isinstance(host, torch.Tensor) else torch.as_tensor(host)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class ChunkLayout:
    """How the packed patch sequence of a batch of clips splits into attention chunks.

    Built once per encoder call on the CPU from the clips' sample counts. Tokens are the
    patches of clip 0, then clip 1, ...; a clip's patches split into chunks of
    `chunk_patches`, the last one shorter. In each chunk, the keys are the chunk's valid
    patches: those with index < num_samples // 640 in their clip, always a prefix of the
    chunk. A chunk with no valid patch (the lone extra patch that centred framing can
    add) attends over itself.
    """

    num_patches: list[int]  # per clip
    chunk_lens: list[int]  # per chunk: queries
    chunk_keys: list[int]  # per chunk: keys (a prefix of the chunk)
    positions: torch.Tensor  # (N,) patch index inside its chunk, for the time embedding
    # Variable-length kernels: chunk boundaries of the queries and of the gathered keys.
    cu_seqlens: torch.Tensor  # (chunks + 1,) int32
    cu_seqlens_k: torch.Tensor  # (chunks + 1,) int32
    key_index: torch.Tensor | None  # (K,) tokens that are keys; None: every token is one
    # Padded kernels (SDPA): chunks on a (chunks, max_len) grid with a key mask.
    scatter_index: torch.Tensor  # (N,) slot of each token in the grid
    key_mask: torch.Tensor  # (chunks, max_len) bool
    max_len: int

    @classmethod
    def build(cls, num_samples: list[int], chunk_patches: int, samples_per_patch: int, hop: int) -> "ChunkLayout":
        num_patches, chunk_lens, chunk_keys = [], [], []
        for n in num_samples:
            patches = (n // hop + 1) // (samples_per_patch // hop)
            valid = n // samples_per_patch
            num_patches.append(patches)
            for start in range(0, patches, chunk_patches):
                length = min(chunk_patches, patches - start)
                chunk_valid = min(max(valid - start, 0), length)
                chunk_lens.append(length)
                chunk_keys.append(chunk_valid if chunk_valid > 0 else length)
        return cls.from_chunks(num_patches, chunk_lens, chunk_keys)

    @classmethod
    def from_chunks(cls, num_patches: list[int], chunk_lens: list[int], chunk_keys: list[int]) -> "ChunkLayout":
        """The layout of given chunks (queries and key prefixes), tokens end to end."""
        lens, keys = np.asarray(chunk_lens), np.asarray(chunk_keys)
        max_len = int(lens.max())
        starts = np.concatenate([[0], np.cumsum(lens)])
        slot_in_chunk = np.arange(starts[-1]) - np.repeat(starts[:-1], lens)
        chunk_of_token = np.repeat(np.arange(len(lens)), lens)
        is_key = slot_in_chunk < keys[chunk_of_token]
        return cls(
            num_patches=num_patches,
            chunk_lens=chunk_lens,
            chunk_keys=chunk_keys,
            positions=torch.from_numpy(slot_in_chunk),
            cu_seqlens=torch.from_numpy(starts.astype(np.int32)),
            cu_seqlens_k=torch.from_numpy(np.concatenate([[0], np.cumsum(keys)]).astype(np.int32)),
            key_index=None if (keys == lens).all() else torch.from_numpy(np.nonzero(is_key)[0]),
            scatter_index=torch.from_numpy(chunk_of_token * max_len + slot_in_chunk),
            key_mask=torch.from_numpy(np.arange(max_len)[None, :] < keys[:, None]),
            max_len=max_len,
        )

    def to(self, device: torch.device) -> "ChunkLayout":
        return replace(
            self,
            positions=to_device(self.positions, device),
            cu_seqlens=to_device(self.cu_seqlens, device),
            cu_seqlens_k=to_device(self.cu_seqlens_k, device),
            key_index=None if self.key_index is None else to_device(self.key_index, device),
            scatter_index=to_device(self.scatter_index, device),
            key_mask=to_device(self.key_mask, device),
        )


class LogMelFrontEnd(nn.Module):
    """Power mel spectrogram in dB, per clip, always in fp32.

    Waveforms come as float32 samples in [-1, 1] or as 16-bit PCM (int16, what a 16-bit
    file holds: half the bytes to hash, send to the engine, gather and copy to the GPU).
    PCM is scaled by 2**-15 here, which gives exactly the float32 samples a 16-bit
    decoder returns, so both forms of one clip give the same features."""

    window: torch.Tensor
    mel_fbanks: torch.Tensor

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
        # waveforms: (total_samples,) float32 or int16, clips end to end -> (clips, mels, max_frames) dB
        clips = torch.split(waveforms, num_samples)
        rows = nn.utils.rnn.pad_sequence(list(clips), batch_first=True)
        return self.log_mel(rows, to_device(num_samples, waveforms.device))

    def log_mel(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # rows: (clips, samples) float32 or int16, clip i in rows[i, :lengths[i]], then zeros
        # -> (clips, mels, samples // hop + 1) dB. Only a clip's first lengths // hop + 1
        # frames are its own (later ones see its row's padding); callers drop the rest.
        pad = self.n_fft // 2
        samples = rows.float() * float(PCM16_SCALE) if rows.dtype == torch.int16 else rows.float()
        # Buffers follow the model dtype when vLLM casts the model; the front end stays fp32.
        # Each clip sits at offset `pad` of its row; reflect-pad both of its own ends.
        batch = F.pad(samples, (pad, pad))
        batch[:, :pad] = batch[:, pad + 1 : 2 * pad + 1].flip(-1)
        k = torch.arange(1, pad + 1, device=rows.device)
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
        )  # (clips, freqs, frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_fbanks.float(), power)  # (clips, mels, frames)
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
        assert self.running_mean is not None and self.running_var is not None  # track_running_stats
        stats = (self.running_mean, self.running_var, self.weight, self.bias)
        mean, var, weight, bias = (t.to(x.dtype) for t in stats)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = (n_mels, 4): one 40 ms patch per 4 frames."""

    def __init__(self, config: DashengConfig):
        super().__init__()
        kernel = as_pair(config.patch_size)
        if as_pair(config.patch_stride) != kernel or kernel[0] != config.n_mels:
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
        """Variable-length FlashAttention over the packed tokens, no padding. Keys are
        gathered only when some chunk has a patch that is not a key."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        assert self.flash_attn_version is not None  # forward() calls this only with FlashAttention

        q, k, v = qkv.view(qkv.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        if layout.key_index is not None:
            k, v = k[layout.key_index], v[layout.key_index]
        out = flash_attn_varlen_func(
            q,
            k,
            v,
            max_seqlen_q=layout.max_len,
            cu_seqlens_q=layout.cu_seqlens,
            max_seqlen_k=layout.max_len,
            cu_seqlens_k=layout.cu_seqlens_k,
            softmax_scale=self.head_dim**-0.5,
            causal=False,
            fa_version=self.flash_attn_version,
        )
        return out.reshape(qkv.shape[0], -1)

    def _masked_sdpa(self, qkv: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        """Chunks padded to a grid, padded keys masked (CPU and any device without FA)."""
        chunks = len(layout.chunk_lens)
        grid = qkv.new_zeros(chunks * layout.max_len, qkv.shape[-1])
        grid[layout.scatter_index] = qkv
        grid = grid.view(chunks, layout.max_len, 3, self.num_heads, self.head_dim)
        q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # each (chunks, heads, max_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask[:, None, None, :])
        return out.transpose(1, 2).reshape(chunks * layout.max_len, -1)[layout.scatter_index]


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


class EncoderGraphs:
    """CUDA graphs of the encoder's transformer blocks for small batches.

    One 30 s clip is 750 patches: the blocks' ~400 kernel launches and their Python cost
    more than the GPU work itself, and a lone request's time to first token waits on
    exactly that. Tokens are padded up to a multiple of the chunk length; the padding
    forms a chunk of its own (it attends only to itself), unused chunk slots have zero
    length, so the real tokens' results are those of the eager path. One graph per
    padded size, captured on first use, all sharing one memory pool (replays are
    sequential and each output is consumed before the next replay).

    A lone clip (a request's time to first token) replays one graph from its samples on:
    before it, the log-mel front end, patch embedding and their bookkeeping were ~100
    small launches, 2.9 ms of host time with the GPU idle (H200, 30 s clip,
    benchmarks/results/2026-12-03-h200-ttft-split). The clip is zero-padded to whole
    chunks; its length is a device input, so its reflect padding and top-dB floor are its
    own, and the padded tail's patches form the padding chunk (they are not keys of the
    clip's chunks): the real patches' results are the eager path's.
    """

    max_chunks = 32

    def __init__(self, encoder: "DashengEncoder", max_tokens: int):
        self.encoder = encoder
        self.chunk = encoder.chunk_patches
        self.max_tokens = max_tokens
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, ChunkLayout]] = {}
        self.clip_graphs: dict[tuple[int, torch.dtype], ClipGraph] = {}
        self.samples_per_chunk = self.chunk * encoder.samples_per_patch

    def clip(self, waveform: torch.Tensor, num_samples: int) -> torch.Tensor | None:
        """One clip's patch features through one graph, or None when it is too long.
        waveform: (num_samples,) float32 or int16 -> (patches, dim)."""
        padded = -(-num_samples // self.samples_per_chunk) * self.samples_per_chunk
        padded_tokens = padded // self.encoder.samples_per_patch
        if padded_tokens > self.max_tokens or padded_tokens // self.chunk + 1 > self.max_chunks:
            return None
        key = (padded, waveform.dtype)
        if key not in self.clip_graphs:
            self.clip_graphs[key] = self._capture_clip(padded, waveform)
        graph = self.clip_graphs[key]
        layout = self.encoder.layout([num_samples])
        tokens = layout.num_patches[0]
        graph.samples[:num_samples].copy_(waveform)
        graph.samples[num_samples:].zero_()
        graph.length.fill_(num_samples)
        self._set_padded(graph.layout, layout, tokens, padded_tokens)
        graph.graph.replay()
        return graph.out[:tokens]

    def __call__(self, x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor | None:
        """Run the blocks through a graph, or return None when the batch is too large."""
        tokens = x.shape[0]
        padded = -(-tokens // self.chunk) * self.chunk
        if padded > self.max_tokens or len(layout.chunk_lens) + 1 > self.max_chunks:
            return None
        if padded not in self.graphs:
            self.graphs[padded] = self._capture(padded, x)
        graph, x_in, out, static = self.graphs[padded]
        x_in[:tokens].copy_(x)
        x_in[tokens:].zero_()
        self._set_padded(static, layout, tokens, padded)
        graph.replay()
        return out[:tokens]

    def _set_padded(self, static: ChunkLayout, layout: ChunkLayout, tokens: int, padded: int) -> None:
        """`layout`'s chunks into a graph's buffers, the tokens from `tokens` to `padded` as
        a chunk of their own (they attend only to themselves)."""
        pad = [padded - tokens] if padded > tokens else []
        self._set_chunks(static, layout.chunk_lens + pad, layout.chunk_keys + pad)

    def _set_chunks(self, static: ChunkLayout, lens: list[int], keys: list[int]) -> None:
        """Write a layout into the captured buffers; unused chunk slots get length 0 and
        unused key slots point at token 0 (beyond cu_seqlens_k[-1], never read)."""
        free = self.max_chunks - len(lens)
        starts = np.concatenate([[0], np.cumsum(lens)])
        key_index = np.concatenate([s + np.arange(k) for s, k in zip(starts, keys)])
        key_slots = static.key_index
        assert key_slots is not None  # captured layouts always gather their keys
        key_index = np.pad(key_index, (0, key_slots.shape[0] - key_index.size))
        cu = np.concatenate([starts, np.full(free, starts[-1])]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(keys), np.full(free, sum(keys))]).astype(np.int32)
        for target, values in ((static.cu_seqlens, cu), (static.cu_seqlens_k, cu_k), (key_slots, key_index)):
            target.copy_(torch.from_numpy(values).pin_memory(), non_blocking=True)

    def _static_layout(self, tokens: int, device: torch.device) -> ChunkLayout:
        """Chunk buffers that a graph reads, filled with full chunks for its capture."""
        static = ChunkLayout(
            num_patches=[],
            chunk_lens=[],
            chunk_keys=[],
            positions=torch.arange(tokens, device=device) % self.chunk,
            cu_seqlens=torch.zeros(self.max_chunks + 1, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.zeros(self.max_chunks + 1, dtype=torch.int32, device=device),
            key_index=torch.zeros(tokens, dtype=torch.long, device=device),
            scatter_index=torch.empty(0, dtype=torch.long, device=device),
            key_mask=torch.empty(0, 0, dtype=torch.bool, device=device),
            max_len=self.chunk,
        )
        full = [self.chunk] * (tokens // self.chunk)
        self._set_chunks(static, full, full)
        return static

    def _record(self, device: torch.device, body) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`body()` captured in a graph of the shared pool, after a warm-up run outside it.

        Captured with `capture_begin`/`capture_end`, not `torch.cuda.graph`: entering that
        synchronises the device and empties torch's device and pinned host caches, and
        these graphs are captured on first use, while the engine serves. After a lone
        clip's capture, the next 512-clip batch re-pinned the blocks vLLM stacks each
        step's clips into: 28-40 cudaHostAlloc calls, 71-113 ms with the host thread
        blocked (H200, benchmarks/results/2026-12-04-h200-pinned-warmup)."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            body()
            graph.capture_begin(pool=self.pool)
            try:
                out = body()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        return graph, out

    def _capture(self, padded: int, like: torch.Tensor):
        x_in = torch.zeros(padded, like.shape[1], dtype=like.dtype, device=like.device)
        static = self._static_layout(padded, like.device)
        graph, out = self._record(like.device, lambda: self.encoder.run_blocks(x_in, static))
        return graph, x_in, out, static

    def _capture_clip(self, padded_samples: int, like: torch.Tensor) -> "ClipGraph":
        samples = torch.zeros(padded_samples, dtype=like.dtype, device=like.device)
        length = torch.full((1,), padded_samples, dtype=torch.long, device=like.device)
        static = self._static_layout(padded_samples // self.encoder.samples_per_patch, like.device)
        graph, out = self._record(like.device, lambda: self.encoder.embed_padded_clip(samples, length, static))
        return ClipGraph(graph, samples, length, out, static)


@dataclass
class ClipGraph:
    """A captured lone-clip encoder run and the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    samples: torch.Tensor  # (padded_samples,) the clip, then zeros
    length: torch.Tensor  # (1,) the clip's samples
    out: torch.Tensor  # (padded_samples // samples_per_patch, dim)
    layout: ChunkLayout


class DashengEncoder(nn.Module):
    """Waveforms (16 kHz mono, packed) -> one embedding per 40 ms patch (packed)."""

    def __init__(
        self,
        config: DashengConfig,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        cuda_graph_max_tokens: int = 0,
    ):
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
        # Graphs need the variable-length kernel (static shapes, no host-side masks).
        first_block = cast(DashengBlock, self.blocks[0])
        use_graphs = cuda_graph_max_tokens > 0 and first_block.attn.flash_attn_version is not None
        self.graphs = EncoderGraphs(self, cuda_graph_max_tokens) if use_graphs else None

    def layout(self, num_samples: list[int]) -> ChunkLayout:
        return ChunkLayout.build(num_samples, self.chunk_patches, self.samples_per_patch, self.hop)

    def run_blocks(self, x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        # x: (N, dim) patches with positions added -> (N, dim) normalised features
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x)

    def embed_padded_clip(self, samples: torch.Tensor, length: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
        # samples: (S,) one clip then zeros, S a whole number of chunks; length: (1,) its
        # samples on the device -> (S // samples_per_patch, embed_dim); the clip's own
        # patches first, with its chunks as `layout` gives them
        mel = self.init_bn(self.front_end.log_mel(samples[None], length))
        x = self.patch_embed(mel.to(self.time_pos_embed.dtype))[0]
        return self.run_blocks(self.with_positions(x, layout.positions), layout)

    def with_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (N, dim) patches, positions: (N,) each patch's index in its chunk -> (N, dim)
        time_table = self.time_pos_embed.reshape(self.time_pos_embed.shape[1], -1).T  # (chunk, dim)
        return x + time_table[positions] + self.freq_pos_embed.reshape(1, -1)

    def forward(self, waveforms: torch.Tensor, num_samples: list[int]) -> tuple[torch.Tensor, list[int]]:
        # waveforms: (total_samples,) fp32 or int16 PCM -> ((N, embed_dim) patches, patches per clip)
        if self.graphs is not None and waveforms.is_cuda and len(num_samples) == 1:
            out = self.graphs.clip(waveforms, num_samples[0])
            if out is not None:
                return out, [out.shape[0]]
        layout = self.layout(num_samples).to(waveforms.device)
        dtype = self.time_pos_embed.dtype
        mel = self.init_bn(self.front_end(waveforms, num_samples))  # fp32 up to here
        patches = self.patch_embed(mel.to(dtype))  # (clips, max_patches, dim)
        counts = to_device(layout.num_patches, waveforms.device)
        keep = torch.arange(patches.shape[1], device=waveforms.device)[None, :] < counts[:, None]
        x = self.with_positions(patches[keep], layout.positions)  # (N, dim), clip-major
        out = self.graphs(x, layout) if self.graphs is not None and x.is_cuda else None
        return (self.run_blocks(x, layout) if out is None else out), layout.num_patches
