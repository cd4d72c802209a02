#!/usr/bin/env bash
# Headline comparison on one GPU: our plugin vs vLLM's built-in MiDashengLM, 7B shapes
# with random weights (--dummy), bf16. Each implementation's engine starts once and runs
# every TTFT point and batch size. Run from anywhere, after vLLM is importable:
#
#   export PYTHONPATH=/root/gpu-site
#   bash benchmarks/gpu_compare.sh "$OUT/compare"
#
# Environment (all optional):
#   BENCH_BATCHES        throughput batch sizes              (1,8,32,128,256,512)
#   BENCH_TTFT_CLIPS     TTFT audio lengths, START:STOP:STEP (2:32:2)
#   BENCH_TTFT_REPEATS   TTFT measurements per length        (10)
#   BENCH_TIME_BUDGET_S  cap on the comparison itself; no new point starts after it,
#                        split evenly between the two engines (420; the script ends
#                        within about budget + 90 s)
#   BENCH_CHECKPOINT     where the generated 7b checkpoint goes (/tmp/mdl-bench-7b)
#   BENCH_EXTRA_ARGS     more `compare` flags, e.g. "--engine-arg max_num_batched_tokens=16384"
#   PYTHON               interpreter (python3)
set -euo pipefail

RESULTS=${1:?usage: bash benchmarks/gpu_compare.sh RESULTS_DIR}
BATCHES=${BENCH_BATCHES:-1,8,32,128,256,512}
TTFT_CLIPS=${BENCH_TTFT_CLIPS:-2:32:2}
TTFT_REPEATS=${BENCH_TTFT_REPEATS:-10}
BUDGET=${BENCH_TIME_BUDGET_S:-420}
CHECKPOINT=${BENCH_CHECKPOINT:-/tmp/mdl-bench-7b}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
cd "$(dirname "$0")/.."

if ! "$PY" -c "import mdlserve.benchmarks" 2>/dev/null; then
    echo "installing midashenglm-serve (editable, no dependencies)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
# Fail early if vLLM is not importable; write the 7b checkpoint (config + tokenizer) once.
"$PY" - "$CHECKPOINT" <<'EOF'
import pathlib, sys
import torch, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}", flush=True)
if not (pathlib.Path(sys.argv[1]) / "config.json").exists():
    from mdlserve.model_plugin.checkpoints import make_checkpoint
    print(f"writing the 7b checkpoint to {make_checkpoint('7b', sys.argv[1])}", flush=True)
EOF

# shellcheck disable=SC2086  # BENCH_EXTRA_ARGS is a list of flags
"$PY" -m mdlserve.benchmarks compare --model "$CHECKPOINT" --dummy --dtype bfloat16 \
    --batches "$BATCHES" --ttft-clips "$TTFT_CLIPS" --ttft-repeats "$TTFT_REPEATS" \
    --time-budget-s "$BUDGET" --out "$RESULTS" ${BENCH_EXTRA_ARGS:-}
