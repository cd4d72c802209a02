"""`mdl-serve batch merge`: checks that the shards' outputs hold every input row exactly
once, then concatenates them. Streams every file; holds two 64-bit hashes per row."""

import glob
import os
from pathlib import Path

from mdlserve.server.batch.ids import IdSet, id_hash
from mdlserve.server.batch.inputs import read_rows
from mdlserve.server.batch.outputs import json_line, output_format, output_rows

LISTED = 20


def expand(patterns: list[str]) -> list[Path]:
    """Paths as given; globs expanded (sorted), so `out/shard-*.jsonl` works unquoted or quoted."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if set("*?[") & set(pattern) else [pattern]
        files.extend(Path(m) for m in matches)
    return files


def merge(spec, output: Path, shard_outputs: list[str], model_name: str) -> dict:
    kind = spec.resolved_format()
    fmt = output_format(kind, model_name)
    files = expand(shard_outputs)
    missing_files = [str(f) for f in files if not f.is_file()]
    if missing_files or not files:
        return {"ok": False, "error": f"no such output file: {', '.join(missing_files) or shard_outputs}"}

    produced, duplicates, output_rows_total, error_rows = IdSet(), 0, 0, 0
    duplicate_ids: list[str] = []
    for path in files:
        for _, row in output_rows(path):
            output_rows_total += 1
            error_rows += fmt.is_error(row)
            row_id = str(fmt.row_id(row))
            if not produced.add(id_hash(row_id)):
                duplicates += 1
                if len(duplicate_ids) < LISTED:
                    duplicate_ids.append(row_id)

    expected, input_rows, input_duplicates, matched, missing = IdSet(), 0, 0, 0, 0
    missing_ids: list[str] = []
    for row in read_rows(spec):
        hashed = id_hash(row.id)
        if not expected.add(hashed):
            input_duplicates += 1
            continue
        input_rows += 1
        if hashed in produced:
            matched += 1
        else:
            missing += 1
            if len(missing_ids) < LISTED:
                missing_ids.append(row.id)

    unknown = len(produced) - matched
    unknown_ids = _unknown_ids(files, fmt, expected) if unknown else []
    ok = not (missing or duplicates or unknown)
    if ok:
        _concatenate(files, output)
    return {
        "ok": ok, "input": spec.input, "format": kind, "shard_outputs": [str(f) for f in files],
        "output": str(output) if ok else None, "input_rows": input_rows, "input_duplicates": input_duplicates,
        "output_rows": output_rows_total, "error_rows": error_rows, "missing": missing, "missing_ids": missing_ids,
        "duplicates": duplicates, "duplicate_ids": duplicate_ids, "unknown": unknown, "unknown_ids": unknown_ids,
    }  # fmt: skip


def _unknown_ids(files: list[Path], fmt, expected: IdSet) -> list[str]:
    found = []
    for path in files:
        for _, row in output_rows(path):
            row_id = str(fmt.row_id(row))
            if id_hash(row_id) not in expected:
                found.append(row_id)
                if len(found) >= LISTED:
                    return found
    return found


def _concatenate(files: list[Path], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for path in files:
            for _, row in output_rows(path):
                out.write(json_line(row) + "\n")
    os.replace(partial, output)
