"""The four input kinds, each read as a stream of rows (never the whole input at once).

- files: a folder (walked, one directory listing at a time) or a glob of audio files;
- csv / jsonl: a manifest with an `audio` column (path or URL) and optional id, prompt,
  task, lang and sampling columns; other columns are copied to the output row;
- openai: OpenAI's Batch API input (custom_id, method, url, body) for /v1/chat/completions
  and /v1/audio/transcriptions (vLLM run-batch's `file_url` shape);
- dasheng-eval: the model authors' evaluation rows (dataset_name, audio, lang, text, prompt).
"""

import csv
import errno
import fnmatch
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mdlserve.server.batch.items import AudioRef, BadRow, BatchItem, RowError, question
from mdlserve.server.batch.presets import PresetError, instruction
from mdlserve.server.chat_fields import check_extra_fields
from mdlserve.server.errors import ApiError, validation_problems
from mdlserve.server.schemas import ChatCompletionRequest, ChatMessage, SamplingFields, TextPart, TranscriptionForm
from mdlserve.server.tasks import asr_instruction

Format = Literal["auto", "files", "csv", "jsonl", "openai", "dasheng-eval"]
AUDIO_EXTENSIONS = frozenset((".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".webm",
                              ".aiff", ".aif"))  # fmt: skip
GLOB_CHARS = frozenset("*?[")
# Manifest columns read as sampling fields (the rest of the row is copied to the output).
SAMPLING_COLUMNS = ("max_tokens", "temperature", "top_p", "seed", "min_tokens", "stop")
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/audio/transcriptions": "transcription"}
# A transcription's body in the output is JSON; srt and vtt (text files) have no place there.
BATCH_TRANSCRIPTION_FORMATS = ("json", "verbose_json")
STDIN = "-"

Row: TypeAlias = BatchItem | BadRow


class InputError(ValueError):
    """The input as a whole cannot be read (no such file, unknown format): exit code 2."""


@dataclass
class InputSpec:
    """Where rows come from and the defaults a row may override."""

    input: str
    format: Format = "auto"
    audio_root: str | None = None  # relative audio paths; default: the manifest's folder
    task: str | None = None
    lang: str | None = None
    prompt: str | None = None
    sampling: dict | None = None  # CLI sampling defaults (max_tokens, temperature, ...)

    def resolved_format(self) -> str:
        return detect_format(self.input) if self.format == "auto" else self.format

    def root(self) -> Path:
        if self.audio_root is not None:
            return Path(self.audio_root)
        if self.input == STDIN:
            return Path.cwd()
        return Path(self.input).parent

    def default_prompt(
        self, task: str | None = None, lang: str | None = None, prompt: str | None = None
    ) -> tuple[str, int]:
        """(instruction, default max_tokens) for a row: the row's task, lang and prompt, each
        falling back to --task, --lang and --prompt (presets.instruction combines them)."""
        return instruction(task or self.task, lang or self.lang, prompt or self.prompt)


def _has_magic(text: str) -> bool:
    """Whether `text` has a glob wildcard."""
    return bool(GLOB_CHARS & set(text))


def _lists_files(path: str) -> bool:
    """Whether the input is a folder or a glob, read as its audio files. os.path.isdir, not
    Path.is_dir: a glob under a folder that may not be looked into is not a folder
    (Path.is_dir raised PermissionError on it)."""
    return os.path.isdir(path) or _has_magic(path)


def detect_format(path: str) -> str:
    """files for folders and globs; by extension or the first row's keys otherwise (stdin
    cannot be peeked at: it is a JSONL manifest unless --format says otherwise)."""
    if path == STDIN:
        return "jsonl"
    if _lists_files(path):
        return "files"
    if path.lower().endswith(".csv"):
        return "csv"
    with open_text(path) as f:
        first = next((line for line in f if line.strip()), "")
    try:
        keys = set(json.loads(first)) if first.strip().startswith("{") else set()
    except (ValueError, RecursionError):  # not a JSON object: that line becomes an error row
        keys = set()
    if {"custom_id", "body"} <= keys:
        return "openai"
    if {"dataset_name", "audio"} <= keys:
        return "dasheng-eval"
    return "jsonl"


def open_text(path: str):
    """UTF-8 with or without a byte order mark. Bytes that are not UTF-8 are read as lone
    surrogates (surrogateescape), so that the line or row holding them fails by name
    (`not_utf8`) and the rest of the input is read."""
    if path == STDIN:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise InputError(f"cannot read the input {path}: {exc.strerror or exc}") from None


def read_rows(spec: InputSpec) -> Iterator[Row]:
    reader = {"files": _file_rows, "csv": _csv_rows, "jsonl": _manifest_rows, "openai": _openai_rows,
              "dasheng-eval": _dasheng_rows}[spec.resolved_format()]  # fmt: skip
    return reader(spec)


def text_lines(path: str) -> Iterator[str]:
    """Lines of a text input, read as they are needed."""
    with open_text(path) as f:
        yield from f


# ---------------------------------------------------------------- files


@dataclass
class Unlisted:
    """A folder under the input that could not be listed: its row id (its path as the walk or
    the glob spells it, and "/"), its path, and why."""

    id: str
    path: str
    error: OSError


def _audio_files(spec: InputSpec) -> Iterator[tuple[str, str] | Unlisted]:
    """(id, path): relative paths under a folder (sorted per directory), or glob matches; an
    Unlisted for a folder that could not be listed, where it was met. The input folder (or the
    folder a glob starts from) that cannot be listed is an InputError."""
    if os.path.isdir(spec.input):
        root = Path(spec.input)
        unreadable: list[OSError] = []  # os.walk reports a folder it cannot list here, and goes on
        for folder, dirs, files in os.walk(root, onerror=unreadable.append):
            yield from (_unlisted_folder(spec, root, exc) for exc in unreadable)
            unreadable.clear()
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                    path = Path(folder) / name
                    yield path.relative_to(root).as_posix(), str(path)
        yield from (_unlisted_folder(spec, root, exc) for exc in unreadable)
        return
    base = glob_base(spec.input)
    for match in iglob(spec.input):
        if isinstance(match, OSError):
            yield _unlisted_glob_folder(spec, base, match)
        elif Path(match).suffix.lower() in AUDIO_EXTENSIONS and os.path.isfile(match):
            yield match, match


def _unlisted_folder(spec: InputSpec, root: Path, exc: OSError) -> Unlisted:
    path = Path(exc.filename if exc.filename is not None else root)
    if path == root:
        raise InputError(f"cannot read the input {spec.input}: {exc.strerror or exc}")
    return Unlisted(path.relative_to(root).as_posix() + "/", str(path), exc)


def _unlisted_glob_folder(spec: InputSpec, base: str, exc: OSError) -> Unlisted:
    path = os.fspath(exc.filename)
    if os.path.normpath(path) == os.path.normpath(base or os.curdir):  # nothing of the glob can be listed
        raise InputError(f"cannot read the input {spec.input}: {exc.strerror or exc} ({path})")
    return Unlisted(path if path.endswith("/") else path + "/", path, exc)


def _file_rows(spec: InputSpec) -> Iterator[Row]:
    if spec.input == STDIN or not _lists_files(spec.input):
        raise InputError(f"--format files needs a folder or a glob pattern, got {spec.input}")
    prompt, max_tokens = spec.default_prompt()
    try:
        messages = question(prompt)
    except RowError as exc:
        raise InputError(f"--{exc.message}") from None  # "--prompt: ...": the flag it came from
    sampling = SamplingFields.model_validate({"max_tokens": max_tokens, **(spec.sampling or {})})
    for found in _audio_files(spec):
        if isinstance(found, Unlisted):
            yield _unreadable_folder(found)
            continue
        row_id, path = found
        yield BatchItem(
            row_id, {"id": row_id, "audio": path, "prompt": prompt}, messages, sampling, AudioRef("path", path)
        )


def _unreadable_folder(folder: Unlisted) -> BadRow:
    """A folder under the input that cannot be listed (permission denied) is an error row, so
    that its missing files are seen (the input folder itself is exit 2)."""
    problem = folder.error.strerror or folder.error
    error = RowError("unreadable_folder", f"cannot read the folder {folder.path}: {problem} (its files are not listed)")
    return BadRow(folder.id, {"id": folder.id, "audio": folder.path}, error)


# ---------------------------------------------------------------- globs

# What glob.iglob meets as a matter of course and passes over: a path of the pattern that is
# not there or not a folder ("**" tries to list every file), a symlink loop under "**".
GLOB_QUIET_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG))


def glob_base(pattern: str) -> str:
    """The folder a glob starts from: its path up to the first part with a wildcard ("" for
    the current folder)."""
    folder = pattern
    while _has_magic(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    return folder


def iglob(pattern: str) -> Iterator[str | OSError]:
    """glob.iglob(pattern, recursive=True), path for path and in its order (the ids of earlier
    runs stay the same), except that a folder it cannot list (permission denied) is yielded as
    its OSError where glob.iglob passes over it without a word. Python 3.11's glob module, with
    root_dir, dir_fd, bytes and include_hidden left out."""
    reported: set[str] = set()  # "**" lists a folder, then globs in it: one error for it
    for path in _iglob(pattern, dironly=False):
        if isinstance(path, OSError):
            if path.filename not in reported:
                reported.add(path.filename)
                yield path
        elif path != "":  # "**" at the start matches the empty path first
            yield path


def _iglob(pathname: str, dironly: bool) -> Iterator[str | OSError]:
    dirname, basename = os.path.split(pathname)
    if not _has_magic(pathname):
        if basename:
            if os.path.lexists(pathname):
                yield pathname
        elif os.path.isdir(dirname):  # a pattern ending with a slash matches only folders
            yield pathname
        return
    if not dirname:
        yield from (_glob2 if basename == "**" else _glob1)(dirname, basename, dironly)
        return
    dirs: Iterable[str | OSError] = (
        _iglob(dirname, dironly=True) if dirname != pathname and _has_magic(dirname) else [dirname]
    )
    glob_in_dir = (_glob2 if basename == "**" else _glob1) if _has_magic(basename) else _glob0
    for folder in dirs:
        if isinstance(folder, OSError):
            yield folder
            continue
        for name in glob_in_dir(folder, basename, dironly):
            yield name if isinstance(name, OSError) else os.path.join(folder, name)


def _glob1(dirname: str, pattern: str, dironly: bool) -> Iterator[str | OSError]:
    names, error = _listdir(dirname, dironly)
    if error is not None:
        yield error
    if not _is_hidden(pattern):
        names = [name for name in names if not _is_hidden(name)]
    yield from fnmatch.filter(names, pattern)


def _glob0(dirname: str, basename: str, dironly: bool) -> Iterator[str | OSError]:
    """glob's os.path.lexists, which cannot tell a folder that may not be looked into from a
    name that is not there."""
    if basename:
        try:
            os.lstat(_join(dirname, basename))
        except OSError as exc:
            if exc.errno not in GLOB_QUIET_ERRNOS:
                yield _folder_error(exc, dirname)
            return
        except ValueError:  # a NUL character
            return
        yield basename
    elif os.path.isdir(dirname):
        yield basename


def _glob2(dirname: str, pattern: str, dironly: bool) -> Iterator[str | OSError]:
    yield ""
    yield from _rlistdir(dirname, dironly)


def _rlistdir(dirname: str, dironly: bool) -> Iterator[str | OSError]:
    names, error = _listdir(dirname, dironly)
    if error is not None:
        yield error
    for name in names:
        if not _is_hidden(name):
            yield name
            path = _join(dirname, name) if dirname else name
            for found in _rlistdir(path, dironly):
                yield found if isinstance(found, OSError) else _join(name, found)


def _listdir(dirname: str, dironly: bool) -> tuple[list[str], OSError | None]:
    """The names in a folder (its folders only, if dironly) and the error that stopped the
    listing, if it is one glob.iglob would have passed over without a word (None otherwise)."""
    names: list[str] = []
    try:
        with os.scandir(dirname or os.curdir) as entries:
            for entry in entries:
                try:
                    if not dironly or entry.is_dir():
                        names.append(entry.name)
                except OSError:
                    pass
    except OSError as exc:
        if exc.errno not in GLOB_QUIET_ERRNOS:
            return names, _folder_error(exc, dirname)
    return names, None


def _folder_error(exc: OSError, dirname: str) -> OSError:
    """The error, naming the folder the glob could not look into as the glob spells it."""
    exc.filename = dirname or os.curdir
    return exc


def _is_hidden(name: str) -> bool:
    return name[0] == "."


def _join(dirname: str, basename: str) -> str:
    if not dirname or not basename:
        return dirname or basename
    return os.path.join(dirname, basename)


# ---------------------------------------------------------------- manifests


def not_utf8(text: str) -> str | None:
    """Where text read by open_text holds bytes that are not UTF-8 (surrogateescape made each
    one a lone surrogate U+DC80..U+DCFF), in words; None if it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid UTF-8 (byte 0x{ord(text[exc.start]) - 0xDC00:02x})"
    return None


def _csv_rows(spec: InputSpec) -> Iterator[Row]:
    with open_text(spec.input) as f:
        reader = csv.DictReader(f)
        number = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # a field over csv's size limit: this row only
                number += 1
                error = RowError("invalid_csv", f"row {number}: {exc}")
                yield BadRow(f"row-{number}", {"id": f"row-{number}"}, error)
                continue
            number += 1
            fields = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
            problem = next((p for p in map(not_utf8, (*fields, *fields.values())) if p), None)
            if problem:
                error = RowError("invalid_csv", f"row {number} (line {reader.line_num}) {problem}")
                yield BadRow(f"row-{number}", {"id": f"row-{number}"}, error)
                continue
            yield _manifest_row(spec, number, fields, strict=False)


def _manifest_rows(spec: InputSpec) -> Iterator[Row]:
    for number, row in _json_lines(spec.input):
        yield row if isinstance(row, BadRow) else _manifest_row(spec, number, row)


def _json_lines(path: str) -> Iterator[tuple[int, dict | BadRow]]:
    """(line number, object) per non-blank line; unparsable lines become BadRows."""
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        problem = not_utf8(line)
        message = f"line {number} {problem}" if problem else None
        if message is None:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"line {number}: {exc.msg}"
            except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
                message = f"line {number}: a number has too many digits"
            except RecursionError:
                message = f"line {number}: nested too deeply"
        if message is not None:
            yield number, BadRow(f"line-{number}", {"id": f"line-{number}"}, RowError("invalid_json", message))
            continue
        if not isinstance(value, dict):
            yield (
                number,
                BadRow(
                    f"line-{number}",
                    {"id": f"line-{number}"},
                    RowError("invalid_row", f"line {number} is not a JSON object"),
                ),
            )
            continue
        yield number, value


def audio_ref(value: str, root: Path, param: str = "audio") -> AudioRef:
    """A URL as it is; a path, relative to `root` unless absolute."""
    if "://" in value or value.startswith("data:"):
        return AudioRef("url", value, param)
    path = Path(value)
    return AudioRef("path", str(path if path.is_absolute() else root / path), param)


class ManifestColumns(BaseModel):
    """The columns a manifest row is read by, besides the sampling ones (the others are
    copied to the output as they are). Strict, as the gateway's JSON bodies are: `"id": null`,
    `"prompt": 5` or `"lang": false` fail by name, not read as "None", "5" or the default."""

    model_config = ConfigDict(strict=True)

    id: str = ""  # only a row's own id is validated: null is not one
    audio: str | None = None
    prompt: str | None = None
    task: str | None = None
    lang: str | None = None


def _manifest_row(spec: InputSpec, number: int, row: dict, strict: bool = True) -> Row:
    """`strict`: JSON's types are checked as the gateway checks a JSON body's (`"max_tokens":
    true` or `"3"` fails); a CSV row's values are all text and are converted, as a form's are."""
    row_id = row["id"] if isinstance(row.get("id"), str) else f"row-{number}"
    source = {**row, "id": row_id}
    try:
        columns = validated(ManifestColumns, row)
        if not columns.audio:
            raise RowError("invalid_row", f"row {number} has no audio (a path or URL in the 'audio' column)")
        prompt, max_tokens = _row_prompt(spec, columns)
        sampling = _row_sampling(spec, row, max_tokens, strict)
        messages = question(prompt)
    except RowError as exc:
        return BadRow(row_id, source, exc)
    source["prompt"] = prompt
    return BatchItem(row_id, source, messages, sampling, audio_ref(columns.audio, spec.root()))


def _row_prompt(spec: InputSpec, columns: ManifestColumns) -> tuple[str, int]:
    try:
        return spec.default_prompt(columns.task, columns.lang, columns.prompt)
    except PresetError as exc:
        raise RowError("invalid_task", str(exc)) from None


def _row_sampling(spec: InputSpec, row: dict, default_max_tokens: int, strict: bool = True) -> SamplingFields:
    fields = {"max_tokens": default_max_tokens, **(spec.sampling or {})}
    fields.update({k: row[k] for k in SAMPLING_COLUMNS if row.get(k) not in (None, "")})
    return validated(SamplingFields, fields, strict=strict)


def validated(model: type[BaseModel], data: dict, root: str = "", strict: bool | None = None):
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        path, message = validation_problems(exc.errors(), data, root)[0]
        raise RowError("invalid_row", f"{path or 'row'}: {message}") from None


# ---------------------------------------------------------------- OpenAI Batch API


class BatchRequestLine(BaseModel):
    model_config = ConfigDict(strict=True)

    custom_id: str
    method: str
    url: str
    body: dict


class BatchTranscriptionBody(TranscriptionForm):
    """A transcription request in a batch file: the audio as `file_url` (vLLM run-batch's
    shape: http(s), data: or file:// URL, or a path) instead of a multipart upload. Strict, as
    the gateway's JSON bodies are (the form it extends converts text: `"stream": "true"`,
    `"max_completion_tokens": true` would be read as true and 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: None = Field(None, exclude=True)
    file_url: str


def transcription_messages(body: BatchTranscriptionBody) -> list[ChatMessage]:
    """As the gateway's transcriptions: the authors' ASR instruction with the language's tag,
    and `prompt` (names, spelling) as context in a system message."""
    context = [ChatMessage(role="system", content=body.prompt)] if body.prompt else []
    return [*context, *question(asr_instruction(body.language))]


def _openai_rows(spec: InputSpec) -> Iterator[Row]:
    for number, line in _json_lines(spec.input):
        if isinstance(line, BadRow):
            yield line
            continue
        custom_id = line.get("custom_id")
        row_id = custom_id if isinstance(custom_id, str) and custom_id else f"line-{number}"
        try:
            request = validated(BatchRequestLine, line)
            yield _openai_item(spec, request, line)
        except RowError as exc:
            yield BadRow(row_id, {"custom_id": row_id, "url": line.get("url")}, exc)


def _openai_item(spec: InputSpec, request: BatchRequestLine, line: dict) -> BatchItem:
    if request.method.upper() != "POST":
        raise RowError("invalid_method", f"method must be POST, got {request.method!r}")
    endpoint = OPENAI_URLS.get(request.url)
    if endpoint is None:
        raise RowError("invalid_url", f"url {request.url!r} is not supported; use one of {', '.join(OPENAI_URLS)}")
    source = {"custom_id": request.custom_id, "url": request.url, "model": request.body.get("model")}
    if endpoint == "transcription":
        body = validated(BatchTranscriptionBody, request.body, "body")
        if body.stream:
            raise RowError("invalid_row", "body.stream: streaming is not available in batch jobs")
        if body.response_format not in BATCH_TRANSCRIPTION_FORMATS:
            raise RowError(
                "invalid_row",
                f"body.response_format: {body.response_format} is not available in batch "
                f"jobs; use {' or '.join(BATCH_TRANSCRIPTION_FORMATS)}",
            )
        source.update(response_format=body.response_format, language=body.language)
        return BatchItem(
            request.custom_id,
            source,
            transcription_messages(body),
            body.sampling(),
            audio_ref(body.file_url, spec.root(), "body.file_url"),
            "transcription",
        )
    chat = validated(ChatCompletionRequest, request.body, "body")
    try:  # the gateway's rule: a field we do not honour is refused by name, never ignored
        check_extra_fields(chat, accept_unknown=False)
    except ApiError as exc:
        raise RowError("invalid_row", f"body.{exc.message}") from None
    if chat.stream:
        raise RowError("invalid_row", "body.stream: streaming is not available in batch jobs")
    if all(isinstance(m.content, str) or all(isinstance(p, TextPart) for p in m.content) for m in chat.messages):
        raise RowError("invalid_row", "body.messages: no audio part (input_audio or audio_url)")
    # by_alias: a json_schema response_format dumps its schema as `schema`, the name it is read by
    sampling = SamplingFields.model_validate(chat.model_dump(include=set(SamplingFields.model_fields), by_alias=True))
    return BatchItem(request.custom_id, source, chat.messages, sampling, endpoint="chat")


# ---------------------------------------------------------------- the authors' evaluation rows


def dasheng_id(row: dict) -> str:
    """Their rows have no id: dataset, audio file and prompt identify one question (a line
    that was not a JSON object is written back as {"id": "line-N", ...})."""
    if "dataset_name" not in row and "audio" not in row and "id" in row:
        return str(row["id"])
    return f"{row.get('dataset_name', '')}:{row.get('audio', '')}:{row.get('prompt', '')}"


class DashengColumns(BaseModel):
    """The fields of their rows the job reads (`text`, the reference, is only copied): strict,
    as ManifestColumns; a null dataset_name is not one (it would be the id's "None")."""

    model_config = ConfigDict(strict=True)

    dataset_name: str = ""
    audio: str | None = None
    lang: str | None = None
    prompt: str | None = None


def _dasheng_rows(spec: InputSpec) -> Iterator[Row]:
    for number, row in _json_lines(spec.input):
        if isinstance(row, BadRow):
            yield row
            continue
        source = dict(row)
        try:
            columns = validated(DashengColumns, row)
            if not columns.prompt:
                source["prompt"] = spec.default_prompt(lang=columns.lang or None)[0]
            max_tokens = spec.default_prompt(lang=columns.lang or None, prompt=source["prompt"])[1]
            audio = columns.audio
            if not audio:
                raise RowError("invalid_row", f"line {number} has no audio file name")
            sampling = _row_sampling(spec, {}, max_tokens)
            messages = question(source["prompt"])
        except (RowError, PresetError) as exc:
            error = exc if isinstance(exc, RowError) else RowError("invalid_task", str(exc))
            yield BadRow(dasheng_id(source), source, error)
            continue
        yield BatchItem(dasheng_id(source), source, messages, sampling, audio_ref(audio, spec.root()))
