"""Plugin vs vLLM's built-in MiDashengLM on the tiny checkpoint, on a GPU, in both dtypes.

    python tests/plugin/gpu_parity.py RESULT.json

The CPU test suite checks parity through test_plugin_builtin_parity.py; this script runs
the same comparison where the GPU-only paths are live: our FlashAttention varlen encoder
(bf16) and its CUDA graphs, torch.compile and the decoder's CUDA graphs, against the
built-in. Each implementation runs in its own `engine_runner.py` process on the default
multiprocess engine path, one clip per `generate()` call (see the parity test's docstring
for why). float32 must agree token for token; in bf16 two correct implementations
can round differently, so the script records where greedy outputs first diverge.
Exits 1 if a float32 output or any prompt differs.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from engine_runner import SR, make_clip, run_in_subprocess

# As in test_plugin_builtin_parity.py: sub-second to 61 s, window edges 10.08 s and beyond.
LENGTHS = [1600, 3199, SR, 10 * SR, 161280, 161600, 30 * SR, 61 * SR]
DTYPES = ["float32", "bfloat16"]


def run(impl: str, checkpoint: str, clips_file: str, dtype: str) -> dict:
    env = dict(os.environ, **({"VLLM_PLUGINS": ""} if impl == "builtin" else {}))
    return run_in_subprocess(checkpoint, clips_file, env, dtype, timeout=900)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    import torch
    import vllm

    from mdlserve.model_plugin.checkpoints import make_checkpoint

    out_path = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp(prefix="mdl-parity-"))
    checkpoint = str(make_checkpoint("tiny", work / "tiny"))
    clips_file = str(work / "clips.npz")
    np.savez(clips_file, *[make_clip(n, seed=20 + i) for i, n in enumerate(LENGTHS)])
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "vllm": vllm.__version__, "torch": torch.__version__,
              "checkpoint": "tiny preset (random weights)", "clip_samples": LENGTHS, "runs": []}
    ok = True
    for dtype in DTYPES:
        ours, theirs = run("plugin", checkpoint, clips_file, dtype), run("builtin", checkpoint, clips_file, dtype)
        clips = []
        for n, a, b in zip(LENGTHS, ours["results"], theirs["results"]):
            same_prompt = a["prompt_token_ids"] == b["prompt_token_ids"]
            diverges_at = first_difference(a["output_token_ids"], b["output_token_ids"])
            clips.append({"samples": n, "same_prompt_tokens": same_prompt, "prompt_tokens": len(a["prompt_token_ids"]),
                          "ours": a["output_token_ids"], "builtin": b["output_token_ids"],
                          "outputs_diverge_at": diverges_at})
            ok &= same_prompt and (dtype != "float32" or diverges_at is None)
        identical = sum(c["outputs_diverge_at"] is None for c in clips)
        report["runs"].append({"dtype": dtype, "ours": ours["model_class"], "builtin": theirs["model_class"],
                               "identical_outputs": identical, "clips": clips})
        print(f"{dtype}: {identical}/{len(clips)} clips with identical greedy outputs; "
              f"classes {ours['model_class']} vs {theirs['model_class']}", flush=True)
    report["passed"] = ok
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
