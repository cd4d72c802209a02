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
    """Consecutive windows covering `samples` (at least one, even for empty audio)."""
    size = int(seconds * SAMPLE_RATE)
    starts = range(0, max(samples.size, 1), size)
    return [Window(s / SAMPLE_RATE, min(s + size, samples.size) / SAMPLE_RATE, samples[s : s + size]) for s in starts]


def joined(segments: list[Segment]) -> str:
    return " ".join(s.text.strip() for s in segments if s.text.strip())


def _timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    """WebVTT: the header, then cues with `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])
