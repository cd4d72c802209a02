"""The supported vLLM range is declared once per place it must appear, and the installed
vLLM takes the processing API this package expects of it (model_plugin/compat.py)."""

from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import vllm
from packaging.requirements import Requirement
from packaging.version import Version

from mdlserve.model_plugin import compat

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _extra(name: str) -> list[Requirement]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return [Requirement(r) for r in extras[name]]


def test_pyproject_vllm_extra_is_the_supported_range():
    (requirement,) = _extra("vllm")
    assert requirement.name == "vllm"
    assert str(requirement.specifier) == str(Requirement(f"vllm{compat.SUPPORTED_VLLM}").specifier)


def test_gpu_extra_pins_a_tested_release_inside_the_range():
    (requirement,) = _extra("gpu")
    (pinned,) = [s.version for s in requirement.specifier]
    assert pinned in compat.TESTED_VLLM
    assert Version(pinned) in Requirement(f"vllm{compat.SUPPORTED_VLLM}").specifier


def test_installed_vllm_is_supported_and_found_under_its_own_name():
    """The `vllm` distribution name resolves (on a CPU build: the alias the setup scripts
    write) and both it and the package's own version are inside the supported range."""
    supported = Requirement(f"vllm{compat.SUPPORTED_VLLM}").specifier
    assert Version(vllm.__version__) in supported
    assert Version(version("vllm")).public == vllm.__version__


@pytest.mark.skipif(vllm.__version__ not in compat.TESTED_VLLM, reason="only the tested releases are known")
def test_processing_api_branch_matches_the_release():
    expected = {"0.26.0": True, "0.32.0": False}[vllm.__version__]
    assert compat.PROCESSOR_TOKENIZES_PROMPT is expected
