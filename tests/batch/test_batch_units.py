"""Engine-free parts of batch jobs: id hashes and their table, shard parsing, torn-line
repair, task presets, input-kind detection, progress output."""

import json
import os
import random
import re

import pytest

from mdlserve.server.batch.ids import IdSet, Shard, id_hash
from mdlserve.server.batch.inputs import detect_format
from mdlserve.server.batch.outputs import cut_torn_line
from mdlserve.server.batch.presets import PresetError, instruction
from mdlserve.server.batch.progress import Progress


def test_id_set_matches_a_python_set():
    rng = random.Random(0)
    values = [id_hash(f"id-{rng.randrange(30_000)}") for _ in range(50_000)]
    table, reference = IdSet(capacity=4), set()
    for value in values:
        assert table.add(value) == (value not in reference)
        reference.add(value)
    assert len(table) == len(reference)
    assert all(value in table for value in reference)
    assert sum(id_hash(f"other-{i}") in table for i in range(10_000)) == 0


def test_id_hash_is_stable_and_never_zero():
    assert id_hash("a/clip000.wav") == id_hash("a/clip000.wav") != id_hash("a/clip001.wav")
    assert id_hash("a/clip000.wav") == 0x24270d976eacdaed  # blake2b: the same on every machine and run
    assert all(id_hash(str(i)) != 0 for i in range(1000))


def test_shards_partition_ids():
    shards = [Shard(i, 4) for i in range(4)]
    for i in range(2000):
        assert sum(shard.owns(id_hash(str(i))) for shard in shards) == 1
    counts = [sum(shard.owns(id_hash(str(i))) for i in range(4000)) for shard in shards]
    assert min(counts) > 850  # roughly a quarter each


@pytest.mark.parametrize("text, environ, expected", [
    (None, {}, Shard(0, 1)), ("0/1", {}, Shard(0, 1)), ("2/5", {}, Shard(2, 5)),
    ("auto/5", {"JOB_COMPLETION_INDEX": "4"}, Shard(4, 5)),
])  # fmt: skip
def test_shard_parse(text, environ, expected):
    assert Shard.parse(text, environ) == expected


@pytest.mark.parametrize("text, environ, message", [
    ("5/5", {}, "below the count"), ("1/0", {}, "below the count"), ("1-2", {}, "I/N or auto/N"),
    ("auto/3", {}, "JOB_COMPLETION_INDEX"), ("auto/3", {"JOB_COMPLETION_INDEX": "3"}, "below the count"),
])  # fmt: skip
def test_shard_parse_refuses(text, environ, message):
    with pytest.raises(ValueError, match=message):
        Shard.parse(text, environ)


def test_cut_torn_line(tmp_path):
    path = tmp_path / "o.jsonl"
    whole = json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n"
    path.write_text(whole + '{"id": "c", "out')
    assert cut_torn_line(path) == len('{"id": "c", "out')
    assert path.read_text() == whole
    assert cut_torn_line(path) == 0 and path.read_text() == whole
    path.write_text("x" * 200_000)  # one torn line longer than the backward read block
    assert cut_torn_line(path) == 200_000 and path.read_text() == ""


def test_presets_are_the_gateway_tasks_with_output_budgets():
    assert instruction("asr") == ("Transcribe the speech into text <|en|>", 256)
    assert instruction("asr", "TH")[0] == "Transcribe the speech into text <|th|>"
    assert instruction(None) == ("Write an audio caption describing the sound", 128)
    assert instruction("genre", "zh") == ("What's the music genre?", 32)
    assert instruction("genre", prompt="Which decade is this from?")[0] == "Which decade is this from?"
    assert instruction("qa", prompt="What animal is it?")[0] == "What animal is it? Answer with 1-2 sentences"
    with pytest.raises(PresetError, match="tasks: caption, music_caption, asr"):
        instruction("poetry")
    with pytest.raises(PresetError, match="unknown asr language 'xx'"):
        instruction("asr", "xx")
    with pytest.raises(PresetError, match="needs the question"):
        instruction("multiple_choice")


def test_detect_format(tmp_path):
    rows = {"openai": {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}},
            "dasheng-eval": {"dataset_name": "AudioCaps", "audio": "a.wav", "text": "t"},
            "jsonl": {"audio": "a.wav"}}  # fmt: skip
    for kind, row in rows.items():
        (tmp_path / f"{kind}.jsonl").write_text("\n" + json.dumps(row) + "\n")
        assert detect_format(str(tmp_path / f"{kind}.jsonl")) == kind
    assert detect_format(str(tmp_path)) == "files"
    assert detect_format(str(tmp_path / "*.wav")) == "files"
    assert detect_format(str(tmp_path / "m.csv")) == "csv"
    assert detect_format("-") == "jsonl"


def test_progress_bar_and_log_lines(capsys, caplog):
    bar = Progress(total=4, mode="bar")
    for _ in range(4):
        bar.advance(3600.0)
    bar.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "audio-h/h" in err

    caplog.set_level("INFO", logger="mdlserve.batch")
    log = Progress(total=2, mode="log", interval=1e-9)
    log.advance(30.0)
    log.advance(30.0)
    log.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("batch: 1/2 rows (50.0 %), ETA ")
    assert lines[-1].startswith("batch: 2/2 rows (100.0 %), ETA 0 s, ")


def test_openai_chat_rows_refuse_fields_the_gateway_does_not_honour(tmp_path):
    from mdlserve.server.batch.inputs import InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [audio, {"type": "text", "text": "?"}]}]}
    lines = [
        {"custom_id": "plain", "method": "POST", "url": "/v1/chat/completions", "body": body},
        {"custom_id": "extra", "method": "POST", "url": "/v1/chat/completions", "body": {**body, "frobnicate": 1}},
        {"custom_id": "tools", "method": "POST", "url": "/v1/chat/completions", "body": {**body, "tools": [{}]}},
        {"custom_id": "format", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "messages": [{"role": "user", "content": [{**audio, "input_audio": {"data": "", "format": "x"}}]}]}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = {row.id: row for row in read_rows(InputSpec(str(path), format="openai"))}
    assert not isinstance(rows["plain"], BadRow)
    assert isinstance(rows["extra"], BadRow) and rows["extra"].error.code == "invalid_row"
    assert "unknown field 'frobnicate'" in rows["extra"].error.message
    assert isinstance(rows["tools"], BadRow) and rows["tools"].error.message.startswith("body.tools is not supported")
    assert rows["format"].error.message.startswith(  # where it is in the body, not which union member failed
        "body.messages[0].content[0].input_audio.format: Value error, unsupported audio format 'x'; supported: wav,")


def test_an_audio_placeholder_typed_into_a_prompt_is_a_bad_row_not_a_dead_job(tmp_path):
    """`<|AUDIO|>` in a prompt would ask the engine for a clip the row does not have: that
    row fails by name, the rows after it are read; in --prompt it fails the whole input."""
    from mdlserve.server.batch.inputs import InputError, InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(
        json.dumps({"id": "typed", "audio": "a.wav", "prompt": "what is <|AUDIO|> here?"})
        + "\n"
        + json.dumps({"id": "fine", "audio": "b.wav", "prompt": "what is here?"})
        + "\n"
    )
    rows = {row.id: row for row in read_rows(InputSpec(str(manifest)))}
    assert isinstance(rows["typed"], BadRow) and rows["typed"].error.code == "invalid_row"
    assert rows["typed"].error.message == (
        "prompt: Value error, text must not contain <|AUDIO|>, the model's audio placeholder: "
        "send audio as an input_audio or audio_url part"
    )
    assert not isinstance(rows["fine"], BadRow)

    folder = tmp_path / "clips"
    folder.mkdir()
    with pytest.raises(InputError, match=r"^--prompt: Value error, text must not contain <\|AUDIO\|>"):
        list(read_rows(InputSpec(str(folder), prompt="<|AUDIO|>")))


def test_hostile_manifest_lines_are_error_rows_and_the_rest_is_read(tmp_path):
    """A byte order mark is read past (and the kind still detected by the first row's keys);
    a line or CSV row that is not UTF-8, a number too long for int(), JSON nested too deep
    for the parser, or a CSV field over csv's limit fails by name; the rows around it run."""
    from mdlserve.server.batch.inputs import InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    def rows(name: str, data: bytes) -> dict:
        path = tmp_path / name
        path.write_bytes(data)
        spec = InputSpec(str(path))
        read = list(read_rows(spec))
        assert len({row.id for row in read}) == len(read)
        return {"format": spec.resolved_format(), **{row.id: row.error.message if isinstance(row, BadRow) else None
                                                     for row in read}}  # fmt: skip

    def line(row_id: str) -> bytes:
        return json.dumps({"id": row_id, "audio": f"{row_id}.wav"}).encode() + b"\r\n"

    assert rows("bom.jsonl", b"\xef\xbb\xbf" + line("a") + line("b")) == {"format": "jsonl", "a": None, "b": None}
    openai = {"custom_id": "c", "method": "POST", "url": "/v1/audio/transcriptions",
              "body": {"model": "m", "file_url": "c.wav"}}  # fmt: skip
    assert rows("bom-openai.jsonl", b"\xef\xbb\xbf" + json.dumps(openai).encode() + b"\n") == {"format": "openai",
                                                                                                "c": None}  # fmt: skip
    hostile = [b'{"id": "x\xff", "audio": "x.wav"}\n', b'{"id": "n", "audio": "n.wav", "seed": ' + b"9" * 5000 + b"}\n",
               b"[" * 100_000 + b"]" * 100_000 + b"\n"]  # fmt: skip
    assert rows("hostile.jsonl", line("a") + b"".join(hostile) + line("b")) == {
        "format": "jsonl", "a": None, "b": None,
        "line-2": "line 2 is not valid UTF-8 (byte 0xff)",
        "line-3": "line 3: a number has too many digits",
        "line-4": "line 4: nested too deeply",
    }  # fmt: skip
    csv_text = b"id,audio,text\na,a.wav,\xef\xbb\xbf\nb,b\xff.wav,\nc,c.wav," + b"x" * 200_000 + b"\nd,d.wav,\n"
    assert rows("hostile.csv", csv_text) == {
        "format": "csv", "a": None, "d": None,
        "row-2": "row 2 (line 3) is not valid UTF-8 (byte 0xff)",
        "row-3": "row 3: field larger than field limit (131072)",
    }  # fmt: skip


def test_audio_that_is_not_a_regular_file_or_a_url_that_does_not_parse_is_a_row_error(tmp_path):
    """/dev/zero was read until memory ran out (the job OOM-killed), a FIFO's open waited for a
    writer forever, /dev/null read as an empty clip; a NUL in a path and a malformed URL were
    internal errors (ValueError)."""
    import asyncio

    from mdlserve.server.batch.items import AudioRef, RowError
    from mdlserve.server.batch.loading import audio_source, batch_fetcher, read_file

    def error(path: str) -> tuple[str, str]:
        with pytest.raises(RowError) as caught:
            read_file(path, 1 << 20)
        return caught.value.code, caught.value.message

    os.mkfifo(tmp_path / "fifo.wav")
    device = "cannot read {}: not a regular file (a device, pipe or socket)"
    assert error("/dev/null") == ("unreadable_file", device.format("/dev/null"))
    assert error("/dev/zero") == ("unreadable_file", device.format("/dev/zero"))
    assert error(str(tmp_path / "fifo.wav")) == ("unreadable_file", device.format(tmp_path / "fifo.wav"))
    assert error(str(tmp_path)) == ("unreadable_file", f"cannot read {tmp_path}: it is a folder")
    assert error("clips/a\0.wav") == ("unreadable_file", "cannot read 'clips/a\\x00.wav': embedded null byte")
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(RowError, match=r"big.wav is 2000 bytes \(the limit is 1000, --fetch-max-bytes\)"):
        read_file(str(big), 1000)

    async def load(url: str) -> bytes:
        fetcher = batch_fetcher(5.0, 1 << 20)
        try:
            return await audio_source(AudioRef("url", url), fetcher).load()
        finally:
            await fetcher.aclose()

    with pytest.raises(RowError) as caught:
        asyncio.run(load("http://[::1/x.wav"))
    assert (caught.value.code, caught.value.message) == ("invalid_audio_url", "audio: malformed URL: Invalid IPv6 URL")
    with pytest.raises(RowError, match="^unreadable_file: cannot read /dev/zero: not a regular file"):
        asyncio.run(load("file:///dev/zero"))


def test_ids_and_rows_with_lone_surrogates_are_written_and_resumed(tmp_path):
    """A file name that is not UTF-8 (os.walk gives U+DC80..U+DCFF for its bytes) or a \\ud800
    escape in a JSON row: hashing the id and writing the row raised UnicodeEncodeError (the
    job died); now the row is written with \\u escapes and a rerun finds it done."""
    from mdlserve.server.batch.ids import IdSet, Shard
    from mdlserve.server.batch.inputs import InputSpec, read_rows
    from mdlserve.server.batch.outputs import OutputFormat, ResultWriter
    from mdlserve.server.batch.selection import Counts, select

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / os.fsdecode(b"bad\xff.wav")).write_bytes(b"RIFF")
    rows = list(select(read_rows(InputSpec(str(folder))), Shard(), IdSet(), Counts()))
    assert [row.id for row in rows] == ["bad\udcff.wav"]

    output = tmp_path / "out.jsonl"
    writer = ResultWriter(output, OutputFormat())
    writer.write({**rows[0].source, "output": "a dog", "error": None})
    writer.write({"id": "s\ud800", "ref": "x", "output": None, "error": {"code": "invalid_row", "message": "?"}})
    writer.close()
    text = output.read_bytes().decode("utf-8")  # valid UTF-8: the surrogates are \u escapes
    assert '"id": "bad\\udcff.wav"' in text and '"id": "s\\ud800"' in text
    counts = Counts()
    again = list(select(read_rows(InputSpec(str(folder))), Shard(), ResultWriter(output, OutputFormat()).done, counts))
    assert again == [] and counts.done_before == 1


def test_a_lang_that_is_not_a_string_is_an_invalid_row(tmp_path):
    """{"task": "asr", "lang": 5} raised AttributeError ('int' object has no attribute 'lower')
    in the reader thread, which ended the job."""
    from mdlserve.server.batch.inputs import InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "n", "audio": "n.wav", "task": "asr", "lang": 5}) + "\n"
                        + json.dumps({"id": "ok", "audio": "ok.wav", "task": "asr", "lang": "zh"}) + "\n")  # fmt: skip
    rows = {row.id: row for row in read_rows(InputSpec(str(manifest)))}
    assert isinstance(rows["n"], BadRow) and rows["n"].error.code == "invalid_row"
    assert rows["n"].error.message == "lang: Input should be a valid string"
    assert not isinstance(rows["ok"], BadRow)


def test_fields_of_the_wrong_json_type_are_error_rows_naming_the_field(tmp_path):
    """Typed as the gateway types a JSON body: `"id": null` was the id "None", `"prompt": 5`
    the prompt "5", `"task": 0` the default task, `"max_tokens": true` 1 and an OpenAI
    transcription body's `"stream": "false"` true; a CSV row's text is still converted."""
    from mdlserve.server.batch.inputs import InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    def errors(name: str, lines: list, format: str = "auto") -> dict:
        path = tmp_path / name
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return {row.id: (row.error.code, row.error.message) if isinstance(row, BadRow) else None
                for row in read_rows(InputSpec(str(path), format=format))}  # fmt: skip

    def expected(*problems: str) -> tuple:
        return ("invalid_row", *problems)

    manifest = [{"id": None, "audio": "a.wav"}, {"id": 7, "audio": "a.wav"}, {"id": "audio", "audio": 5},
                {"id": "prompt", "audio": "a.wav", "prompt": 5}, {"id": "prompt-0", "audio": "a.wav", "prompt": 0},
                {"id": "task", "audio": "a.wav", "task": 0}, {"id": "lang", "audio": "a.wav", "lang": False},
                {"id": "bool", "audio": "a.wav", "max_tokens": True}, {"id": "text", "audio": "a.wav", "seed": "3"},
                {"id": "float", "audio": "a.wav", "min_tokens": 2.0}, {"id": "top-p", "audio": "a.wav", "top_p": True},
                {"id": "fine", "audio": "a.wav", "prompt": None, "max_tokens": 3, "temperature": 1, "ref": 5}]  # fmt: skip
    assert errors("m.jsonl", manifest) == {
        "row-1": expected("id: Input should be a valid string"), "row-2": expected("id: Input should be a valid string"),
        "audio": expected("audio: Input should be a valid string"),
        "prompt": expected("prompt: Input should be a valid string"),
        "prompt-0": expected("prompt: Input should be a valid string"),
        "task": expected("task: Input should be a valid string"), "lang": expected("lang: Input should be a valid string"),
        "bool": expected("max_tokens: Input should be a valid integer"),
        "text": expected("seed: Input should be a valid integer"),
        "float": expected("min_tokens: Input should be a valid integer"),
        "top-p": expected("top_p: Input should be a valid number"), "fine": None,
    }  # fmt: skip
    (tmp_path / "m.csv").write_text("id,audio,max_tokens,temperature\nc,c.wav,3,0.5\n")
    assert [row.sampling.max_tokens for row in read_rows(InputSpec(str(tmp_path / "m.csv")))] == [3]

    def request(custom_id, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/audio/transcriptions",
                "body": {"model": "m", "file_url": "a.wav", **body}}  # fmt: skip

    openai = [request(5), request(None), request("stream", stream="false"), request("bool", max_completion_tokens=True),
              request("text", temperature="0.5"), {**request("method"), "method": 1}, request("fine", seed=3)]  # fmt: skip
    assert errors("o.jsonl", openai) == {
        "line-1": expected("custom_id: Input should be a valid string"),
        "line-2": expected("custom_id: Input should be a valid string"),
        "stream": expected("body.stream: Input should be a valid boolean"),
        "bool": expected("body.max_completion_tokens: Input should be a valid integer"),
        "text": expected("body.temperature: Input should be a valid number"),
        "method": expected("method: Input should be a valid string"), "fine": None,
    }  # fmt: skip

    dasheng = [{"dataset_name": None, "audio": "a.wav"}, {"dataset_name": "D", "audio": 5},
               {"dataset_name": "D", "audio": "a.wav", "prompt": 0}, {"dataset_name": "D", "audio": "b.wav", "lang": 5},
               {"dataset_name": "D", "audio": "c.wav", "lang": "", "text": "a dog"}]  # fmt: skip
    assert errors("d.jsonl", dasheng, "dasheng-eval") == {
        "None:a.wav:": expected("dataset_name: Input should be a valid string"),
        "D:5:": expected("audio: Input should be a valid string"),
        "D:a.wav:0": expected("prompt: Input should be a valid string"),
        "D:b.wav:": expected("lang: Input should be a valid string"),
        "D:c.wav:Write an audio caption describing the sound": None,
    }  # fmt: skip


def test_a_folder_that_cannot_be_read_is_an_error_row_and_the_input_folder_exits_2(tmp_path, monkeypatch):
    """os.walk skipped a subfolder it could not list (permission denied): its clips were
    missing from the output without a word. os.scandir is made to fail as chmod 000 would
    for another user (tests may run as root, whom chmod does not stop)."""
    import errno

    from mdlserve.server.batch.inputs import InputError, InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    folder = tmp_path / "clips"
    for name in ("a/x.wav", "locked/y.wav", "locked/deeper/z.wav", "z.wav"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"RIFF")
    locked = {str(folder / "locked")}
    scandir = os.scandir

    def failing_scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    rows = list(read_rows(InputSpec(str(folder))))
    assert [row.id for row in rows] == ["z.wav", "a/x.wav", "locked/"]
    bad = rows[2]
    assert isinstance(bad, BadRow) and bad.source == {"id": "locked/", "audio": str(folder / "locked")}
    assert (bad.error.code, bad.error.message) == (
        "unreadable_folder", f"cannot read the folder {folder / 'locked'}: Permission denied (its files are not listed)")

    locked.add(str(folder))
    with pytest.raises(InputError, match=f"^cannot read the input {folder}: Permission denied$"):
        list(read_rows(InputSpec(str(folder))))


def _tree(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"RIFF")


def test_the_glob_of_a_files_input_matches_what_glob_iglob_matches(tmp_path, monkeypatch):
    """The reader lists globs itself (to see the folders it cannot list): every path, and so
    every id, is the one glob.iglob(recursive=True) gives, in its order."""
    import glob

    from mdlserve.server.batch.inputs import iglob

    _tree(tmp_path / "clips", ["top.wav", ".dot.wav", "a/x.wav", "a/deeper/y.flac", "a/deeper/z.wav",
                               ".hidden/h.wav", "b/z.WAV", "b/notes.txt", "folder.wav/in.wav", "c/deeper/w.wav"])
    (tmp_path / "clips" / "link").symlink_to(tmp_path / "clips" / "a")
    (tmp_path / "clips" / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    patterns = ["clips/**/*.wav", "clips/*/*.wav", "clips/**", "clips/*.wav", "clips/**/*.[wf]*", "**/*.wav",
                "clips/*/deeper/*.wav", "clips/.*/*.wav", "clips/*/deeper/", "clips/[ab]/**/*", "*/a/*.wav",
                "clips/nothing/*.wav", "nothing/**/*.wav", "clips/**/**/*.flac", str(tmp_path / "clips/**/*.wav"),
                str(tmp_path / "*/*/deeper/*")]  # fmt: skip
    for pattern in patterns:
        expected = list(glob.iglob(pattern, recursive=True))
        assert list(iglob(pattern)) == [path for path in expected if path], pattern
    assert len(list(iglob("clips/**/*.wav"))) == 8  # the tree holds matches (folder.wav too)


def test_a_folder_a_glob_cannot_read_is_an_error_row_and_its_first_folder_exits_2(tmp_path, monkeypatch):
    """glob.iglob passed over a folder it could not list or look into (permission denied):
    its clips were missing from the output without a word. Now it is an unreadable_folder row,
    as under a folder input; the folder the glob starts from is exit 2. As in the folder test,
    os.scandir, os.lstat and os.stat are made to fail as chmod 000 would for another user."""
    import errno

    from mdlserve.server.batch.inputs import InputError, InputSpec, read_rows
    from mdlserve.server.batch.items import BadRow

    folder = tmp_path / "clips"
    _tree(folder, ["a/x.wav", "a/deeper/w.wav", "locked/y.wav", "locked/deeper/z.wav", "z.wav"])
    locked = str(folder / "locked")
    real = {name: getattr(os, name) for name in ("scandir", "lstat", "stat")}

    def denied(name, inside_only):
        def call(path=".", *args, **kwargs):
            text = os.fspath(path)
            if text.startswith(locked + os.sep) or (text == locked and not inside_only):
                raise PermissionError(errno.EACCES, "Permission denied", text)
            return real[name](path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "scandir", denied("scandir", inside_only=False))  # cannot list it
    monkeypatch.setattr(os, "lstat", denied("lstat", inside_only=True))  # nor look into it
    monkeypatch.setattr(os, "stat", denied("stat", inside_only=True))

    def ids(pattern):
        rows = list(read_rows(InputSpec(pattern)))
        bad = [row for row in rows if isinstance(row, BadRow)]
        assert len(bad) <= 1
        if bad:
            assert bad[0].source == {"id": locked + "/", "audio": locked}
            assert (bad[0].error.code, bad[0].error.message) == (
                "unreadable_folder", f"cannot read the folder {locked}: Permission denied (its files are not listed)")
        return sorted(row.id for row in rows)

    clips = str(folder)
    assert ids(f"{clips}/**/*.wav") == sorted([f"{clips}/z.wav", f"{clips}/a/x.wav", f"{clips}/a/deeper/w.wav",
                                               f"{locked}/"])  # fmt: skip
    assert ids(f"{clips}/*/*.wav") == [f"{clips}/a/x.wav", f"{locked}/"]
    assert ids(f"{clips}/*/deeper/*.wav") == [f"{clips}/a/deeper/w.wav", f"{locked}/"]  # looked into, not listed
    assert ids(f"{clips}/a/*.wav") == [f"{clips}/a/x.wav"]
    message = "^" + re.escape(f"cannot read the input {locked}/*.wav: Permission denied ({locked})") + "$"
    with pytest.raises(InputError, match=message):
        list(read_rows(InputSpec(f"{locked}/*.wav")))
    with pytest.raises(InputError, match="^cannot read the input .*: Permission denied"):
        list(read_rows(InputSpec(f"{locked}/**/*.wav")))


def test_decode_pool_shutdown_ends_its_workers_and_manager_even_with_a_decode_that_never_ends():
    """shutdown() was shutdown(wait=False): it returned while the pool's manager thread was
    still closing its pipes and joining the workers, which then raced the interpreter's exit
    (Python 3.11's exit hook writes to one of those pipes without the manager's lock: "OSError:
    [Errno 9] Bad file descriptor" after the summary, now and then), and a worker busy with a
    decode that never ended was left running. Now it returns once the workers and the manager
    have ended: idle workers end cleanly, a busy one is terminated after `timeout`."""
    import time
    from concurrent.futures.process import BrokenProcessPool

    from mdlserve.server.batch.loading import ProcessDecodePool

    def parts(pool):
        pool.warm_up()
        return list(pool._pool._processes.values()), pool._pool._executor_manager_thread

    idle = ProcessDecodePool(2)
    processes, manager = parts(idle)
    idle.shutdown(timeout=600)  # returns as soon as they have ended
    assert not manager.is_alive()
    assert [process.exitcode for process in processes] == [0, 0]  # ended by the pool, not terminated

    busy = ProcessDecodePool(2)
    processes, manager = parts(busy)
    never_ends = busy._pool.submit(time.sleep, 3600)
    deadline = time.monotonic() + 600
    while not never_ends.running():  # handed to the workers: it can no longer be cancelled
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy.shutdown(timeout=0.5)
    assert not manager.is_alive()
    assert not any(process.is_alive() for process in processes)
    assert isinstance(never_ends.exception(timeout=0), BrokenProcessPool)

    ProcessDecodePool(1).shutdown()  # no worker ever started: nothing to wait for
