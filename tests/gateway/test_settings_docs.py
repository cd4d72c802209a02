"""docs/gateway.md's configuration table is the settings model's: same flags, same
plain-number defaults. Fails when a field is added, renamed or re-defaulted without the docs."""

import re
from pathlib import Path

from mdlserve.server.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def documented_rows() -> dict[str, str]:
    """flag -> its Default cell, from the table under '## Configuration'."""
    section = DOC.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`--"):
            for flag in re.findall(r"`(--[a-z0-9-]+)`", cells[0]):
                rows[flag] = cells[1]
    return rows


def cli_fields() -> dict[str, object]:
    return {
        "--" + name.replace("_", "-"): field.default
        for name, field in Settings.model_fields.items()
        if (field.json_schema_extra or {}).get("cli") is not False
    }


def test_every_settings_field_is_documented_and_nothing_else():
    documented, fields = set(documented_rows()), set(cli_fields())
    assert fields - documented == set(), "settings fields missing from docs/gateway.md"
    assert documented - fields == set(), "docs/gateway.md documents flags that do not exist"


def test_documented_plain_number_defaults_match():
    fields = cli_fields()
    checked = 0
    for flag, default in documented_rows().items():
        match = re.fullmatch(r"([0-9.]+)( s)?", default)
        if match and "," not in default:
            assert float(match.group(1)) == float(fields[flag]), f"{flag}: docs say {default}, settings {fields[flag]}"
            checked += 1
    assert checked >= 6  # max-model-len, max-num-seqs, gpu-memory-utilization, max-queue, timeouts, parts
