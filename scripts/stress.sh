#!/usr/bin/env bash
# `make stress`: the test suite as `make test` runs it (two pytest-xdist workers, or
# TEST_WORKERS of them; or the pytest arguments given)
# three times in a row while two busy loops keep two CPUs occupied, the check that no test
# depends on the machine's speed. Uses `stress-ng --cpu 2` when it is installed, two shell
# busy loops otherwise. Prints one line per run with its time; exits non-zero if any run
# failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/step.sh

RUNS="${STRESS_RUNS:-3}"
loads=()
stop_loads() {
    for pid in "${loads[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait "${loads[@]}" 2>/dev/null
}
trap stop_loads EXIT

if command -v stress-ng > /dev/null; then
    stress-ng --cpu 2 --quiet &
    loads+=($!)
    echo "stress: stress-ng --cpu 2 (pid ${loads[*]})"
else
    for _ in 1 2; do
        bash -c 'while :; do :; done' &
        loads+=($!)
    done
    echo "stress: two busy loops (pids ${loads[*]})"
fi

failed=0
for run in $(seq 1 "$RUNS"); do
    step "stress: run $run/$RUNS" .venv/bin/python -m pytest -q -ra -p no:cacheprovider -m "not slow" \
        -n "${TEST_WORKERS:-2}" "$@" \
        || failed=$((failed + 1))
done
echo "stress: $failed of $RUNS runs failed"
[ "$failed" -eq 0 ]
