"""Crash safety and scale-out with real processes: kill -9 in the middle of a run and a
rerun give every row exactly once; shards split the input deterministically and `batch
merge` proves the shards' outputs complete; usage errors exit 2; the manifest is streamed."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import FAST_FLAGS, batch_command, last_json_line, read_rows, run_cli

DEADLINE_S = 600


def good_clips(clips_dir) -> list[str]:
    return sorted(p.relative_to(clips_dir).as_posix() for p in clips_dir.rglob("clip*.*"))


def complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_every_row_exactly_once(tiny_checkpoint, clips_dir, tmp_path):
    clips = good_clips(clips_dir)
    lines = [json.dumps({"id": clip, "audio": str(clips_dir / clip)}) + "\n" for clip in clips]
    out = tmp_path / "out.jsonl"
    flags = ["--output", str(out), "--model", tiny_checkpoint, *FAST_FLAGS, "--max-tokens", "8",
             "--max-in-flight", "4", "--decode-workers", "2"]  # fmt: skip

    # First run reads the manifest from stdin and gets only 60 rows: it cannot finish, so
    # it is certainly still running (rows in flight, more expected) when it is killed.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(batch_command("-", "--format", "jsonl", *flags), stdin=subprocess.PIPE,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        first.stdin.write("".join(lines[:60]).encode())
        first.stdin.flush()
        deadline = time.monotonic() + DEADLINE_S
        while complete_lines(out) < 10:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run wrote fewer than 10 rows in time"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the job, its engine core and decode workers
        first.wait()
    assert first.returncode == -signal.SIGKILL
    done_in_first = complete_lines(out)
    assert 10 <= done_in_first <= 60
    kept = out.read_bytes()
    with open(out, "ab") as f:  # a row cut in the middle of its write
        f.write(b'{"id": "a/clip0')

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(lines))
    second = run_cli(str(manifest), *flags, "--progress", "log", "--log-interval", "0.5", timeout=DEADLINE_S)
    summary = last_json_line(second.stdout)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (summary["done_before"], summary["processed"], summary["ok"]) == \
        (done_in_first, len(clips) - done_in_first, len(clips) - done_in_first)
    assert "cut a torn last line" in second.stderr
    rows = read_rows(out)
    assert sorted(row["id"] for row in rows) == clips  # every row once: none lost, none twice
    assert out.read_bytes().startswith(kept)  # what the first run wrote is kept as it was
    todo = len(clips) - done_in_first
    assert re.search(rf"batch: {todo}/{todo} rows \(100\.0 %\), ETA 0 s, [\d.]+ clips/s, [\d.]+ audio-h/h",
                     second.stderr)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["sigterm", "sigint", "ctrl-c-in-a-terminal"])  # fmt: skip
def test_sigterm_or_ctrl_c_mid_run_stops_the_engine_keeps_the_rows_and_prints_the_summary(
    sig, to_group, tiny_checkpoint, clips_dir, tmp_path
):
    """SIGTERM killed the job and left its engine core and decode processes running (holding
    a GPU); Ctrl-C printed a KeyboardInterrupt traceback. Now both cancel the run: the engine
    and decode pool are shut down, the rows written are whole, the summary says so, the exit
    code is 128 + the signal, and a rerun resumes. A terminal's Ctrl-C goes to the whole
    process group, the engine core too, whose death was then reported as the engine
    stopping (exit 3)."""
    clips = good_clips(clips_dir)
    lines = [json.dumps({"id": clip, "audio": str(clips_dir / clip)}) + "\n" for clip in clips]
    out = tmp_path / "out.jsonl"
    flags = ["--format", "jsonl", "--output", str(out), "--model", tiny_checkpoint, *FAST_FLAGS, "--max-tokens", "8",
             "--max-in-flight", "2", "--decode-workers", "2", "--progress", "none"]  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(batch_command("-", *flags), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log, start_new_session=True)  # fmt: skip
        first.stdin.write("".join(lines[:20]).encode())  # 20 of 98 rows: it cannot finish
        first.stdin.flush()
        deadline = time.monotonic() + DEADLINE_S
        while complete_lines(out) < 3:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run wrote fewer than 3 rows in time"
            time.sleep(0.2)
        (os.killpg if to_group else os.kill)(first.pid, sig)  # the group, as a terminal does; or `kill PID`
        first.stdin.close()  # the input's end, as a pipeline's writer gives it
        stdout = first.stdout.read().decode()
        first.wait(timeout=DEADLINE_S)
    log_text = (tmp_path / "first.log").read_text()
    assert first.returncode == 128 + sig, log_text[-3000:]
    assert "Traceback" not in log_text
    summary = last_json_line(stdout)
    assert summary["stopped"] == f"interrupted by {sig.name}; rerun the same command to resume"
    assert summary["exit_code"] == 128 + sig and summary["ok"] == complete_lines(out) >= 3
    assert (summary["not_processed"], summary["rows_not_read"]) == (None, None)  # stdin: not counted ahead
    assert "(the rows not processed are not counted: the input is stdin)" in log_text
    while time.monotonic() < deadline:  # the engine core and decode workers end with the job
        try:
            os.killpg(first.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the job's group outlived it")
    assert all(row["error"] is None for row in read_rows(out))  # whole rows; none for the rows in flight

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(lines[:20]))
    second = run_cli(str(manifest), *flags, timeout=DEADLINE_S)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(row["id"] for row in read_rows(out)) == sorted(clips[:20])  # each once


def test_shards_split_the_input_and_merge_checks_every_row(runtime, clips_dir, tmp_path):
    folder = clips_dir / "a"
    shard_rows = []
    for index in range(3):
        summary, rows = runtime.run(str(folder), tmp_path / "out-{shard}.jsonl", shard=f"{index}/3")
        assert summary["shard"] == f"{index}/3" and summary["output"] == str(tmp_path / f"out-{index}.jsonl")
        assert summary["other_shards"] + summary["processed"] == 48
        shard_rows.append({row["id"] for row in rows})
    assert sum(len(ids) for ids in shard_rows) == 48
    assert set().union(*shard_rows) == {f"clip{i:03d}.wav" for i in range(48)}
    assert all(ids for ids in shard_rows)  # 48 ids over 3 shards: none is empty

    outputs = [str(tmp_path / f"out-{i}.jsonl") for i in range(3)]
    merged = tmp_path / "merged.jsonl"
    result = run_cli("merge", str(folder), str(tmp_path / "out-*.jsonl"), "--output", str(merged))
    report = last_json_line(result.stdout)
    assert result.returncode == 0 and report["ok"], report
    assert (report["input_rows"], report["output_rows"], report["missing"], report["duplicates"]) == (48, 48, 0, 0)
    assert sorted(row["id"] for row in read_rows(merged)) == sorted(set().union(*shard_rows))

    missing = run_cli("merge", str(folder), *outputs[:2], "--output", str(tmp_path / "m2.jsonl"))
    report = last_json_line(missing.stdout)
    assert missing.returncode == 1 and report["missing"] == len(shard_rows[2])
    assert set(report["missing_ids"]) <= shard_rows[2] and not (tmp_path / "m2.jsonl").exists()

    doubled = run_cli("merge", str(folder), *outputs, outputs[0], "--output", str(tmp_path / "m3.jsonl"))
    report = last_json_line(doubled.stdout)
    assert doubled.returncode == 1 and report["duplicates"] == len(shard_rows[0])

    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text(json.dumps({"id": "b/clip050.wav", "output": "x", "error": None}) + "\n")
    unknown = run_cli("merge", str(folder), *outputs, str(stranger), "--output", str(tmp_path / "m4.jsonl"))
    report = last_json_line(unknown.stdout)
    assert unknown.returncode == 1 and report["unknown_ids"] == ["b/clip050.wav"]


def test_shard_index_from_job_completion_index(clips_dir, tmp_path):
    result = run_cli(str(clips_dir / "a"), "--output", str(tmp_path / "s-{shard}.jsonl"), "--shard", "auto/3",
                     "--summary", str(tmp_path / "summary-{shard}.json"), "--dry-run",
                     env={"JOB_COMPLETION_INDEX": "2"})  # fmt: skip
    summary = last_json_line(result.stdout)
    assert json.loads((tmp_path / "summary-2.json").read_text()) == summary
    assert not (tmp_path / "s-2.jsonl").exists()  # a dry run writes no output
    assert result.returncode == 0, result.stderr
    assert summary["shard"] == "2/3" and summary["output"] == str(tmp_path / "s-2.jsonl")
    assert summary["todo"] + summary["other_shards"] == 48 and 0 < summary["todo"] < 48


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/3"], "index must be below the count"),
    (["--shard", "auto/2"], "JOB_COMPLETION_INDEX"),
    (["--task", "poetry"], "unknown task 'poetry'"),
    (["--max-in-flight", "0"], "--max-in-flight: Input should be greater than or equal to 1"),
    (["--format", "files", "--input-is-a-file"], "unrecognized arguments"),
])  # fmt: skip
def test_usage_errors_exit_2_before_any_model_loads(clips_dir, tmp_path, args, message):
    env = {"JOB_COMPLETION_INDEX": ""}
    result = run_cli(str(clips_dir / "a"), "--output", str(tmp_path / "o.jsonl"), "--dry-run", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_input_or_output_that_cannot_be_used_exit_2(clips_dir, tmp_path):
    missing = run_cli(str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--dry-run")
    assert missing.returncode == 2 and "cannot read the input" in last_json_line(missing.stdout)["error"]
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("hello\n")
    clash = run_cli(str(clips_dir / "a"), "--output", str(foreign), "--dry-run")
    assert clash.returncode == 2 and "is not a JSON row" in last_json_line(clash.stdout)["error"]
    assert foreign.read_text() == "hello\n"


def test_an_output_that_is_not_a_batch_output_exits_2_before_anything_is_cut(clips_dir, tmp_path, capsys):
    """The torn-line repair ran before the output was checked: a text file without a final
    newline lost its last line, and a one-line one was emptied and then written into. A JSON
    line that is not an object raised AttributeError. Now every line is checked first; only a
    last line that can be the start of a row (`{`) is taken for a torn one."""
    cases = {"notes.txt": ("first line\nlast line", 1), "one-line.txt": ("hello", 1),
             "torn-text.jsonl": ('{"id": "a"}\nlast line', 2), "not-an-object.jsonl": ('{"id": "a"}\n5\n', 2),
             "torn-not-an-object.jsonl": ('{"id": "a"}\n[1]', 2)}  # fmt: skip
    for name, (text, line) in cases.items():
        output = tmp_path / name
        output.write_text(text)
        for dry_run in (False, True):
            code, summary, err = _run_batch(capsys, clips_dir / "a", output, dry_run=dry_run)
            expected = f"{output}:{line} is not a JSON row; is this the output of a batch job?"
            assert (code, summary["error"]) == (2, expected), name
            assert output.read_text() == text and "Traceback" not in err, name


def _run_batch(capsys, input, output, **options) -> tuple[int, dict, str]:
    """`run_batch` in this process (a usage error comes before any settings or engine)."""
    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import run_batch

    code = run_batch(BatchOptions(input=str(input), output=output, progress="none", **options), lambda: None)
    captured = capsys.readouterr()
    return code, last_json_line(captured.out), captured.err


def test_an_output_that_is_the_input_a_folder_or_under_a_file_exits_2_and_changes_nothing(clips_dir, tmp_path, capsys):
    """The input as --output would count its own rows as done (and lose its unterminated last
    line to the torn-line repair); as --summary it would be overwritten. A folder or a path
    under a file is named, not a traceback."""
    manifest = tmp_path / "m.jsonl"
    text = json.dumps({"id": "a", "audio": "a.wav"}) + "\n" + json.dumps({"id": "b", "audio": "b.wav"})
    manifest.write_text(text)
    for options in ({"output": manifest}, {"output": tmp_path / "o.jsonl", "summary": manifest},
                    {"output": manifest, "dry_run": True}):  # fmt: skip
        code, summary, err = _run_batch(capsys, manifest, **options)
        flag = "--summary" if "summary" in options else "--output"
        assert (code, summary["error"]) == (2, f"{flag} {manifest} is the input file; write to another file")
        assert manifest.read_text() == text and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()

    output = tmp_path / "o.jsonl"
    code, summary, _ = _run_batch(capsys, manifest, output, summary=output)
    assert (code, summary["error"]) == (2, f"--summary {output} is the --output file")
    code, summary, _ = _run_batch(capsys, manifest, output, summary=tmp_path)
    assert (code, summary["error"]) == (2, f"--summary {tmp_path} is a folder")

    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    code, summary, err = _run_batch(capsys, clips_dir / "a", folder)
    assert (code, summary["error"]) == (2, f"cannot write the output {folder}: Is a directory")
    code, summary, err = _run_batch(capsys, clips_dir / "a", folder, dry_run=True)
    assert (code, summary["error"]) == (2, f"cannot write the output {folder}: Is a directory")
    under_a_file = manifest / "o.jsonl"
    code, summary, err = _run_batch(capsys, clips_dir / "a", under_a_file)
    assert code == 2 and summary["error"].startswith(f"cannot write the output {under_a_file}: ")
    assert "Traceback" not in err


def _peak_rss_mb(args: list[str]) -> tuple[float, dict]:
    process = subprocess.Popen(batch_command(*args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0
    return usage.ru_maxrss / 1024, last_json_line(output.decode())


@pytest.mark.slow
def test_a_large_manifest_is_streamed_not_held(tmp_path):
    """200,000 rows (a 36 MB manifest) read with --dry-run (the reader, id checks and
    shard split of a real run, no model): peak memory grows by the id tables (a few MB),
    not by the manifest."""
    reference = "a reference transcript of about one hundred characters, as evaluation manifests carry ... "
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    with open(big, "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"id": f"utt-{i:07d}", "audio": f"/data/corpus/speaker-{i % 977:04d}/utt-{i:07d}.flac",
                                "text": reference}) + "\n")  # fmt: skip
    small.write_text("".join(big.open().readline() for _ in range(1)))
    assert big.stat().st_size > 35e6

    small_rss, _ = _peak_rss_mb([str(small), "--output", str(tmp_path / "o1.jsonl"), "--dry-run"])
    big_rss, summary = _peak_rss_mb([str(big), "--output", str(tmp_path / "o2.jsonl"), "--dry-run"])
    assert summary["todo"] == 200_000 and summary["duplicates"] == 0
    assert big_rss - small_rss < 20, (small_rss, big_rss)
