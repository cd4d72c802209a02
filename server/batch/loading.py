"""Loading a row's clips: bytes in the job's process (files in a thread, URLs through the
gateway's fetcher), decoding in a process pool with the gateway's `decode_input`.

`ProcessDecodePool` has the gateway DecodePool's `decode` method, so the gateway's
RequestBuilder runs unchanged on top of it (limits, prompt, tokenization, sampling).
Processes rather than the gateway's threads: this process also runs vLLM's frontend
(request processing and detokenizing for hundreds of requests), whose Python work would
compete for the GIL with the decoders' Python glue.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
import stat
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import cast
from urllib.parse import unquote, urlsplit

import numpy as np

from mdlserve.server.audio import decode_input
from mdlserve.server.batch.items import AudioRef, RowError
from mdlserve.server.fetch import AudioFetcher, FetchError
from mdlserve.server.request import AudioSource

logger = logging.getLogger("mdlserve.batch")

# How long shutdown() lets a busy worker finish its clip before it terminates it (and then
# waits for it to end before it kills it), and how long it waits for the pool to wind up
# once every worker was killed, so that exit never hangs on the pool.
SHUTDOWN_WAIT_S = 5.0
KILLED_WAIT_S = 30.0


def _leave_ctrl_c_to_the_job() -> None:
    """A terminal's Ctrl-C reaches every process of its group: the job stops the run and
    shuts the pool down, and a worker that took SIGINT itself printed a KeyboardInterrupt
    traceback from its wait for the next clip."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ProcessDecodePool:
    def __init__(self, workers: int):
        # forkserver: workers fork from a clean server process, never from this one once
        # it holds vLLM's threads (and, on a GPU, CUDA state).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mdlserve.server.audio"])
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_leave_ctrl_c_to_the_job)

    def warm_up(self) -> None:
        """Starts every worker now, before the engine, so no row pays for it."""
        list(self._pool.map(abs, range(self.workers)))

    async def decode(self, data: bytes | str, max_seconds: float | None = None) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, decode_input, data, max_seconds)

    def shutdown(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Stops the workers and returns once they and the pool's manager thread have ended:
        nothing of the pool is left to tear down while the interpreter exits. (shutdown(wait=
        False) alone returned while the manager thread was still closing its pipes and joining
        the workers, work that could overlap the job's exit, where Python 3.11's exit hook
        writes to one of those pipes without the lock the manager closes it under: "OSError:
        [Errno 9] Bad file descriptor" or "handle is closed" after the summary.) Clips not
        started are cancelled; a worker still busy after `timeout` seconds (a decode that does
        not end) is terminated, then killed, so that exit never hangs on it."""
        pool = self._pool
        processes = list((pool._processes or {}).values())  # shutdown() drops both references
        # a Thread (typeshed types it as the _ThreadWakeup)
        manager = cast(threading.Thread | None, pool._executor_manager_thread)
        pool.shutdown(wait=False, cancel_futures=True)
        if manager is None:  # no clip was ever submitted: no worker started
            return
        manager.join(timeout)  # it joins the workers once the busy ones are done
        if manager.is_alive():  # a worker still busy: a decode that does not end
            busy = [process for process in processes if process.exitcode is None]
            logger.warning(
                "decode pool: still decoding %g s after shutdown; %d worker(s) terminated", timeout, len(busy)
            )
            for process in busy:
                process.terminate()
            manager.join(timeout)  # a worker that died breaks the pool: the manager winds it up
        if manager.is_alive():
            for process in processes:
                if process.exitcode is None:
                    process.kill()
            manager.join(KILLED_WAIT_S)
        if manager.is_alive():
            logger.warning("the decode pool's manager thread did not end; exiting without it")


def batch_fetcher(timeout: float, max_bytes: int) -> AudioFetcher:
    """The gateway's fetcher, opened up for the operator's own data: private hosts (a
    bucket on the cluster network) and file:// anywhere are allowed."""
    return AudioFetcher(
        timeout=timeout, max_bytes=max_bytes, allowed_domains=[], media_dir=Path("/"), allow_private=True
    )


def read_file(path: str, max_bytes: int) -> bytes:
    """A regular file's bytes: a folder, device or pipe is refused before it is opened (reading
    /dev/zero would never end, opening a FIFO would wait for a writer)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise RowError("unreadable_file", f"cannot read {path}: it is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise RowError("unreadable_file", f"cannot read {path}: not a regular file (a device, pipe or socket)")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # at most one byte over: the file may have grown since stat
        if len(data) > max_bytes:
            size = max(info.st_size, len(data))
            raise RowError("file_too_large", f"{path} is {size} bytes (the limit is {max_bytes}, --fetch-max-bytes)")
        return data
    except FileNotFoundError:
        raise RowError("file_not_found", f"no such file: {path}") from None
    except OSError as exc:
        raise RowError("unreadable_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL character in the path
        raise RowError("unreadable_file", f"cannot read {path!r}: {exc}") from None


def audio_source(ref: AudioRef, fetcher: AudioFetcher) -> AudioSource:
    if ref.kind == "path":

        async def load_path() -> bytes:
            return await asyncio.to_thread(read_file, ref.value, fetcher.max_bytes)

        return AudioSource(ref.param, load_path)

    async def load_url() -> bytes:
        try:
            url = urlsplit(ref.value)
        except ValueError as exc:  # urllib's message names the problem (port, IPv6 literal)
            raise RowError("invalid_audio_url", f"{ref.param}: malformed URL: {exc}") from None
        if url.scheme.lower() == "file":
            return await asyncio.to_thread(read_file, unquote(url.path), fetcher.max_bytes)
        try:
            return await fetcher.fetch(ref.value)
        except FetchError as exc:
            raise RowError("invalid_audio_url", f"{ref.param}: {exc}") from None

    return AudioSource(ref.param, load_url)
