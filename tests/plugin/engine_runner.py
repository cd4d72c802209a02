"""Run a vLLM engine on clips in its own process and print the results as one JSON line.

Usage: engine_runner.py CHECKPOINT CLIPS.npz [DTYPE]   (result on the stdout line starting RESULT_JSON)

The process environment decides what runs: `VLLM_PLUGINS=""` switches our plugin off
(vLLM's built-in MiDashengLM, which needs `trust_remote_code` for the HF processor);
without `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine core runs in its own process.
Plugin registration is process-global, hence the separate interpreter. Each clip is its
own `generate()` call so that the built-in's batch padding cannot change any clip.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Run as a script too (here and by gpu_parity.py): the suite's shared helpers live in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clips import SR, make_clip  # noqa: E402
from fast_engine import FAST_ENGINE_KWARGS  # noqa: E402

__all__ = ["PROMPT", "SR", "make_clip", "run_in_subprocess"]

PROMPT = (
    "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Caption the audio.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def run_in_subprocess(checkpoint: str, clips_file: str, env: dict[str, str], dtype: str = "float32",
                      timeout: float = 600) -> dict:
    """This script in a fresh interpreter with `env`; its JSON result. RuntimeError, with
    the end of its stderr, if it fails."""
    proc = subprocess.run([sys.executable, __file__, checkpoint, clips_file, dtype], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"engine_runner.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON ")]
    return json.loads(line.removeprefix("RESULT_JSON "))


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def model_class_name(model) -> str:
    return qualified_name(type(model))


def main() -> None:
    checkpoint, clips_file = sys.argv[1], sys.argv[2]
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    import vllm

    plugin_off = os.environ.get("VLLM_PLUGINS") == ""
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    kwargs = {**FAST_ENGINE_KWARGS, "dtype": dtype, "enforce_eager": in_process}
    llm = vllm.LLM(model=checkpoint, trust_remote_code=plugin_off, **kwargs)
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with np.load(clips_file) as data:
        clips = [data[f"arr_{i}"] for i in range(len(data.files))]
    results = []
    for clip in clips:
        (out,) = llm.generate(
            {"prompt": PROMPT, "multi_modal_data": {"audio": clip}}, greedy, use_tqdm=False
        )
        results.append(
            {"prompt_token_ids": list(out.prompt_token_ids), "output_token_ids": list(out.outputs[0].token_ids)}
        )
    if in_process:
        model_class = llm.apply_model(model_class_name)[0]
    else:
        # The model lives in the engine-core process; ask the registry this process (and
        # that one, through the same plugin loading) resolves the architecture with.
        from vllm import ModelRegistry

        model_class = qualified_name(ModelRegistry._try_load_model_cls("MiDashengLMModel"))
    print("RESULT_JSON " + json.dumps({"model_class": model_class, "results": results}), flush=True)


if __name__ == "__main__":
    main()
