"""Windows and subtitle timestamps (transcripts.py) and the task prompts (tasks.py), engine-free."""

import numpy as np
import pytest

from mdlserve.server.tasks import Task, TaskPromptError, asr_instruction, task_instruction
from mdlserve.server.transcripts import SAMPLE_RATE, Segment, srt, vtt, windows


@pytest.mark.parametrize(
    ("seconds", "bounds"),
    [
        (0.5, [(0.0, 0.5)]),
        (30.0, [(0.0, 30.0)]),
        (60.0, [(0.0, 30.0), (30.0, 60.0)]),
        (61.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 61.0)]),
    ],
)
def test_windows_cover_the_audio(seconds, bounds):
    samples = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    parts = windows(samples)
    assert [(w.start, w.end) for w in parts] == bounds
    assert sum(w.samples.size for w in parts) == samples.size


def test_timestamps_past_an_hour_and_rounding():
    segments = [Segment(3725.0004, 3726.9996, " hello "), Segment(3727.0, 3730.5, "")]
    assert srt(segments) == "1\n01:02:05,000 --> 01:02:07,000\nhello\n\n2\n01:02:07,000 --> 01:02:10,500\n\n"
    assert vtt(segments) == "WEBVTT\n\n01:02:05.000 --> 01:02:07.000\nhello\n\n01:02:07.000 --> 01:02:10.500\n\n"


def test_task_prompts():
    assert asr_instruction("vi") == "Transcribe the speech into text <|vi|>"
    assert task_instruction(Task.qa, "Who speaks?") == "Who speaks? Answer with 1-2 sentences"
    with pytest.raises(TaskPromptError, match="needs the question"):
        task_instruction(Task.multiple_choice, None)
    with pytest.raises(TaskPromptError, match="fixed prompt"):
        task_instruction(Task.gender, "Is it a man?")
