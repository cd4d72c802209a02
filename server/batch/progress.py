"""Progress: a tqdm bar on a terminal, a log line every `interval` seconds otherwise."""

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger("mdlserve.batch")


def rate_text(done: int, audio_seconds: float, elapsed: float) -> str:
    clips = done / elapsed if elapsed > 0 else 0.0
    audio_hours_per_hour = audio_seconds / elapsed if elapsed > 0 else 0.0
    return f"{clips:.2f} clips/s, {audio_hours_per_hour:.1f} audio-h/h"


class Progress:
    def __init__(self, total: int | None, mode: str = "auto", interval: float = 30.0):
        """mode: auto (bar on a terminal, else log lines), bar, log or none."""
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.interval = interval
        self.done = 0
        self.audio_seconds = 0.0
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar = tqdm(total=total, unit="clip", dynamic_ncols=True, smoothing=0.05) if mode == "bar" else None

    def advance(self, audio_seconds: float) -> None:
        self.done += 1
        self.audio_seconds += audio_seconds
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(
                f"{self.audio_seconds / max(now - self.started, 1e-9):.1f} audio-h/h", refresh=False
            )
        elif self.mode == "log" and now - self._last_log >= self.interval:
            self._last_log = now
            logger.info("batch: %s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        text = f"{self.done}"
        if self.total:
            left = self.total - self.done
            eta = left * elapsed / self.done if self.done else float("nan")
            text += f"/{self.total} rows ({100 * self.done / self.total:.1f} %), ETA {eta:.0f} s"
        return f"{text}, {rate_text(self.done, self.audio_seconds, elapsed)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            logger.info("batch: %s", self.line(time.monotonic()))
