"""Loading a row's clips: bytes in the job's process (files in a thread, URLs through the
gateway's fetcher), decoding in a process pool with the gateway's `decode_input`.

`ProcessDecodePool` has the gateway DecodePool's `decode` method, so the gateway's
RequestBuilder runs unchanged on top of it (limits, prompt, tokenization, sampling).
Processes rather than the gateway's threads: this process also runs vLLM's frontend
(request processing and detokenizing for hundreds of requests), whose Python work would
compete for the GIL with the decoders' Python glue.
"""

import asyncio
import multiprocessing
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from mdlserve.server.audio import decode_input
from mdlserve.server.batch.items import AudioRef, RowError
from mdlserve.server.fetch import AudioFetcher, FetchError
from mdlserve.server.request import AudioSource


class ProcessDecodePool:
    def __init__(self, workers: int):
        # forkserver: workers fork from a clean server process, never from this one once
        # it holds vLLM's threads (and, on a GPU, CUDA state).
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mdlserve.server.audio"])
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def warm_up(self) -> None:
        """Starts every worker now, before the engine, so no row pays for it."""
        list(self._pool.map(abs, range(self.workers)))

    async def decode(self, data: bytes | str, max_seconds: float | None = None) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, decode_input, data, max_seconds)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
