#!/usr/bin/env bash
# The issue-13 measurements on one lent H200, in phases that each fit one device call
# (10 minutes). Run on the device after staging vLLM (../shared/gpu/README.md):
#
#   export PYTHONPATH=/root/gpu-site
#   bash benchmarks/h200_session.sh offline "$OUT"   # plugin vs built-in: TTFT 30 s, 512 x2, profiles
#   bash benchmarks/h200_session.sh levers  "$OUT"   # plugin: FP8 (profiled), larger token budget
#   bash benchmarks/h200_session.sh http    "$OUT"   # gateway at c=1 and c=512, stream and not
#   bash benchmarks/h200_session.sh final   "$OUT"   # batch job vs bench; gateway c=512 under py-spy
#   bash benchmarks/h200_session.sh apitier "$OUT"   # offline 512 beside the gateway with 4 API processes
#   bash benchmarks/h200_session.sh gateway "$OUT"   # the same gateway load (API_PROCESSES=1: one process)
#   bash benchmarks/h200_session.sh dp      "$OUT"   # two GPUs (data parallel) at 2 x 512 vs one GPU at 512
#   bash benchmarks/h200_session.sh engine  "$OUT"   # plugin: TTFT 30 s and 512 x2, both profiled
#   CUDAGRAPH_MODE=FULL bash benchmarks/h200_session.sh engine "$OUT"   # the same with full CUDA graphs
#   bash benchmarks/h200_session.sh pyc     "$OUT"   # bytecode for the staged packages, as the image has
#   bash benchmarks/h200_session.sh start   "$OUT"   # the gateway's start alone (ready-$LABEL.txt)
#
# Knobs (environment): BATCHED_TOKENS (tokens per engine step: the offline phases' engine,
# and the gateway's --max-num-batched-tokens; unset, the gateway uses its own default),
# BATCHES (the offline batch sizes, default 512,512; with a largest batch under 16, give
# BATCHED_TOKENS <= that batch x 1024, or the bench refuses: vLLM's engine fails so),
# PROFILE=0 (engine phase without the profiled batch), RESTART=1 (gateway phase: stop and
# start the server once more at the end, the warm start), API_PROCESSES, N_REQ (requests per
# c=512 level, default 8192), BUDGET,
# STARTUP_SPY, TAG (engine phase: a suffix for its run's folder, so that two runs of one
# setting in a lease keep both),
# SAMPLE_FORMATS (offline phases: `--sample-formats`; float32,pcm16 runs every point with
# float clips and with 16-bit PCM ones in turn; default float32), C1=1 (gateway phase:
# streaming TTFT at c=1 first), ENGINE_ARGS (engine phase: more vllm.LLM arguments,
# KEY=VALUE;KEY=VALUE), LABEL (start phase: the name of its ready file), SERVE_ARGS (gateway
# and start phases: more `mdl-serve serve` flags, e.g. "--cudagraph-mode FULL"), MODES
# (gateway phases: the order of the c=512 levels, default nostream,stream; MODES= runs
# none of them), ANCHOR (gateway phase: after those levels,
# `python -m mdlserve.benchmarks.anchors` at these levels, e.g. 16,64; ANCHOR_REQUESTS per
# run, default 256, ANCHOR_ROUNDS, default 2, ANCHOR_TOOLS, default vllm,locust).
#
# Every phase writes one archive $OUT/<phase>.tgz (summaries, logs, kernel tables; traces
# stay behind) and a log $OUT/<phase>.log. The same 7B checkpoint and engine shape
# (max_model_len 1024, 512 sequences, 16384 batched tokens) serve all phases, so the
# compile cache of the first phase makes later engine starts warm.
# SMOKE=1 runs every phase at CPU size with the tiny checkpoint (tests/bench/test_h200_session.py
# runs the engine and gateway phases so).
set -uo pipefail

PHASE=${1:?usage: h200_session.sh offline|levers|http OUT}
OUT=$(mkdir -p "${2:?OUT}" && cd "$2" && pwd)
PY=${PYTHON:-python3}
# Staged tools (py-spy from .gpu-stage-extra.txt) live in the staged site's bin folder.
[ -n "${PYTHONPATH:-}" ] && export PATH="${PYTHONPATH%%:*}/bin:$PATH"
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/mdl-h200}
mkdir -p "$WORK/$PHASE"
exec > >(tee -a "$OUT/$PHASE.log") 2>&1
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import mdlserve.benchmarks" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
fi

if [ "${SMOKE:-0}" = 1 ]; then
    CK=${CHECKPOINT:-$WORK/tiny}
    [ -f "$CK/config.json" ] || "$PY" -m mdlserve.server.cli make-checkpoint --preset tiny --out "$CK"
    SIZE=(--smoke --batches 2,2 --sample-formats "${SAMPLE_FORMATS:-float32}")
    TTFT=(--ttft-clips 2 --ttft-repeats 1)
    BIG=2; PROCS=2; N_REQ=8; CLIP=4; TOKENS=8; API=2; ANCHOR_N=4
    SERVE_ENGINE=(--max-model-len 1024 --max-num-seqs 4 --enforce-eager)
    export TORCHDYNAMO_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
else
    CK=${CHECKPOINT:-/tmp/mdl-bench-7b}
    [ -f "$CK/config.json" ] || "$PY" -m mdlserve.server.cli make-checkpoint --preset 7b --out "$CK"
    SIZE=(--model "$CK" --dummy --dtype bfloat16 --max-model-len 1024
          --max-num-batched-tokens "${BATCHED_TOKENS:-16384}" --batches "${BATCHES:-512,512}"
          --sample-formats "${SAMPLE_FORMATS:-float32}")
    TTFT=(--ttft-clips 30 --ttft-repeats 10)
    # 8192 requests at c=512: sixteen waves of 512. With four, how the first waves settled
    # decided the result (non-streaming 0.85-0.93 of offline against 0.958 over sixteen,
    # benchmarks/results/2026-12-02-h200-modes).
    BIG=512; PROCS=4; N_REQ=${N_REQ:-8192}; CLIP=30; TOKENS=100; API=${API_PROCESSES:-4}; ANCHOR_N=256
    SERVE_ENGINE=(--load-format dummy --dtype bfloat16 --max-model-len 1024 --max-num-seqs 512 --max-queue 4096
                  ${BATCHED_TOKENS:+--max-num-batched-tokens $BATCHED_TOKENS})
fi
# SERVE_ARGS: more `mdl-serve serve` flags for the gateway and start phases (space-separated).
read -ra SERVE_EXTRA <<< "${SERVE_ARGS:-}"
bench() { "$PY" -m mdlserve.benchmarks "$@"; }
# Every trace of a profile folder, summarised next to it (the traces themselves stay behind).
summarise_traces() {
    find "$1" -name '*.pt.trace.json*' | while read -r trace; do
        echo "== $trace"
        "$PY" -m mdlserve.benchmarks.trace_summary "$trace" --out "${trace%%.pt.trace.json*}.summary.json"
    done
}
pack() {
    tar -C "$WORK" -czf "$OUT/$PHASE.tgz" --exclude='*.pt.trace.json*' "$PHASE"
    ls -la "$OUT"
}

# The gateway on $URL in the background with the extra serve flags given ($server: its
# pid; log in $WORK/$PHASE/server-$LABEL.log); returns once it is ready and records how
# long that took, with vLLM's own start-up timings (load, compile, graphs) beside it.
URL=http://127.0.0.1:${PORT:-8000}
start_server() {
    local started log=$WORK/$PHASE/server-${LABEL:-main}.log
    started=$(date +%s.%N)
    "$PY" -m mdlserve.server.cli serve --model "$CK" "${SERVE_ENGINE[@]}" --port "${PORT:-8000}" "$@" > "$log" 2>&1 &
    server=$!
    # STARTUP_SPY=1: where the start-up's time goes, every process sampled by py-spy.
    if [ "${STARTUP_SPY:-0}" = 1 ]; then
        py-spy record --subprocesses --nonblocking -r 50 -f raw -o "$WORK/$PHASE/startup-stacks.txt" -p $server \
            -d "${STARTUP_SPY_S:-90}" > /dev/null 2>&1 &
        spy=$!
    fi
    # One poller every 0.1 s: a fresh interpreter per check plus a 1 s sleep put up to 1.3 s
    # of polling into the start-up time.
    "$PY" - "$URL/health/ready" $server "$started" <<'POLL' | tee "$WORK/$PHASE/ready-${LABEL:-main}.txt"
import os, sys, time
import httpx
url, pid, started = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    try:
        if httpx.get(url, timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print("server exited")
        sys.exit(4)
    time.sleep(0.1)
print(f"server ready after {time.time() - started:.1f} s")
POLL
    [ "${PIPESTATUS[0]}" = 0 ] || { tail -50 "$log"; pack; exit 4; }
    if [ "${STARTUP_SPY:-0}" = 1 ]; then
        kill -INT $spy 2>/dev/null; wait $spy
        "$PY" -m mdlserve.benchmarks.stack_summary "$WORK/$PHASE/startup-stacks.txt" \
            --out "$WORK/$PHASE/startup-summary.json" > "$WORK/$PHASE/startup-summary.txt" 2>&1
        gzip -9 "$WORK/$PHASE/startup-stacks.txt"
    fi
    grep -E "took|takes|finished in|engine up|Directly load|Compiling a graph" "$log" | grep -v access | cut -c1-300 | tail -20 >> "$WORK/$PHASE/ready-${LABEL:-main}.txt"
}
# Two unmeasured waves at the full concurrency (bench serve takes no fewer than two requests
# per user), as the offline bench warms up with its largest batch before it measures: every
# API process has served requests, and the engine has run steps of the sizes the measured
# levels bring, before the first of them.
warm_up() {
    serve_at $BIG $PROCS "warmup-${LABEL:-main}" --num-requests $((2 * BIG)) --no-stream > /dev/null ||
        { echo "warm-up failed"; stop_server; pack; exit 4; }
}
stop_server() {
    kill $server; wait $server
    echo "server exit code $?"
}
# `bench serve` at c=$1 with $2 load processes against the running server.
serve_at() {
    local concurrency=$1 processes=$2 name=$3
    shift 3
    bench serve --url "$URL" --clip-s $CLIP --out-tokens $TOKENS --server-pid $server --concurrency "$concurrency" \
        --processes "$processes" --num-requests $((N_REQ * concurrency / BIG)) --metrics-interval-s 2 \
        --out "$WORK/$PHASE/$name" "$@"
}
# Both modes at c=$1 with $2 load processes, in the order of MODES (default nostream,stream;
# stream,nostream swaps them); run names end in -$3 if given.
both_modes() {
    local mode
    for mode in ${MODES//,/ }; do
        case $mode in
        nostream) serve_at "$1" "$2" "c$1-nostream${3:+-$3}" --no-stream ;;
        stream) serve_at "$1" "$2" "c$1-stream${3:+-$3}" ;;
        *) echo "unknown mode $mode in MODES"; exit 2 ;;
        esac
        pack
    done
}
MODES=${MODES-nostream,stream}
# `python -m mdlserve.benchmarks.anchors` at the levels $1 against the running server.
anchors() {
    local levels=$1
    shift
    "$PY" -m mdlserve.benchmarks.anchors --url "$URL" --tokenizer "$CK" --concurrency "$levels" --clip-s $CLIP \
        --out-tokens $TOKENS --rounds "${ANCHOR_ROUNDS:-2}" "$@"
}

case $PHASE in
offline)
    bench compare "${SIZE[@]}" "${TTFT[@]}" --profile-dir "$WORK/offline/profile" --out "$WORK/offline/compare" \
        --time-budget-s "${BUDGET:-420}"
    summarise_traces "$WORK/offline/profile"
    pack ;;
levers)
    bench throughput --impl plugin "${SIZE[@]}" --quantization fp8 --profile-dir "$WORK/levers/profile-fp8" \
        --out "$WORK/levers/fp8" --time-budget-s "${BUDGET:-240}"
    summarise_traces "$WORK/levers/profile-fp8"
    pack
    bench throughput --impl plugin "${SIZE[@]}" --engine-arg max_num_batched_tokens=32768 \
        --out "$WORK/levers/tokens32k" --time-budget-s "${BUDGET:-240}"
    pack ;;
http)
    start_server
    warm_up
    serve_at 1 1 c1-stream --num-requests 20
    both_modes $BIG $PROCS
    stop_server
    pack ;;
final)
    # The batch job beside `bench throughput` at the same batch (issue 12), same engine shape.
    "$PY" -m mdlserve.benchmarks.batch_gpu --out "$WORK/final/batch" --model "$CK" --clips $BIG --clip-s $CLIP \
        --out-tokens $TOKENS --batch-arg=--max-num-batched-tokens --batch-arg=16384 ${BATCH_ARGS:-}
    rm -rf "$WORK"/final/batch/clips-* "$WORK"/final/batch/ckpt-7b
    pack
    # The gateway at c=BIG, non-streaming, with py-spy recording which code holds the GIL.
    start_server
    bench serve --url "$URL" --concurrency 8 --num-requests 16 --clip-s $CLIP --out-tokens 8 \
        --no-stream --out "$WORK/final/warmup" > /dev/null
    py-spy record --gil --nonblocking -r 100 -f raw -o "$WORK/final/gil-stacks.txt" -p $server -d ${PYSPY_S:-40} &
    spy=$!
    bench serve --url "$URL" --concurrency $BIG --processes $PROCS --num-requests $N_REQ \
        --clip-s $CLIP --out-tokens $TOKENS --no-stream --server-pid $server --metrics-interval-s 2 \
        --out "$WORK/final/c$BIG-nostream"
    wait $spy
    "$PY" -m mdlserve.benchmarks.stack_summary "$WORK/final/gil-stacks.txt" --out "$WORK/final/gil-summary.json" | head -80
    gzip -9 "$WORK/final/gil-stacks.txt"
    stop_server
    pack ;;
apitier)
    # Offline at 512 (the engine's ceiling, compiling the shared cache) beside the gateway
    # with $API API processes on the same GPU: non-streaming and streaming at c=512, and
    # streaming TTFT at c=1.
    export CUDA_VISIBLE_DEVICES=${GPU:-0}
    bench throughput --impl plugin "${SIZE[@]}" --out "$WORK/apitier/offline" --time-budget-s "${BUDGET:-240}"
    pack
    LABEL=api$API start_server --api-processes $API
    LABEL=api$API warm_up
    serve_at 1 1 c1-stream-api$API --num-requests 20
    both_modes $BIG $PROCS api$API
    stop_server
    pack ;;
gateway)
    # The same gateway load with $API API processes (API_PROCESSES=1: the single-process
    # gateway, the before row of the same lease).
    export CUDA_VISIBLE_DEVICES=${GPU:-0}
    LABEL=api$API start_server --api-processes $API "${SERVE_EXTRA[@]}"
    LABEL=api$API warm_up
    # C1=1: first the streaming TTFT of lone requests (c=1), as the http phase measures it;
    # with ANCHOR set, also vLLM's `vllm bench serve` beside ours at c=1 (a second client's
    # TTFT; both use aiohttp since 2026-12-03, ours used httpx before).
    if [ "${C1:-0}" = 1 ]; then
        serve_at 1 1 c1-stream-api$API --num-requests 20
        [ -n "${ANCHOR:-}" ] && anchors 1 --num-requests 20 --tools vllm --out "$WORK/$PHASE/anchor-c1-api$API"
    fi
    both_modes $BIG $PROCS api$API
    # ANCHOR=16,64: then our load generator beside vLLM's `vllm bench serve` and locust at those levels.
    if [ -n "${ANCHOR:-}" ]; then
        anchors "$ANCHOR" --tools "${ANCHOR_TOOLS:-vllm,locust}" --num-requests "${ANCHOR_REQUESTS:-$ANCHOR_N}" \
            --out "$WORK/$PHASE/anchor-api$API"
        pack
    fi
    stop_server
    pack
    if [ "${RESTART:-0}" = 1 ]; then
        LABEL=api$API-restart start_server --api-processes $API "${SERVE_EXTRA[@]}"
        stop_server
        pack
    fi ;;
start)
    # The gateway's start alone (warm when an earlier phase compiled the same engine shape).
    export CUDA_VISIBLE_DEVICES=${GPU:-0}
    LABEL=${LABEL:-api$API} start_server --api-processes $API "${SERVE_EXTRA[@]}"
    stop_server
    pack ;;
dp)
    # Two GPUs, one engine replica each, 2 x $API API processes, at 2 x 512 in flight; then
    # one GPU with $API API processes at 512 in the same call (issue 16's ratio).
    export CUDA_VISIBLE_DEVICES=${GPUS:-0,1}
    LABEL=dp2 start_server --data-parallel-size 2 --api-processes $((2 * API))
    LABEL=dp2 BIG=$((2 * BIG)) PROCS=$((2 * PROCS)) warm_up
    both_modes $((2 * BIG)) $((2 * PROCS)) dp2
    stop_server
    pack
    export CUDA_VISIBLE_DEVICES=${GPU:-0}
    LABEL=dp1 start_server --api-processes $API
    LABEL=dp1 warm_up
    both_modes $BIG $PROCS dp1
    stop_server
    pack ;;
engine)
    # Our plugin alone: TTFT of a 30 s clip and 512 clips twice, then both profiled (the
    # summaries place and attribute every GPU idle gap). CUDAGRAPH_MODE sets vLLM's
    # cudagraph_mode (default FULL_AND_PIECEWISE; FULL also graphs mixed prefill steps).
    MODE=${CUDAGRAPH_MODE:-default}
    LEVER=()
    [ "$MODE" = default ] || LEVER=(--engine-arg "compilation_config={\"cudagraph_mode\": \"$MODE\"}")
    # ENGINE_ARGS: more vllm.LLM arguments, KEY=VALUE;KEY=VALUE (VALUE as in --engine-arg).
    IFS=';' read -ra EXTRA <<< "${ENGINE_ARGS:-}"
    for arg in "${EXTRA[@]}"; do LEVER+=(--engine-arg "$arg"); done
    RUN=$MODE-${BATCHED_TOKENS:-16384}${TAG:+-$TAG}
    PROFILED=(--profile-dir "$WORK/engine/profile-$RUN")
    [ "${PROFILE:-1}" = 1 ] || PROFILED=()
    bench throughput --impl plugin "${SIZE[@]}" "${TTFT[@]}" "${LEVER[@]}" "${PROFILED[@]}" \
        --out "$WORK/engine/$RUN" --time-budget-s "${BUDGET:-240}"
    [ "${PROFILE:-1}" = 1 ] && summarise_traces "$WORK/engine/profile-$RUN"
    pack ;;
pyc)
    # The image's `pip install` writes the bytecode of every package it installs; the staged
    # site on the lent GPU has none, and every process there compiled the sources of vLLM,
    # transformers and the rest at each start (half of the start-up's samples in
    # benchmarks/results/2026-12-01-h200-levers). Compile it once, as the image build does.
    # A folder Python may not write to needs PYTHONPYCACHEPREFIX, set for every later call.
    dirs=$("$PY" -c 'import sys, os; print(" ".join(p for p in sys.path if os.path.isdir(p) and ("packages" in p or p.endswith("gpu-site"))))')
    echo "bytecode for: $dirs"
    /usr/bin/time -f "compileall took %e s" "$PY" -m compileall -q -j 0 $dirs > "$WORK/pyc/compileall.log" 2>&1
    tail -3 "$WORK/pyc/compileall.log"
    pack ;;
*)
    echo "unknown phase $PHASE"; exit 2 ;;
esac
