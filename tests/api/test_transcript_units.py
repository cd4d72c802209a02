"""Windows, the joined text and its stream, and subtitle timestamps (transcripts.py) and the
task prompts (tasks.py), engine-free."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdlserve.server.tasks import Task, TaskPromptError, asr_instruction, task_instruction
from mdlserve.server.transcripts import SAMPLE_RATE, Segment, StreamedJoin, joined, srt, vtt, windows


@pytest.mark.parametrize(
    ("seconds", "bounds"),
    [
        (0.5, [(0.0, 0.5)]),
        (30.0, [(0.0, 30.0)]),
        (60.0, [(0.0, 30.0), (30.0, 60.0)]),
        (61.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 61.0)]),
        (60.5, [(0.0, 30.0), (30.0, 60.5)]),  # a tail under MIN_LAST_WINDOW_SECONDS joins the window before
        (30.0 + 1 / SAMPLE_RATE, [(0.0, 30.0 + 1 / SAMPLE_RATE)]),  # one sample more was a cue of 0 ms
    ],
)
def test_windows_cover_the_audio(seconds, bounds):
    samples = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    parts = windows(samples)
    assert [(w.start, w.end) for w in parts] == bounds
    assert sum(w.samples.size for w in parts) == samples.size


def streamed(windows_pieces: list[list[str]]) -> list[str]:
    """The deltas StreamedJoin sends for each window's text pieces, in order (none empty)."""
    join, sent = StreamedJoin(), []
    for pieces in windows_pieces:
        join.next_window()
        sent += [piece for text in pieces if (piece := join.piece(text))]
    return sent


def text_of(windows_pieces: list[list[str]]) -> str:
    return joined([Segment(30.0 * i, 30.0 * (i + 1), "".join(p)) for i, p in enumerate(windows_pieces)])


@pytest.mark.parametrize(
    ("windows_pieces", "text"),
    [
        ([["a", " b"], []], "a b"),  # the empty last window of a 65 s silence: no trailing space
        ([[], ["a"], ["b"]], "a b"),  # empty first
        ([["a"], [], ["b"]], "a b"),  # empty middle
        ([["a"], ["b"], []], "a b"),  # empty last
        ([[], [], []], ""),  # all empty
        ([["a"], [" ", "\n"], ["b"]], "a b"),  # a window of whitespace only is empty too
        ([[" a", " "], ["  b ", "c "], [" "]], "a b c"),  # each window's text stripped, inner spaces kept
        ([[" x ", " "]], "x"),  # one window stripped too, as a longer file's windows are
        ([[" ", "x", " y", "\n"]], "x y"),
    ],
)
def test_streamed_text_is_the_joined_text(windows_pieces, text):
    """Before, a window after one with text was preceded by a " " delta even when it had no
    text of its own, so the deltas of [text, empty] ended with a space that the done event's
    text (`joined`) had not; and the deltas kept the whitespace `joined` strips."""
    assert text_of(windows_pieces) == text
    assert "".join(streamed(windows_pieces)) == text


PIECE = st.text(st.sampled_from(["a", "b", " ", "\n", "\u3000", "é"]), max_size=4)


@settings(max_examples=500, derandomize=True, database=None)
@given(st.lists(st.lists(PIECE, max_size=4), min_size=1, max_size=5))
def test_streamed_text_is_the_joined_text_for_any_windows_and_pieces(windows_pieces):
    assert "".join(streamed(windows_pieces)) == text_of(windows_pieces)


def test_timestamps_past_an_hour_and_rounding():
    segments = [Segment(3725.0004, 3726.9996, " hello "), Segment(3727.0, 3730.5, "bye")]
    assert srt(segments) == "1\n01:02:05,000 --> 01:02:07,000\nhello\n\n2\n01:02:07,000 --> 01:02:10,500\nbye\n"
    assert vtt(segments) == "WEBVTT\n\n01:02:05.000 --> 01:02:07.000\nhello\n\n01:02:07.000 --> 01:02:10.500\nbye\n"


def test_windows_without_text_have_no_cue():
    """An empty cue ended a SubRip file for its readers (the blank line after the timing
    line closes the cue); the cues that follow are numbered on."""
    segments = [Segment(0.0, 30.0, " \n"), Segment(30.0, 60.0, "a"), Segment(60.0, 90.0, ""), Segment(90.0, 95.0, "b")]
    assert srt(segments) == "1\n00:00:30,000 --> 00:01:00,000\na\n\n2\n00:01:30,000 --> 00:01:35,000\nb\n"
    assert vtt(segments) == "WEBVTT\n\n00:00:30.000 --> 00:01:00.000\na\n\n00:01:30.000 --> 00:01:35.000\nb\n"
    assert srt(segments[:1]) == "" and vtt(segments[:1]) == "WEBVTT\n"


def test_task_prompts():
    assert asr_instruction("vi") == "Transcribe the speech into text <|vi|>"
    assert task_instruction(Task.qa, "Who speaks?") == "Who speaks? Answer with 1-2 sentences"
    with pytest.raises(TaskPromptError, match="needs the question"):
        task_instruction(Task.multiple_choice, None)
    with pytest.raises(TaskPromptError, match="fixed prompt"):
        task_instruction(Task.gender, "Is it a man?")
