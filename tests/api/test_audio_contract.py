"""The audio endpoints through the official `openai` client (and httpx for our own
endpoint) on the tiny model: transcriptions use the authors' ASR prompt and language tag,
every response format, segments per 30 s window, streamed transcript events,
translations, and the analysis endpoint's task presets with its old path as an alias.

The model is tiny and random, so "uses prompt X" is checked as "answers exactly what a
greedy chat completion with prompt X answers"."""

import re

import numpy as np
import openai
import pytest
from clips import make_clip
from gateway.helpers import MODEL, audio_file, audio_part, wav_bytes

from mdlserve.server.tasks import TASK_PROMPTS, TRANSLATION_PROMPT, Task

LIMIT = {"max_completion_tokens": 6}
SHORT = audio_file(seconds=2.0)
LONG = audio_file(seconds=40.0)  # two windows: 0-30 s and 30-40 s


def chat_answer(oai, text: str, audio: bytes = SHORT, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [audio_part(audio), {"type": "text", "text": text}]})
    answer = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, **LIMIT)
    return answer.choices[0].message.content


def transcribe(oai, audio: bytes = SHORT, **fields):
    return oai.audio.transcriptions.create(model=MODEL, file=("clip.wav", audio), extra_body=LIMIT, **fields)


def test_transcription_uses_the_asr_prompt_and_language_tag(oai):
    """A transcript's text is the answer stripped, as every window of a longer file is."""
    english = transcribe(oai, language="en")
    assert english.text == chat_answer(oai, "Transcribe the speech into text <|en|>").strip()
    chinese = transcribe(oai, language="zh")
    assert chinese.text == chat_answer(oai, "Transcribe the speech into text <|zh|>").strip()
    untagged = transcribe(oai)
    assert untagged.text == chat_answer(oai, "Transcribe the speech into text").strip()
    assert english.usage.output_tokens <= 6 and english.usage.input_tokens > 10


def test_transcription_prompt_is_context(oai):
    with_context = transcribe(oai, language="en", prompt="Speakers: Ada, Grace.")
    assert with_context.text == chat_answer(
        oai, "Transcribe the speech into text <|en|>", system="Speakers: Ada, Grace."
    ).strip()


def test_transcription_temperature_and_seed_are_honoured(oai):
    fields = {"max_completion_tokens": 8, "seed": 3}
    hot = [oai.audio.transcriptions.create(model=MODEL, file=("a.wav", SHORT), temperature=1.5, extra_body=fields).text
           for _ in range(2)]  # fmt: skip
    assert hot[0] == hot[1]  # same seed, same answer
    assert hot[0] != transcribe(oai).text or hot[0] != oai.audio.transcriptions.create(
        model=MODEL, file=("a.wav", SHORT), temperature=1.5, extra_body={**fields, "seed": 4}).text  # fmt: skip


def test_unknown_language_is_a_400(oai):
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(oai, language="english")
    assert err.value.body["param"] == "language" and "ISO-639-1" in err.value.body["message"]


def test_unknown_form_field_is_a_400(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.audio.transcriptions.create(model=MODEL, file=("a.wav", SHORT), extra_body={**LIMIT, "diarize": "true"})
    assert err.value.body["param"] == "diarize"


def test_text_srt_vtt_and_verbose_json_of_a_long_file(oai):
    verbose = transcribe(oai, LONG, language="en", response_format="verbose_json", timestamp_granularities=["segment"])
    assert [(s.start, s.end) for s in verbose.segments] == [(0.0, 30.0), (30.0, 40.0)]
    assert [s.id for s in verbose.segments] == [0, 1] and verbose.segments[1].seek == 3000
    assert verbose.duration == 40.0 and verbose.language == "en" and verbose.task == "transcribe"
    first, second = (s.text.strip() for s in verbose.segments)
    assert first == chat_answer(oai, "Transcribe the speech into text <|en|>", audio_file(seconds=30.0)).strip()
    assert verbose.text == " ".join(t for t in (first, second) if t)
    assert transcribe(oai, LONG, language="en", response_format="text") == verbose.text
    assert first and second, "the cues below need text in both windows"
    srt = transcribe(oai, LONG, language="en", response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:30,000\n{first}\n\n2\n00:00:30,000 --> 00:00:40,000\n{second}\n"
    vtt = transcribe(oai, LONG, language="en", response_format="vtt")
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:30.000\n{first}\n\n00:00:30.000 --> 00:00:40.000\n{second}\n"


def test_streamed_transcript_events(oai):
    whole = transcribe(oai, LONG, language="en")
    events = list(transcribe(oai, LONG, language="en", stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events[len(deltas) :]] == ["transcript.text.done"]
    done = events[-1]
    assert "".join(e.delta for e in deltas) == done.text == whole.text
    assert done.usage.output_tokens == whole.usage.output_tokens


# Windows the tiny model (2 tokens a window, no language) transcribes as some text or as
# nothing (asserted by the test that uses them): silence gives text ("H!~39", and " m
# happening" for 5 s of it), the clip of seed 10 and a quiet 5 s tone give "".
WINDOW_PARTS = {
    "text": np.zeros(30 * 16000, np.float32),
    "empty": make_clip(30 * 16000, seed=10),
    "short text": np.zeros(5 * 16000, np.float32),
    "short empty": (0.01 * np.sin(2 * np.pi * 440 * np.arange(5 * 16000) / 16000)).astype(np.float32),
}
WINDOW_CASES = {
    "65 s of silence": ("text", "text", "short text"),
    "empty last": ("text", "text", "short empty"),
    "empty first": ("empty", "text"),
    "empty middle": ("text", "empty", "short text"),
    "all empty": ("empty", "empty", "short empty"),
}


def windows_of(case: str) -> bytes:
    return wav_bytes(np.concatenate([WINDOW_PARTS[part] for part in WINDOW_CASES[case]]), 16000)


def transcribe_windows(oai, audio: bytes, **fields):
    return oai.audio.transcriptions.create(model=MODEL, file=("windows.wav", audio),
                                           extra_body={"max_completion_tokens": 2}, **fields)  # fmt: skip


def stripped_texts(oai, audio: bytes) -> tuple[str, list[str]]:
    """verbose_json's text and its segments' texts, stripped."""
    verbose = transcribe_windows(oai, audio, response_format="verbose_json")
    return verbose.text, [s.text.strip() for s in verbose.segments]


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_streamed_transcript_deltas_are_its_text_whichever_windows_are_empty(oai, case):
    """Before, a window after one with text was preceded by a " " delta even when it had none
    of its own (the deltas of "empty last" ended with a space), and the deltas kept each
    window's leading and trailing whitespace, which the done event's text strips (65 s of
    silence: two spaces before "m happening")."""
    audio = windows_of(case)
    text, texts = stripped_texts(oai, audio)
    assert [bool(t) for t in texts] == [not part.endswith("empty") for part in WINDOW_CASES[case]], texts
    assert text == " ".join(t for t in texts if t)
    events = list(transcribe_windows(oai, audio, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events[len(deltas) :]] == ["transcript.text.done"]
    assert "".join(deltas) == events[-1].text == text
    assert all(deltas)


def test_every_format_of_a_transcript_with_an_empty_last_window(oai):
    """json and text answer verbose_json's text (the stream's, above); srt and vtt hold a cue
    per window with text, its stripped text, and none for the empty window (an empty cue
    ended the file for SubRip readers)."""
    audio = windows_of("empty last")
    text, texts = stripped_texts(oai, audio)
    assert transcribe_windows(oai, audio).text == text
    assert transcribe_windows(oai, audio, response_format="text") == text
    assert texts[-1] == "" and all(texts[:-1])
    srt = transcribe_windows(oai, audio, response_format="srt")
    assert re.findall(r"^(\d+)\n\S+ --> \S+\n(.*)$", srt, re.MULTILINE) == [("1", texts[0]), ("2", texts[1])]
    assert "00:01:00,000 --> 00:01:05,000" not in srt
    vtt = transcribe_windows(oai, audio, response_format="vtt")
    assert vtt.startswith("WEBVTT\n") and re.findall(r"^\S+ --> \S+\n(.*)$", vtt, re.MULTILINE) == texts[:-1]


def test_stream_needs_a_streamable_format(oai):
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(oai, stream=True, response_format="srt")
    assert err.value.body["param"] == "response_format"


def test_translation_to_english(oai):
    translated = oai.audio.translations.create(model=MODEL, file=("a.wav", SHORT), extra_body=LIMIT)
    assert translated.text == chat_answer(oai, TRANSLATION_PROMPT)
    verbose = oai.audio.translations.create(model=MODEL, file=("a.wav", LONG), response_format="verbose_json",
                                            extra_body=LIMIT)  # fmt: skip
    assert verbose.task == "translate" and verbose.language == "english" and len(verbose.segments) == 2
    srt = oai.audio.translations.create(model=MODEL, file=("a.wav", SHORT), response_format="srt", extra_body=LIMIT)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,000\n")


def analyse(http, path: str = "/v1/audio/analysis", **form) -> dict:
    response = http.post(path, files={"file": ("a.wav", SHORT)},
                         data={"model": MODEL, "temperature": "0", **LIMIT, **form})  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("task", [Task.caption, Task.music_caption, Task.gender, Task.language_id, Task.sound_tags])
def test_analysis_task_presets_use_the_authors_prompts(oai, http, task):
    answer = analyse(http, task=task.value)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == chat_answer(oai, TASK_PROMPTS[task])


def test_analysis_question_presets_fill_the_slot(oai, http):
    answer = analyse(http, task="qa", prompt="What animal is heard?")
    assert answer["choices"][0]["message"]["content"] == chat_answer(
        oai, "What animal is heard? Answer with 1-2 sentences"
    )
    missing = http.post("/v1/audio/analysis", files={"file": ("a.wav", SHORT)}, data={"model": MODEL, "task": "qa"})
    assert missing.status_code == 400 and "needs the question" in missing.json()["error"]["message"]


def test_old_audio_chat_path_is_an_alias(http):
    assert analyse(http, "/v1/audio/chat", task="caption")["choices"] == analyse(http, task="caption")["choices"]
    assert analyse(http, "/v1/audio/chat", prompt="What is heard?")["choices"][0]["message"]["content"]


def test_analysis_refuses_unknown_tasks_and_mixed_inputs(http):
    bad_task = http.post("/v1/audio/analysis", files={"file": ("a.wav", SHORT)}, data={"model": MODEL, "task": "dance"})
    assert bad_task.status_code == 400 and bad_task.json()["error"]["param"] == "task"
    mixed = http.post("/v1/audio/analysis", files={"file": ("a.wav", SHORT)},
                      data={"model": MODEL, "task": "caption", "messages": "[]"})  # fmt: skip
    assert mixed.status_code == 400 and "not both" in mixed.json()["error"]["message"]
