"""Every input kind through a real engine (tiny checkpoint, shared by the tests): folders
and globs, CSV and JSONL manifests (paths and URLs over HTTP), OpenAI Batch files and the
authors' evaluation rows; error rows; resume; --retry-errors."""

import base64
import csv
import json

import pytest

from .conftest import BAD_CLIPS, GOOD_CLIPS, MAX_AUDIO_SECONDS, clip_seconds, read_rows


def by_id(rows: list[dict], key: str = "id") -> dict[str, dict]:
    ids = [row[key] for row in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {row[key]: row for row in rows}


def test_folder_captions_every_clip_and_reports_bad_ones(runtime, clips_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    summary, rows = runtime.run(str(clips_dir), out)

    rows = by_id(rows)
    assert len(rows) == GOOD_CLIPS + len(BAD_CLIPS) == summary["processed"]
    assert "notes.txt" not in rows
    assert summary["ok"] == GOOD_CLIPS and summary["failed"] == len(BAD_CLIPS)
    assert summary["failures_by_code"] == {"invalid_audio": 3}
    assert summary["exit_code"] == 1
    assert summary["audio_hours"] == pytest.approx(sum(clip_seconds(i) for i in range(98)) / 3600, rel=1e-3)
    assert summary["clips_per_s"] > 0 and summary["audio_hours_per_s"] > 0
    for name, code in BAD_CLIPS.items():
        assert rows[name]["output"] is None and rows[name]["error"]["code"] == code
    assert f"longer than the limit of {MAX_AUDIO_SECONDS} s" in rows["too-long.wav"]["error"]["message"]
    assert "zero" in rows["empty.wav"]["error"]["message"] or "empty" in rows["empty.wav"]["error"]["message"]
    for i in range(98):
        row = rows[f"{'a' if i < 48 else 'b'}/clip{i:03d}.{'wav' if i < 96 else 'flac'}"]
        assert row["error"] is None and row["prompt"] == "Write an audio caption describing the sound"
        assert 1 <= row["completion_tokens"] <= 8 and row["finish_reason"] in ("length", "stop")
        assert row["audio_seconds"] == pytest.approx(clip_seconds(i), abs=1e-3)
        assert row["prompt_tokens"] > 10

    before = out.read_bytes()
    again, _ = runtime.run(str(clips_dir), out)
    assert (again["processed"], again["done_before"], again["exit_code"]) == (0, GOOD_CLIPS + 3, 0)
    assert out.read_bytes() == before


def test_retry_errors_runs_only_the_failed_rows_again(runtime, clips_dir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("a/clip000.wav", "a/clip001.wav"):
        (folder / name.split("/")[1]).write_bytes((clips_dir / name).read_bytes())
    (folder / "later.wav").write_bytes(b"not yet audio")
    out = tmp_path / "out.jsonl"
    first, rows = runtime.run(str(folder), out)
    assert (first["ok"], first["failed"]) == (2, 1)

    (folder / "later.wav").write_bytes((clips_dir / "a/clip002.wav").read_bytes())
    plain_rerun, _ = runtime.run(str(folder), out)
    assert plain_rerun["processed"] == 0
    retried, rows = runtime.run(str(folder), out, retry_errors=True)
    assert (retried["error_rows_retried"], retried["processed"], retried["ok"]) == (1, 1, 1)
    rows = by_id(rows)
    assert sorted(rows) == ["clip000.wav", "clip001.wav", "later.wav"]
    assert rows["later.wav"]["error"] is None and rows["later.wav"]["output"]


def test_glob_and_manifest_rows_get_the_same_answer_for_the_same_clip(runtime, clips_dir, tmp_path):
    """Greedy decoding: one clip, one prompt, one answer, whichever input kind and batch."""
    glob_summary, glob_rows = runtime.run(str(clips_dir / "a" / "clip00*.wav"), tmp_path / "glob.jsonl")
    assert glob_summary["format"] == "files" and glob_summary["ok"] == 10
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": row["audio"]}) + "\n" for row in reversed(glob_rows)))
    _, manifest_rows = runtime.run(str(manifest), tmp_path / "m-out.jsonl")
    by_audio = {row["audio"]: row["output"] for row in manifest_rows}
    assert {row["audio"]: row["output"] for row in glob_rows} == by_audio
    # Rows are written as they finish, so the order may differ; the ids are the line numbers.
    assert sorted(row["id"] for row in manifest_rows) == sorted(f"row-{n}" for n in range(1, 11))


def test_csv_manifest_tasks_prompts_sampling_urls_and_bad_rows(runtime, clips_dir, clip_server, tmp_path):
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "x.wav").write_bytes((clips_dir / "a/clip003.wav").read_bytes())
    rows = [
        {"id": "asr-zh", "audio": str(clips_dir / "a/clip000.wav"), "task": "asr", "lang": "zh", "reference": "你好"},
        {"id": "asked", "audio": str(clips_dir / "a/clip001.wav"), "prompt": "What is this?", "max_tokens": "3"},
        {"id": "by-url", "audio": f"{clip_server}/a/clip002.wav", "task": "genre"},
        {"id": "relative", "audio": "rel/x.wav", "temperature": "0.7", "seed": "5"},
        {"id": "missing", "audio": str(clips_dir / "nope.wav")},
        {"id": "url-404", "audio": f"{clip_server}/nope.wav"},
        {"id": "hot", "audio": str(clips_dir / "a/clip004.wav"), "temperature": "9"},
        {"id": "bad-task", "audio": str(clips_dir / "a/clip005.wav"), "task": "poetry"},
        {"id": "bad-lang", "audio": str(clips_dir / "a/clip006.wav"), "task": "asr", "lang": "xx"},
        {"id": "no-audio", "audio": ""},
        {"id": "question", "audio": str(clips_dir / "a/clip007.wav"), "task": "qa", "prompt": "What animal is it?"},
        {"id": "no-question", "audio": str(clips_dir / "a/clip008.wav"), "task": "qa"},
    ]
    manifest = tmp_path / "manifest.csv"
    columns = ["id", "audio", "task", "lang", "prompt", "max_tokens", "temperature", "seed", "reference"]
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)

    summary, out = runtime.run(str(manifest), tmp_path / "out.jsonl", max_tokens=None)
    out = by_id(out)
    assert summary["format"] == "csv" and (summary["ok"], summary["failed"]) == (5, 7)
    assert out["asr-zh"]["prompt"] == "Transcribe the speech into text <|zh|>"
    assert out["asr-zh"]["reference"] == "你好"  # other columns are copied through
    assert out["asked"]["prompt"] == "What is this?" and out["asked"]["completion_tokens"] <= 3
    assert out["by-url"]["prompt"] == "What's the music genre?" and out["by-url"]["error"] is None
    assert out["relative"]["error"] is None
    assert out["missing"]["error"]["code"] == "file_not_found"
    assert out["url-404"]["error"] == {"code": "invalid_audio_url",
                                       "message": "audio: fetching audio_url failed: HTTP 404"}
    assert out["hot"]["error"]["code"] == "invalid_row" and "temperature" in out["hot"]["error"]["message"]
    assert out["bad-task"]["error"]["code"] == "invalid_task" and "poetry" in out["bad-task"]["error"]["message"]
    assert out["bad-lang"]["error"]["code"] == "invalid_task" and "'xx'" in out["bad-lang"]["error"]["message"]
    assert out["question"]["prompt"] == "What animal is it? Answer with 1-2 sentences"
    assert out["no-question"]["error"]["code"] == "invalid_task"
    assert out["no-audio"]["error"]["code"] == "invalid_row"


def test_jsonl_manifest_bad_lines_and_duplicate_ids(runtime, clips_dir, tmp_path):
    clip = str(clips_dir / "a/clip010.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"id": "one", "audio": clip, "speaker": 7}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": "one", "audio": clip, "prompt": "a second row with the same id"}),
        json.dumps({"audio": clip}),
    ]) + "\n")  # fmt: skip
    summary, rows = runtime.run(str(manifest), tmp_path / "out.jsonl")
    rows = by_id(rows)
    assert sorted(rows) == ["line-2", "line-3", "one", "row-6"]
    assert rows["one"]["speaker"] == 7 and rows["one"]["error"] is None
    assert rows["line-2"]["error"]["code"] == "invalid_json"
    assert rows["line-3"]["error"]["code"] == "invalid_row"
    assert (summary["duplicates"], summary["duplicate_ids"], summary["exit_code"]) == (1, ["one"], 1)


def test_openai_batch_file_gives_openai_batch_output(runtime, clips_dir, tmp_path):
    from openai.types.audio import Transcription
    from openai.types.chat import ChatCompletion
    from vllm.entrypoints.openai.run_batch import BatchRequestOutput

    wav = (clips_dir / "a/clip020.wav").read_bytes()
    b64 = base64.b64encode(wav).decode()

    def chat(custom_id, content, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "midashenglm-7b", "max_tokens": 6, "temperature": 0,
                         "messages": [{"role": "user", "content": content}], **body}}  # fmt: skip

    audio_part = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    lines = [
        chat("inline", [audio_part, {"type": "text", "text": "Caption it."}]),
        chat("file-url", [{"type": "audio_url", "audio_url": {"url": f"file://{clips_dir}/a/clip021.wav"}},
                          {"type": "text", "text": "Caption it."}]),
        chat("two-samples", [audio_part, {"type": "text", "text": "Caption it."}], n=2, temperature=0.9, seed=1),
        chat("two-clips", [audio_part, audio_part, {"type": "text", "text": "Same sound twice?"}]),
        {"custom_id": "trsc", "method": "POST", "url": "/v1/audio/transcriptions",
         "body": {"model": "midashenglm-7b", "file_url": f"data:audio/wav;base64,{b64}", "max_completion_tokens": 5}},
        {"custom_id": "trsc-verbose", "method": "POST", "url": "/v1/audio/transcriptions",
         "body": {"model": "midashenglm-7b", "file_url": str(clips_dir / "a/clip022.wav"), "language": "zh",
                  "prompt": "Names: Xiaomi.", "response_format": "verbose_json", "max_completion_tokens": 5}},
        {"custom_id": "trsc-srt", "method": "POST", "url": "/v1/audio/transcriptions",
         "body": {"model": "midashenglm-7b", "file_url": str(clips_dir / "a/clip022.wav"), "response_format": "srt"}},
        chat("text-only", "no audio here"),
        chat("streamed", [audio_part], stream=True),
        chat("bad-base64", [{"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]),
        {"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}},
    ]  # fmt: skip
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, rows = runtime.run(str(batch_file), tmp_path / "out.jsonl", max_tokens=None)

    assert summary["format"] == "openai" and (summary["ok"], summary["failed"]) == (6, 6)
    rows = by_id(rows, "custom_id")
    for row in rows.values():
        BatchRequestOutput.model_validate(row)  # vLLM run-batch's own output model
        assert row["id"].startswith("batch_req_")
    for custom_id in ("inline", "file-url", "two-samples", "two-clips"):
        response = rows[custom_id]["response"]
        assert response["status_code"] == 200 and rows[custom_id]["error"] is None
        completion = ChatCompletion.model_validate(response["body"])
        assert completion.model == "midashenglm-7b" and completion.usage.completion_tokens >= 1
    assert len(rows["two-samples"]["response"]["body"]["choices"]) == 2
    two_clips = rows["two-clips"]["response"]["body"]["usage"]["prompt_tokens"]
    assert two_clips > rows["inline"]["response"]["body"]["usage"]["prompt_tokens"]
    assert Transcription.model_validate(rows["trsc"]["response"]["body"]).text
    verbose = rows["trsc-verbose"]["response"]["body"]
    assert verbose["duration"] == pytest.approx(clip_seconds(22), abs=1e-3) and verbose["task"] == "transcribe"
    assert verbose["language"] == "zh"
    # the system message with the context and the <|zh|> tag make the prompt longer
    assert verbose["usage"]["input_tokens"] > rows["trsc"]["response"]["body"]["usage"]["input_tokens"]
    expected_errors = {"text-only": "no audio part", "streamed": "streaming is not available",
                       "bad-base64": "not valid base64", "embeddings": "/v1/embeddings", "get": "must be POST",
                       "trsc-srt": "srt is not available in batch jobs"}
    for custom_id, words in expected_errors.items():
        row = rows[custom_id]
        assert row["response"] is None and words in row["error"]["message"], row


def test_rows_whose_response_format_cannot_be_followed_fail_as_bad_rows(runtime, clips_dir, tmp_path):
    """A schema refused before the engine, and one the engine cannot follow (a pattern no
    string matches: finish reason "error"), are the rows' errors, not internal ones."""
    b64 = base64.b64encode((clips_dir / "a/clip020.wav").read_bytes()).decode()

    def chat(custom_id, schema, **body):
        response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        audio = {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "midashenglm-7b", "max_tokens": 40, "temperature": 0,
                         "response_format": response_format, "messages": [{"role": "user", "content": [audio]}],
                         **body}}  # fmt: skip

    dead_end = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}
    lines = [chat("label", {"enum": ["dog", "cat"]}), chat("no-value", {"$ref": "#"}), chat("dead-end", dead_end)]
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, rows = runtime.run(str(batch_file), tmp_path / "out.jsonl", max_tokens=None)
    rows = by_id(rows, "custom_id")
    assert (summary["ok"], summary["failed"]) == (1, 2), rows
    assert rows["label"]["response"]["body"]["choices"][0]["message"]["content"] in ('"dog"', '"cat"')
    assert rows["no-value"]["error"]["code"] == "invalid_row"
    assert "admits no JSON value" in rows["no-value"]["error"]["message"]
    assert rows["dead-end"]["error"]["code"] == "response_format_unsatisfiable"


def test_dasheng_eval_rows_come_back_with_model_output(runtime, clips_dir, tmp_path):
    (tmp_path / "wavs").mkdir()
    for i in (30, 31):
        (tmp_path / "wavs" / f"{i}.wav").write_bytes((clips_dir / f"a/clip0{i}.wav").read_bytes())
    rows = [
        {"dataset_name": "LibriSpeech_test-clean", "audio": "30.wav", "lang": "en", "text": "HELLO WORLD",
         "prompt": "Transcribe the speech into text <|en|>", "model_output": "", "model_name": ""},
        {"dataset_name": "AudioCaps", "audio": "31.wav", "lang": "", "text": "a dog barks"},
        {"dataset_name": "AudioCaps", "audio": "missing.wav", "lang": "", "text": "rain"},
    ]  # fmt: skip
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, out = runtime.run(str(eval_file), tmp_path / "out.jsonl", format="dasheng-eval",
                               audio_root=str(tmp_path / "wavs"), model_name="MiDashengLM-7B-batch")
    assert (summary["ok"], summary["failed"]) == (2, 1)
    by_audio = {row["audio"]: row for row in out}
    asr, caption, missing = by_audio["30.wav"], by_audio["31.wav"], by_audio["missing.wav"]
    assert set(asr) == set(rows[0]) and {k: asr[k] for k in ("dataset_name", "audio", "lang", "text", "prompt")} \
        == {k: rows[0][k] for k in ("dataset_name", "audio", "lang", "text", "prompt")}
    assert asr["model_output"] and asr["model_name"] == "MiDashengLM-7B-batch"
    assert caption["prompt"] == "Write an audio caption describing the sound" and caption["model_output"]
    assert missing["model_output"] == "" and missing["error"]["code"] == "file_not_found"
    again, _ = runtime.run(str(eval_file), tmp_path / "out.jsonl", format="dasheng-eval",
                           audio_root=str(tmp_path / "wavs"))
    assert (again["done_before"], again["processed"]) == (3, 0)


class DyingEngine:
    """The real engine for `survive` requests, then gone (EngineDead), as when the engine
    core process dies: only this behaviour is fake, the rows before it are real answers."""

    def __init__(self, engine, survive: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.left = survive

    async def generate(self, prepared, request_id, arrival_time):
        from mdlserve.server.errors import EngineDead

        if self.left <= 0:
            raise EngineDead()
        self.left -= 1
        async for step in self.engine.generate(prepared, request_id, arrival_time):
            yield step


def test_engine_death_stops_the_job_with_exit_3_and_a_rerun_finishes_it(runtime, clips_dir, tmp_path):
    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import BatchJob

    out = tmp_path / "out.jsonl"
    options = BatchOptions(input=str(clips_dir / "a"), output=out, progress="none", max_in_flight=2, read_ahead=2,
                           max_tokens=8)  # fmt: skip
    job = BatchJob(options, runtime.settings())
    summary = runtime.loop.run_until_complete(job.execute(DyingEngine(runtime.engine, 5), runtime.decoder))
    assert summary["exit_code"] == 3 and "rerun" in summary["stopped"]
    assert (summary["ok"], summary["failed"]) == (5, 0)
    assert len(read_rows(out)) == 5  # no row for the requests the dead engine dropped
    assert summary["not_processed"] == 43 and summary["rows_not_read"] == 48 - summary["rows_read"] > 0

    again, rows = runtime.run(str(clips_dir / "a"), out)
    assert (again["done_before"], again["processed"], again["exit_code"]) == (5, 43, 0)
    assert sorted(row["id"] for row in rows) == [f"clip{i:03d}.wav" for i in range(48)]


@pytest.mark.parametrize("source", ["folder", "stdin"])
def test_an_interrupted_run_says_how_many_rows_it_did_not_process(source, runtime, clips_dir, tmp_path, monkeypatch):
    """The summary of a run stopped by Ctrl-C or SIGTERM counted only the rows read before the
    stop (rows_read, rows, todo): nothing said how many were never reached. Now not_processed
    is what a rerun has to do (the first pass counted the input) and rows_not_read the rows
    never read; both are null for stdin, which is not counted ahead. The run is cancelled as
    the signals cancel it (BatchJob._interrupt), after its
    third row."""
    import asyncio
    import io
    import signal
    import sys

    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import BatchJob

    clips = sorted((clips_dir / "a").glob("*.wav"))
    if source == "stdin":
        lines = "".join(json.dumps({"id": clip.name, "audio": str(clip)}) + "\n" for clip in clips)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    input = "-" if source == "stdin" else str(clips_dir / "a")
    out = tmp_path / "out.jsonl"
    options = BatchOptions(input=input, output=out, progress="none", max_in_flight=2, read_ahead=2, max_tokens=8)
    job = BatchJob(options, runtime.settings())
    run = runtime.loop.create_task(job.execute(runtime.engine, runtime.decoder))
    write = job.writer.write

    def write_then_interrupt(row):
        write(row)
        if len(read_rows(out)) == 3:
            run.cancel()

    job.writer.write = write_then_interrupt
    with pytest.raises(asyncio.CancelledError):
        runtime.loop.run_until_complete(run)
    summary = job.stop(signal.SIGTERM)
    written = len(read_rows(out))
    assert summary["stopped"] == "interrupted by SIGTERM; rerun the same command to resume"
    assert summary["exit_code"] == 143 and summary["processed"] == summary["ok"] == written >= 3
    assert summary["rows_read"] < len(clips)  # read ahead of the engine by a few rows at most
    if source == "stdin":
        assert (summary["not_processed"], summary["rows_not_read"]) == (None, None)
        return
    assert summary["not_processed"] == len(clips) - written
    assert summary["rows_not_read"] == len(clips) - summary["rows_read"] > 0

    again, rows = runtime.run(input, out)  # the rerun does what the summary said was left
    assert (again["processed"], again["not_processed"], again["rows_not_read"]) == (summary["not_processed"], 0, 0)
    assert sorted(row["id"] for row in rows) == [clip.name for clip in clips]


class AbortingOnceEngine(DyingEngine):
    """The real engine, except that its first request is ended by the engine itself
    (VllmEngine's EngineAborted, as for a request a dying data-parallel replica held)."""

    async def generate(self, prepared, request_id, arrival_time):
        from mdlserve.server.errors import EngineAborted

        if self.left > 0:
            self.left -= 1
            raise EngineAborted()
        async for step in self.engine.generate(prepared, request_id, arrival_time):
            yield step


def test_an_engine_aborted_request_is_an_error_row_that_retry_errors_answers(runtime, clips_dir, tmp_path):
    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import BatchJob

    out = tmp_path / "out.jsonl"
    options = BatchOptions(input=str(clips_dir / "a"), output=out, progress="none", max_in_flight=2, read_ahead=2,
                           max_tokens=8)  # fmt: skip
    job = BatchJob(options, runtime.settings())
    summary = runtime.loop.run_until_complete(job.execute(AbortingOnceEngine(runtime.engine, 1), runtime.decoder))
    assert (summary["ok"], summary["failed"], summary["exit_code"]) == (47, 1, 1)
    assert summary["failures_by_code"] == {"engine_aborted": 1}
    again, rows = runtime.run(str(clips_dir / "a"), out, retry_errors=True)
    assert (again["processed"], again["failed"], again["exit_code"]) == (1, 0, 0)
    assert sorted(row["id"] for row in rows) == [f"clip{i:03d}.wav" for i in range(48)]


def test_a_broken_decode_pool_stops_the_job_instead_of_failing_every_row(runtime, clips_dir, tmp_path):
    import os
    import signal

    from mdlserve.server.batch.loading import ProcessDecodePool
    from mdlserve.server.batch.options import BatchOptions
    from mdlserve.server.batch.runner import BatchJob

    decoder = ProcessDecodePool(1)
    decoder.warm_up()
    for pid in list(decoder._pool._processes):
        os.kill(pid, signal.SIGKILL)
    options = BatchOptions(input=str(clips_dir / "a"), output=tmp_path / "out.jsonl", progress="none", max_tokens=8)
    try:
        job = BatchJob(options, runtime.settings())
        summary = runtime.loop.run_until_complete(job.execute(runtime.engine, decoder))
    finally:
        decoder.shutdown()
    assert summary["exit_code"] == 3 and "decode pool broke" in summary["stopped"]
    assert summary["failed"] == 0 and read_rows(tmp_path / "out.jsonl") == []
