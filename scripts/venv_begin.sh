# Sourced by scripts/setup.sh and scripts/setup-vllm-latest.sh: the start both share.
# Before sourcing, set VENV and INPUTS (the files whose content decides whether the
# environment is up to date). When $VENV's stamp matches them, the caller exits here;
# otherwise the log is started and PY, STAMP, `want`, `step` (scripts/step.sh, output to the
# log) and `pip` are defined for the caller's steps, which end with: echo "$want" > "$STAMP".
PY="$VENV/bin/python"
STAMP="$VENV/.mdl-setup-stamp"
LOG="$VENV/setup.log"
want="$(cat "${INPUTS[@]}" | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

mkdir -p "$VENV"
: > "$LOG"

source scripts/step.sh
export STEP_LOG="$LOG"
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
