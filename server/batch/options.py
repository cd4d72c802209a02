"""The batch job's one typed options object (the `mdl-serve batch` flags come from it)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mdlserve.server.batch.inputs import Format
from mdlserve.server.batch.outputs import DEFAULT_MODEL_NAME


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(
        description="folder, glob, CSV/JSONL manifest, OpenAI batch file, or - for stdin",
        json_schema_extra={"cli": False},
    )
    output: Path = Field(
        description="output JSONL (appended to; rows already in it are skipped); {shard} is replaced by the shard index"
    )
    format: Format = Field(
        "auto", description="input kind (auto: folder/glob -> files, .csv -> csv, else by the first row's keys)"
    )
    audio_root: str | None = Field(None, description="folder for relative audio paths (default: the input's folder)")
    task: str | None = Field(None, description="task preset for rows without a prompt (default caption)")
    lang: str | None = Field(None, description="language of the asr preset (en, zh, id, th, vi)")
    prompt: str | None = Field(None, description="instruction for rows without a prompt or task (overrides --task)")
    max_tokens: int | None = Field(None, ge=1, description="output tokens per row (default: the task preset's)")
    min_tokens: int | None = Field(None, ge=0, description="no end of sequence before this many tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (default 0: greedy)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling")
    seed: int | None = Field(None, description="sampling seed")
    shard: str | None = Field(
        None, description="I/N: this job takes shard I of N (auto/N: I from JOB_COMPLETION_INDEX)"
    )
    max_in_flight: int = Field(512, ge=1, description="clips in the engine at once (the engine's --max-num-seqs)")
    read_ahead: int | None = Field(
        None, ge=1, description="clips decoded ahead of the engine (default: --max-in-flight)"
    )
    decode_workers: int | None = Field(None, ge=1, description="audio decode processes (default: one per core)")
    model_name: str = Field(
        DEFAULT_MODEL_NAME,
        description="model_name written in dasheng-eval rows and the model of OpenAI batch responses without one",
    )
    summary: Path | None = Field(
        None, description="also write the final JSON summary to this file ({shard}: the shard index)"
    )
    progress: Literal["auto", "bar", "log", "none"] = Field(
        "auto", description="progress display (auto: a bar on a terminal, log lines otherwise)"
    )
    log_interval: float = Field(30.0, gt=0, description="seconds between progress log lines")
    dry_run: bool = Field(False, description="read the input and the output, count rows, start no model")
    retry_errors: bool = Field(
        False, description="run the rows that failed before again (their error rows are removed from the output first)"
    )

    def sampling_defaults(self) -> dict:
        fields = {"max_tokens": self.max_tokens, "min_tokens": self.min_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "seed": self.seed}  # fmt: skip
        return {name: value for name, value in fields.items() if value is not None}
