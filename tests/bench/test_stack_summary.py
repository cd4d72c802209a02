"""stack_summary: py-spy raw stacks → self, inclusive and per-package shares."""

import json

import pytest

from mdlserve.benchmarks import stack_summary

RAW = """\
main (server/cli.py:10);loads_bounded (/venv/lib/python3.11/site-packages/mdlserve/server/jsonbody.py:30) 6
main (server/cli.py:10);raw_decode (/usr/lib/python3.11/json/decoder.py:353) 3
main (server/cli.py:10);step (/venv/lib/python3.11/site-packages/vllm/v1/engine/detokenizer.py:99) 1
not a stack line
"""


def test_shares_by_leaf_function_package_and_stack():
    summary = stack_summary.summarize(stack_summary.parse(RAW))
    assert summary["samples"] == 10
    assert [(r["name"], r["samples"]) for r in summary["self"]] == [
        ("loads_bounded (mdlserve/server/jsonbody.py)", 6),
        ("raw_decode (python3.11/json/decoder.py)", 3),
        ("step (v1/engine/detokenizer.py)", 1),
    ]
    assert {r["name"]: r["share"] for r in summary["packages"]} == {
        "mdlserve": pytest.approx(0.6),
        "json": pytest.approx(0.3),
        "vllm": pytest.approx(0.1),
    }
    # every sample has main() on its stack: inclusive counts it once per sample
    assert summary["inclusive"][0] == {"name": "main (server/cli.py)", "samples": 10, "share": 1.0}


def test_cli_writes_json(tmp_path, capsys):
    stacks, out = tmp_path / "stacks.txt", tmp_path / "summary.json"
    stacks.write_text(RAW)
    stack_summary.main([str(stacks), "--out", str(out), "--top", "1"])
    written = json.loads(out.read_text())
    assert len(written["self"]) == 1 and written["self"][0]["samples"] == 6
    assert capsys.readouterr().out.startswith("10 samples")
