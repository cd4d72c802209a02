"""Task presets of batch jobs: the gateway's tasks (server/tasks.py: the authors' evaluation
prompts) plus an output budget per task, since a job has no client to pick one."""

from mdlserve.server.tasks import (
    ISO_639_1,
    QUESTION_SLOT,
    TASK_PROMPTS,
    Task,
    TaskPromptError,
    asr_instruction,
    task_instruction,
)

DEFAULT_TASK = Task.caption.value
DEFAULT_MAX_TOKENS = 128
MAX_TOKENS = {Task.asr: 256, Task.gender: 16, Task.language_id: 16, Task.sound_label: 32, Task.sound_tags: 64,
              Task.scene: 32, Task.instrument: 32, Task.genre: 32, Task.multiple_choice: 8}  # fmt: skip


class PresetError(ValueError):
    """An unknown task or language, or a task without its question; the message says which."""


def instruction(task: str | None, lang: str | None = None, prompt: str | None = None) -> tuple[str, int]:
    """(the instruction, its default max_tokens) for a row.

    A prompt wins over a fixed task's prompt and fills the question slot of qa and
    multiple_choice; asr takes its language tag from `lang` (ISO-639-1, default en)."""
    try:
        chosen = Task(task or DEFAULT_TASK)
    except ValueError:
        raise PresetError(f"unknown task {task!r}; tasks: {', '.join(t.value for t in Task)}") from None
    max_tokens = MAX_TOKENS.get(chosen, DEFAULT_MAX_TOKENS)
    if prompt and QUESTION_SLOT not in TASK_PROMPTS[chosen]:
        return prompt, max_tokens
    if chosen is Task.asr:
        if lang and lang.lower() not in ISO_639_1:
            raise PresetError(f"unknown asr language {lang!r}; an ISO-639-1 code such as en or zh")
        return asr_instruction((lang or "en").lower()), max_tokens
    try:
        return task_instruction(chosen, prompt), max_tokens
    except TaskPromptError as exc:
        raise PresetError(str(exc)) from None
