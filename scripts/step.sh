#!/usr/bin/env bash
# One step of `make setup|test|run|lint|stress`, reported as one line with the time it took.
#
#   scripts/step.sh NAME COMMAND...       run COMMAND, print "NAME  12.3 s" (or FAILED, with
#                                         its exit status, which is also ours)
#   STEP_LOG=FILE scripts/step.sh ...     the same with COMMAND's output appended to FILE
#                                         instead of shown; its last lines are shown on failure
#
# Sourced (as scripts/setup.sh does), it defines the `step` function with the same behaviour.

step() {
    local name=$1 start=$EPOCHREALTIME rc=0
    shift
    if [ -n "${STEP_LOG:-}" ]; then
        echo "### $name: $*" >> "$STEP_LOG"
        "$@" >> "$STEP_LOG" 2>&1 || rc=$?
    else
        "$@" || rc=$?
    fi
    local took
    took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 0 ]; then
        printf '%-48s %7s s\n' "$name" "$took"
    else
        printf '%-48s FAILED (exit %d) after %s s\n' "$name" "$rc" "$took" >&2
        if [ -n "${STEP_LOG:-}" ]; then
            echo "--- the end of $STEP_LOG:" >&2
            tail -n 40 "$STEP_LOG" >&2
        fi
    fi
    return "$rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -uo pipefail
    step "$@"
fi
