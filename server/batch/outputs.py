"""Output rows in each input kind's shape, and the append-only, resumable output file.

Crash safety: every row is written whole and flushed before the next; a rerun first checks
that every line is a row (a file that is not a batch output is refused, not changed), then
cuts a torn last line (a kill in the middle of a write) and skips every id already present.
"""

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from mdlserve.server.batch.ids import IdSet, id_hash
from mdlserve.server.batch.inputs import dasheng_id
from mdlserve.server.batch.items import BadRow, BatchItem, Result, RowError
from mdlserve.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    TranscriptionResponse,
    TranscriptionUsage,
    TranscriptionVerboseResponse,
    Usage,
)  # fmt: skip

DEFAULT_MODEL_NAME = "MiDashengLM"


class OutputFormat:
    """Plain manifests and folders: the input row plus id, prompt, output and counts."""

    def __init__(self, model_name: str = DEFAULT_MODEL_NAME):
        self.model_name = model_name

    def row_id(self, row: dict) -> str | None:
        return row.get("id")

    def is_error(self, row: dict) -> bool:
        return row.get("error") is not None

    def ok_row(self, item: BatchItem, result: Result) -> dict:
        first = result.completions[0]
        return {**item.source, "output": first.text, "finish_reason": first.finish_reason,
                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "audio_seconds": round(result.audio_seconds, 3), "error": None}  # fmt: skip

    def error_row(self, row: BatchItem | BadRow, error: RowError) -> dict:
        return {**row.source, "output": None, "error": {"code": error.code, "message": error.message}}


class DashengEvalFormat(OutputFormat):
    """The authors' rows with model_output and model_name filled, every other field as read,
    so their scorers (compute_wer.py, compute_fense.py, ...) read our files unchanged. A
    failed row keeps an empty model_output (scored as a wrong answer) and says why in `error`."""

    def row_id(self, row: dict) -> str | None:
        return dasheng_id(row)

    def ok_row(self, item: BatchItem, result: Result) -> dict:
        return {**item.source, "model_output": result.completions[0].text, "model_name": self.model_name}

    def error_row(self, row: BatchItem | BadRow, error: RowError) -> dict:
        return {
            **row.source,
            "model_output": "",
            "model_name": self.model_name,
            "error": {"code": error.code, "message": error.message},
        }


class OpenAIBatchFormat(OutputFormat):
    """OpenAI's batch output line: {id, custom_id, response: {status_code, request_id, body},
    error: null}; a failed row is OpenAI's error-file line: {id, custom_id, response: null,
    error: {code, message}} (both validate as vLLM run-batch's BatchRequestOutput)."""

    def row_id(self, row: dict) -> str | None:
        return row.get("custom_id")

    def is_error(self, row: dict) -> bool:
        return row.get("error") is not None or (row.get("response") or {}).get("status_code") != 200

    def ok_row(self, item: BatchItem, result: Result) -> dict:
        response = {"status_code": 200, "request_id": result.request_id,
                    "body": self._body(item, result).model_dump(mode="json")}  # fmt: skip
        return self._line(item.id, response, None)

    def _body(self, item: BatchItem, result: Result):
        model = item.source.get("model") or self.model_name
        if item.endpoint == "chat":
            choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                       for i, c in enumerate(result.completions)]  # fmt: skip
            usage = Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            )
            return ChatCompletionResponse(
                id=result.request_id, created=result.created, model=model, choices=choices, usage=usage
            )
        text = result.completions[0].text
        usage = TranscriptionUsage(
            input_tokens=result.prompt_tokens,
            output_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        )
        if item.source.get("response_format") == "verbose_json":
            return TranscriptionVerboseResponse(
                duration=round(result.audio_seconds, 3),
                text=text,
                usage=usage,
                language=item.source.get("language") or "unknown",
            )
        return TranscriptionResponse(text=text, usage=usage)

    def error_row(self, row: BatchItem | BadRow, error: RowError) -> dict:
        return self._line(row.id, None, {"code": error.code, "message": error.message})

    @staticmethod
    def _line(custom_id: str, response: dict | None, error: dict | None) -> dict:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def output_format(input_format: str, model_name: str = DEFAULT_MODEL_NAME) -> OutputFormat:
    kind = {"openai": OpenAIBatchFormat, "dasheng-eval": DashengEvalFormat}.get(input_format, OutputFormat)
    return kind(model_name)


def json_line(value: dict) -> str:
    """One JSON line, UTF-8 as it is, or with \\u escapes where a string holds a lone surrogate
    (a file name that is not UTF-8, a \\ud800 escape in a JSON row), which UTF-8 cannot hold;
    json.loads reads either back to the same value, so resume and merge see the same ids."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


class OutputFileError(ValueError):
    """The output file holds something that is not one of our rows: exit code 2."""


def output_rows(path: Path, skip_torn: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, row) of an output file, streamed; `skip_torn`: without a torn last line,
    which must be the start of a row (`{`): a text file's last line is not taken for one."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or (skip_torn and not line.endswith("\n") and line.startswith("{")):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise OutputFileError(f"{path}:{number} is not a JSON row; is this the output of a batch job?")
            yield number, row


def cut_torn_line(path: Path) -> int:
    """Removes a last line without its newline (a write cut by kill -9); returns bytes cut."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            step = min(1 << 16, position)
            f.seek(position - step)
            block = f.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
        if position == end:
            return 0
        f.truncate(position)
        return end - position


class ResultWriter:
    """Appends rows to the output file, one whole line and a flush each. On open, reads the
    ids already there (the rows a previous run finished) into `done`. `read_only`
    (--dry-run) reads the ids and changes nothing: no file created, no torn line cut."""

    def __init__(self, path: Path, fmt: OutputFormat, retry_errors: bool = False, read_only: bool = False):
        self.path = path
        self.format = fmt
        self.done = IdSet()
        self.torn_bytes = 0
        self.errors_dropped = 0
        self._file: TextIO | None = None
        try:
            self._open(retry_errors, read_only)
        except OSError as exc:  # a folder, a path under a file, no permission
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
            raise OutputFileError(f"cannot write the output {path}: {exc.strerror or exc}{where}") from None

    def _open(self, retry_errors: bool, read_only: bool) -> None:
        path, fmt = self.path, self.format
        if path.exists():
            # Every row is checked before the torn line is cut or the error rows dropped: a
            # file that is not a batch output is refused as it is.
            retry = retry_errors and not read_only
            for number, row in output_rows(path, skip_torn=True):
                row_id = fmt.row_id(row)
                if row_id is None:
                    raise OutputFileError(f"{path}:{number} has no row id; is this the output of this input kind?")
                if not (retry and fmt.is_error(row)):  # dropped below: run again
                    self.done.add(id_hash(str(row_id)))
            if not read_only:
                self.torn_bytes = cut_torn_line(path)
            if retry:
                self.errors_dropped = self._drop_error_rows()
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the job, closed by close())

    def _drop_error_rows(self) -> int:
        """Rewrites the file without its error rows (atomically), so they run again."""
        kept = self.path.with_name(self.path.name + ".retry")
        dropped = 0
        with open(kept, "w", encoding="utf-8") as out:
            for _, row in output_rows(self.path):
                if self.format.is_error(row):
                    dropped += 1
                else:
                    out.write(json_line(row) + "\n")
        os.replace(kept, self.path)
        return dropped

    def write(self, row: dict) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path} was opened read-only")
        self._file.write(json_line(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
