"""Transcripts: audio cut into windows (each transcribed on its own, so each segment has
true start and end times) and the response formats of OpenAI's audio endpoints
(json, text, srt, vtt, verbose_json).

A window is WINDOW_SECONDS long (the last one shorter): speech recognition was evaluated
on utterances up to about that length, and one engine request per window lets vLLM batch
the windows of one long file together.
"""

from dataclasses import dataclass

import numpy as np

from mdlserve.model_plugin.processing import SAMPLE_RATE

WINDOW_SECONDS = 30.0
# A last window shorter than this joins the one before it (which then runs up to 31 s): the
# decoder sees one token per 0.2 s, so such a tail is a few tokens of a word cut at the
# window's start, transcribed with nothing around it, and one under a millisecond became a
# subtitle cue with equal start and end.
MIN_LAST_WINDOW_SECONDS = 1.0


@dataclass
class Window:
    start: float  # seconds
    end: float
    samples: np.ndarray


@dataclass
class Segment:
    start: float
    end: float
    text: str


def windows(samples: np.ndarray, seconds: float = WINDOW_SECONDS) -> list[Window]:
    """Consecutive windows covering `samples` (at least one, even for empty audio), the last
    one at least MIN_LAST_WINDOW_SECONDS long unless it is the only one."""
    size = int(seconds * SAMPLE_RATE)
    starts = list(range(0, max(samples.size, 1), size))
    if len(starts) > 1 and samples.size - starts[-1] < MIN_LAST_WINDOW_SECONDS * SAMPLE_RATE:
        starts.pop()
    ends = [*starts[1:], samples.size]
    return [Window(s / SAMPLE_RATE, e / SAMPLE_RATE, samples[s:e]) for s, e in zip(starts, ends, strict=True)]


SEPARATOR = " "


def joined(segments: list[Segment]) -> str:
    """A transcript's text: the windows' texts stripped, the empty ones left out, the others
    joined with SEPARATOR. One window is stripped too, so a transcript's text never depends
    on whether the audio was longer than a window."""
    return SEPARATOR.join(s.text.strip() for s in segments if s.text.strip())


class StreamedJoin:
    """`joined` sent piece by piece, for a stream's text deltas: the pieces `piece` returns,
    window after window, concatenate to exactly `joined` of the windows' texts, whichever
    windows are empty (or whitespace only) and however their texts are split into pieces.

    A window's leading whitespace is dropped, its trailing whitespace held back until more
    text of the same window shows it was inside the text, and SEPARATOR goes out just
    before the first text of a window that follows one with text: never after the last
    window with text."""

    def __init__(self) -> None:
        self._any_text = False  # some window has sent text
        self._in_text = False  # the current window has sent text
        self._held = ""  # the current window's trailing whitespace so far

    def next_window(self) -> None:
        self._in_text = False
        self._held = ""

    def piece(self, text: str) -> str:
        """What to send for the current window's next piece of text ("" for nothing)."""
        if not self._in_text:
            text = text.lstrip()
            if not text:
                return ""
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        lead = self._held
        if not self._in_text:
            lead = SEPARATOR if self._any_text else ""
            self._in_text = self._any_text = True
        self._held = text[len(body) :]
        return lead + body


def _timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cues(segments: list[Segment]) -> list[Segment]:
    """The segments with text, stripped: a cue without text is not a cue (SubRip readers
    take the blank line after its timing line for the end of the cue, or of the file)."""
    return [Segment(s.start, s.end, s.text.strip()) for s in segments if s.text.strip()]


def srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`; windows without text have none."""
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
        for i, s in enumerate(_cues(segments), 1)
    ]
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    """WebVTT: the header, then cues with `HH:MM:SS.mmm --> HH:MM:SS.mmm`; windows without
    text have none."""
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in _cues(segments)]
    return "\n".join(["WEBVTT\n", *cues])
