"""The instructions the audio endpoints give the model, taken from the model authors'
evaluation prompts (xiaomi-research/dasheng-lm, evaluate/prompt.csv; summarised in
docs/gateway.md): the model answers best to the wording it was evaluated with.

ASR is "Transcribe the speech into text" followed by a language tag such as `<|en|>`;
`language` on /v1/audio/transcriptions is an ISO-639-1 code that selects the tag.
"""

from enum import StrEnum

ASR_PROMPT = "Transcribe the speech into text"
# Not among the authors' evaluation prompts (they did not evaluate speech translation):
# the ASR wording with English as the target.
TRANSLATION_PROMPT = "Translate the speech into English text"
QUESTION_SLOT = "{question}"

# ISO 639-1: every two-letter language code.
_ISO_639_1_CODES = """
aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee
el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is
it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms
mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk
sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi
yo za zh zu
"""
ISO_639_1 = frozenset(_ISO_639_1_CODES.split())


class Task(StrEnum):
    caption = "caption"
    music_caption = "music_caption"
    asr = "asr"
    sound_tags = "sound_tags"
    sound_label = "sound_label"
    scene = "scene"
    instrument = "instrument"
    genre = "genre"
    gender = "gender"
    language_id = "language_id"
    qa = "qa"
    multiple_choice = "multiple_choice"


# The authors' prompt per task; {question} is filled from the request's `prompt`.
TASK_PROMPTS = {
    Task.caption: "Write an audio caption describing the sound",
    Task.music_caption: "Caption this music track",
    Task.asr: ASR_PROMPT,
    Task.sound_tags: "Which labels describe the sound?",
    Task.sound_label: "Which label describes the sound?",
    Task.scene: "what's the environmental sound heard?",
    Task.instrument: "What's the music instrument?",
    Task.genre: "What's the music genre?",
    Task.gender: "What gender is the speaker?",
    Task.language_id: "What language is spoken?",
    Task.qa: "{question} Answer with 1-2 sentences",
    Task.multiple_choice: "{question}\n Answer with a single Letter:",
}


class TaskPromptError(ValueError):
    """The request's task and prompt do not fit together (the route answers 400)."""


def language_tag(language: str) -> str:
    return f"<|{language}|>"


def asr_instruction(language: str | None) -> str:
    """The authors' ASR prompt; with a language, its tag (`... into text <|en|>`)."""
    return ASR_PROMPT if language is None else f"{ASR_PROMPT} {language_tag(language)}"


def task_instruction(task: Task, prompt: str | None) -> str:
    """The preset's prompt; QA presets put `prompt` (the question, with its options for
    multiple choice) in their slot, and need it."""
    template = TASK_PROMPTS[task]
    if QUESTION_SLOT in template:
        if not prompt:
            raise TaskPromptError(f"task {task.value!r} needs the question in 'prompt'")
        return template.replace(QUESTION_SLOT, prompt)
    if prompt:
        raise TaskPromptError(f"task {task.value!r} has a fixed prompt; send either 'task' or 'prompt'")
    return template
