"""The batch job: rows in, engine in this process, rows out, a summary at the end.

The pipeline, per row: load and decode its audio (the gateway's RequestBuilder on a
process pool: limits, prompt, tokens, sampling), wait for an engine slot, generate, append
the output row. At most `read_ahead` rows are loading or decoded and waiting, and at most
`max_in_flight` are in the engine, so memory is bounded by those two numbers and not by
the input's size. Input rows are read in a worker thread, one at a time, so a slow input
(stdin, a network mount) never holds the event loop that drives the engine.
"""

import asyncio
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from mdlserve.server.batch.ids import Shard
from mdlserve.server.batch.inputs import STDIN, InputError, InputSpec, Row, read_rows
from mdlserve.server.batch.items import BadRow, BatchItem, Completion, Result, RowError
from mdlserve.server.batch.options import BatchOptions
from mdlserve.server.batch.outputs import OutputFileError, OutputFormat, ResultWriter, json_line, output_format
from mdlserve.server.batch.presets import PresetError
from mdlserve.server.batch.progress import Progress
from mdlserve.server.batch.selection import Counts, select
from mdlserve.server.errors import ApiError, EngineAborted, EngineDead
from mdlserve.server.settings import Settings, default_decode_workers

logger = logging.getLogger("mdlserve.batch")

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
FAILURES_LISTED = 20
END = object()


class UsageError(ValueError):
    """Options or files that make the whole job impossible: exit code 2, nothing run."""


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    failures_by_code: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)
    stopped: str | None = None

    def fail(self, row_id: str, error: RowError) -> None:
        self.failed += 1
        self.failures_by_code[error.code] += 1
        if len(self.failures) < FAILURES_LISTED:
            self.failures.append({"id": row_id, "code": error.code, "message": error.message})


def input_spec(options: BatchOptions) -> InputSpec:
    return InputSpec(
        input=options.input,
        format=options.format,
        audio_root=options.audio_root,
        task=options.task,
        lang=options.lang,
        prompt=options.prompt,
        sampling=options.sampling_defaults(),
    )


def shard_path(path: Path, shard: Shard) -> Path:
    """`{shard}` in a path becomes the shard index (one file per pod of an Indexed Job)."""
    return Path(str(path).replace("{shard}", str(shard.index)))


def output_path(options: BatchOptions, shard: Shard) -> Path:
    return shard_path(options.output, shard)


class BatchJob:
    """Checks its options when built: a UsageError comes before anything heavy is imported
    (the audio, request and engine modules import torch and load only when a run needs them;
    `settings` may be a function that builds them, called once the input and format checks
    have passed, because deriving their defaults imports the model's processor, i.e. torch
    too)."""

    def __init__(self, options: BatchOptions, settings: Settings | Callable[[], Settings]):
        self.options = options
        self.started = time.monotonic()
        try:
            self.shard = Shard.parse(options.shard)
            self.spec = input_spec(options)
            self.spec.default_prompt()  # an unknown --task or --lang fails now, not on every row
            self.kind = self.spec.resolved_format()
            self.format: OutputFormat = output_format(self.kind, options.model_name)
            self.output = output_path(options, self.shard)
            self.summary_path = shard_path(options.summary, self.shard) if options.summary is not None else None
            self._check_paths()
            # Before the writer, which may cut a torn line or drop error rows for a retry:
            # settings that fail leave the output file as it was.
            self.settings = settings() if callable(settings) else settings
            self.writer = ResultWriter(
                self.output, self.format, retry_errors=options.retry_errors, read_only=options.dry_run
            )
        except (ValueError, InputError, OutputFileError, PresetError) as exc:
            raise UsageError(str(exc)) from None
        if self.writer.torn_bytes:
            logger.warning(
                "cut a torn last line (%d bytes) from %s: that row runs again", self.writer.torn_bytes, self.output
            )
        self.tally = Tally()
        self.interrupted: signal.Signals | None = None  # SIGINT or SIGTERM stopped the run
        self.counts = Counts()
        # The first pass's counts (the whole input, before the run reads it): what is left when
        # the run stops early; None for stdin, which cannot be read twice.
        self.planned: Counts | None = None
        self.startup_s = 0.0
        self.run_s = 0.0

    def _check_paths(self) -> None:
        problem = output_path_problem("--output", self.output, self.options.input)
        if self.summary_path is not None:
            problem = problem or output_path_problem("--summary", self.summary_path, self.options.input, self.output)
        if problem:
            raise UsageError(problem)

    def rows(self) -> Iterator[Row]:
        return read_rows(self.spec)

    def count(self) -> Counts:
        """A first pass over the input (no audio): how many rows this run has to do."""
        counts = Counts()
        for _ in select(self.rows(), self.shard, self.writer.done, counts):
            pass
        return counts

    # ------------------------------------------------------------ the run

    async def run(self) -> dict:
        """Counts, starts the decode pool and the engine, runs, stops them."""
        if self.options.dry_run:
            self.counts = self.count()
            return self.summary()
        from mdlserve.server.batch.loading import ProcessDecodePool

        # SIGTERM (kill, a pod evicted) and SIGINT (Ctrl-C) cancel the run: the engine and the
        # decode processes are shut down, not left running. SIGINT is ours rather than
        # asyncio.run's so that the signal is on record when it arrives: a terminal's Ctrl-C
        # also reaches the engine core, and its death must not be read as the engine failing.
        run = asyncio.current_task()
        if run is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, self._interrupt, run, sig)
        self.plan()
        started = time.monotonic()
        decoder = ProcessDecodePool(self.options.decode_workers or default_decode_workers())
        decoder.warm_up()
        engine = self._engine()
        try:
            await engine.start()
            self.startup_s = time.monotonic() - started
            return await self.execute(engine, decoder)
        finally:
            engine.shutdown()
            decoder.shutdown()

    def _interrupt(self, run: asyncio.Task, sig: signal.Signals) -> None:
        if self.interrupted is not None:  # a second one: the first waits on a stalled input (stdin)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        self.interrupted = sig
        run.cancel()

    def plan(self) -> None:
        """The first pass over the input (not stdin): the progress total, and the rows left
        in the summary of a run that stops early."""
        if self.planned is None and self.options.input != STDIN:
            self.planned = self.count()

    def stop(self, sig: signal.Signals) -> dict:
        """The summary of a run that a signal stopped: the rows written so far stay (each is
        whole), the rows in flight are not written; a rerun resumes."""
        self.interrupted = sig
        self.tally.stopped = f"interrupted by {sig.name}; rerun the same command to resume"
        return self.summary()

    async def execute(self, engine, decoder) -> dict:
        """The run itself, on an engine and decode pool that are up (tests share theirs)."""
        from mdlserve.server.batch.loading import batch_fetcher
        from mdlserve.server.request import RequestBuilder

        self.plan()
        total = self.planned.todo if self.planned is not None else None
        fetcher = batch_fetcher(self.settings.fetch_timeout, self.settings.fetch_max_bytes)
        self.builder = RequestBuilder(self.settings, decoder, fetcher)
        self.engine = engine
        self.progress = Progress(total, self.options.progress, self.options.log_interval)
        run_started = time.monotonic()
        try:
            await self._pipeline()
        finally:
            self.run_s = time.monotonic() - run_started
            self.progress.close()
            self.writer.close()
            await fetcher.aclose()
        return self.summary()

    def _engine(self):
        from mdlserve.server.engine import VllmEngine
        from mdlserve.server.metrics import GatewayMetrics

        return VllmEngine(self.settings, GatewayMetrics())

    async def _pipeline(self) -> None:
        read_ahead = asyncio.Semaphore(self.options.read_ahead or self.options.max_in_flight)
        in_flight = asyncio.Semaphore(self.options.max_in_flight)
        tasks: set[asyncio.Task] = set()
        rows = iter(select(self.rows(), self.shard, self.writer.done, self.counts))
        try:
            while self.tally.stopped is None:
                row = await asyncio.to_thread(next, rows, END)
                if row is END:
                    break
                if isinstance(row, BadRow):
                    self._write_failure(row, row.error)
                    continue
                await read_ahead.acquire()
                task = asyncio.create_task(self._process(row, read_ahead, in_flight))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        finally:  # cancelled (a signal) or failed: the rows in flight stop before the file closes
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _process(self, item: BatchItem, read_ahead: asyncio.Semaphore, in_flight: asyncio.Semaphore) -> None:
        holds_read_ahead = True
        try:
            prepared = await self._prepare(item)
            await in_flight.acquire()
            read_ahead.release()
            holds_read_ahead = False
            try:
                result = await self._generate(prepared)
            finally:
                in_flight.release()
            self.writer.write(self.format.ok_row(item, result))
            self.tally.ok += 1
            self.tally.audio_seconds += result.audio_seconds
            self.progress.advance(result.audio_seconds)
        except RowError as exc:
            self._write_failure(item, exc)
        except EngineAborted as exc:  # this row only; --retry-errors runs it again
            self._write_failure(item, RowError("engine_aborted", exc.message))
        except EngineDead:
            self.tally.stopped = self.tally.stopped or "the engine stopped; rerun the same command to resume"
        except ApiError as exc:  # the row's fault found by the engine: a response_format it cannot follow
            self._write_failure(item, RowError(exc.code or "invalid_row", exc.message))
        except BrokenProcessPool:  # a decode worker died (killed, or crashed in a codec): stop, do not fail every row
            self.tally.stopped = self.tally.stopped or "the audio decode pool broke; rerun the same command to resume"
        except Exception as exc:  # our bug: recorded as such on the row, the job goes on
            logger.exception("row %s failed unexpectedly", item.id)
            self._write_failure(item, RowError("internal_error", f"{type(exc).__name__}: {exc}"))
        finally:
            if holds_read_ahead:
                read_ahead.release()

    async def _prepare(self, item: BatchItem):
        from mdlserve.server.batch.loading import audio_source

        try:
            leading = audio_source(item.audio, self.builder.fetcher) if item.audio is not None else None
            conversation = self.builder.conversation(item.messages, param="messages", leading_audio=leading)
            # Rows are written whole: only the finished answer is needed.
            return await self.builder.prepare(conversation, item.sampling, self.engine.tokenizer, final_only=True)
        except EngineDead:
            raise
        except ApiError as exc:
            raise RowError(exc.code or "invalid_row", exc.message) from None

    async def _generate(self, prepared) -> Result:
        request_id = f"batch-{uuid.uuid4().hex}"
        arrival = time.time()
        completions: dict[int, Completion] = {}
        prompt_tokens = prepared.prompt_tokens
        async for step in self.engine.generate(prepared, request_id, arrival):
            prompt_tokens = step.prompt_tokens or prompt_tokens
            for delta in step.completions:
                completion = completions.setdefault(delta.index, Completion())
                completion.text += delta.text
                completion.tokens += delta.num_tokens
                completion.finish_reason = delta.finish_reason or completion.finish_reason
        return Result(
            request_id,
            int(arrival),
            prompt_tokens,
            prepared.audio_seconds,
            [completions[i] for i in sorted(completions)],
        )

    def _write_failure(self, row: BatchItem | BadRow, error: RowError) -> None:
        self.writer.write(self.format.error_row(row, error))
        self.tally.fail(row.id, error)
        self.progress.advance(0.0)

    # ------------------------------------------------------------ the summary

    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        if self.tally.stopped:
            return EXIT_STOPPED
        return EXIT_ROWS_FAILED if self.tally.failed or self.counts.duplicates else EXIT_OK

    def left(self) -> tuple[int | None, int | None]:
        """(rows not processed, rows not read): the rows to do that this run did not answer
        (what a rerun has to do) and the input rows it never reached. A run that read its whole
        input knows them; one that stopped early (a signal, a dead engine) takes them from the
        first pass, and stdin had none: None, not known."""
        processed = self.tally.ok + self.tally.failed
        if self.options.dry_run or (self.interrupted is None and self.tally.stopped is None):
            return max(0, self.counts.todo - processed), 0
        if self.planned is None:
            return None, None
        return max(0, self.planned.todo - processed), max(0, self.planned.rows - self.counts.rows)

    def summary(self) -> dict:
        processed = self.tally.ok + self.tally.failed
        not_processed, not_read = self.left()
        hours = self.tally.audio_seconds / 3600
        return {
            "input": self.options.input, "output": str(self.output), "format": self.kind, "shard": str(self.shard),
            "dry_run": self.options.dry_run, "rows_read": self.counts.rows, "other_shards": self.counts.other_shards,
            "rows": self.counts.todo + self.counts.done_before, "done_before": self.counts.done_before,
            "todo": self.counts.todo, "duplicates": self.counts.duplicates,
            "duplicate_ids": self.counts.duplicate_ids, "error_rows_retried": self.writer.errors_dropped,
            "processed": processed, "not_processed": not_processed, "rows_not_read": not_read,
            "ok": self.tally.ok, "failed": self.tally.failed,
            "failures_by_code": dict(self.tally.failures_by_code), "failures": self.tally.failures,
            "audio_hours": round(hours, 6),
            "clips_per_s": round(processed / self.run_s, 3) if self.run_s else None,
            "audio_hours_per_s": round(hours / self.run_s, 6) if self.run_s else None,
            "startup_s": round(self.startup_s, 3), "run_s": round(self.run_s, 3),
            "wall_s": round(time.monotonic() - self.started, 3),
            "stopped": self.tally.stopped, "exit_code": self.exit_code(),
        }  # fmt: skip


def output_path_problem(flag: str, path: Path, input: str, output: Path | None = None) -> str | None:
    """The output and the summary must not be the input file (its rows would count as done,
    the torn-line repair could cut its last line, the summary would overwrite it), and the
    summary must not be the output or a folder."""
    if input != STDIN and _same_file(path, Path(input)):
        return f"{flag} {path} is the input file; write to another file"
    if output is not None and _same_file(path, output):
        return f"{flag} {path} is the --output file"
    if output is not None and path.is_dir():
        return f"{flag} {path} is a folder"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def run_batch(options: BatchOptions, settings: Settings | Callable[[], Settings]) -> int:
    """Runs the job, prints the summary as one JSON line on stdout (and to --summary)."""
    job = None
    try:
        job = BatchJob(options, settings)
        summary = asyncio.run(job.run())
    except (UsageError, InputError) as exc:
        logger.error("%s", exc)
        summary = {"input": options.input, "error": str(exc), "exit_code": EXIT_USAGE}
    except KeyboardInterrupt:  # Ctrl-C before BatchJob.run took SIGINT over
        if job is None:
            raise
        summary = job.stop(signal.SIGINT)
    except asyncio.CancelledError:  # SIGTERM or SIGINT (BatchJob._interrupt)
        if job is None or job.interrupted is None:
            raise
        summary = job.stop(job.interrupted)
    if job is not None and job.interrupted is not None and summary["exit_code"] != 128 + job.interrupted:
        summary = job.stop(job.interrupted)  # the run ended as the signal came (its engine stopped by it too)
    if job is not None and job.interrupted is not None:
        left = summary["not_processed"]
        if left is None:
            logger.error("batch: %s (the rows not processed are not counted: the input is stdin)", summary["stopped"])
        else:
            logger.error("batch: %s (%d rows not processed)", summary["stopped"], left)
    text = json_line(summary)
    print(text, flush=True)
    if options.summary is not None:
        path = job.summary_path if job is not None and job.summary_path else options.summary
        if job is None and output_path_problem("--summary", path, options.input, options.output):
            return summary["exit_code"]  # the error above may be this path's: it is not written
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError as exc:
            logger.error("cannot write the summary to %s: %s", path, exc.strerror or exc)
            return summary["exit_code"] or EXIT_USAGE
    return summary["exit_code"]
