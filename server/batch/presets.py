"""Task presets: the prompts MiDashengLM was evaluated with, from the authors' prompt table
(xiaomi-research/dasheng-lm, evaluate/prompt.csv), so batch outputs are comparable with
their published numbers."""

from pydantic import BaseModel

ASR_LANGUAGES = ("en", "zh", "id", "th", "vi")


class Preset(BaseModel):
    prompt: str
    max_tokens: int = 128
    description: str


PRESETS: dict[str, Preset] = {
    "caption": Preset(prompt="Write an audio caption describing the sound", description="audio caption (AudioCaps, Clotho)"),
    "music-caption": Preset(prompt="Caption this music track", description="music caption (Song Describer, MusicCaps)"),
    "asr": Preset(prompt="Transcribe the speech into text <|{lang}|>", max_tokens=256,
                  description="speech recognition; --lang en|zh|id|th|vi (default en)"),
    "gender": Preset(prompt="What gender is the speaker?", max_tokens=16, description="speaker gender (VoxCeleb)"),
    "same-speaker": Preset(prompt="Are the two speakers in this utterance the same?", max_tokens=16,
                           description="speaker verification (VoxCeleb1)"),
    "language": Preset(prompt="What language is spoken?", max_tokens=16, description="language identification"),
    "sound-label": Preset(prompt="Which label describes the sound?", max_tokens=32,
                          description="single-label sound tagging (VGGSound)"),
    "sound-labels": Preset(prompt="Which labels describe the sound?", max_tokens=64,
                           description="multi-label sound tagging (AudioSet, FSD50K)"),
    "scene": Preset(prompt="what's the environmental sound heard?", max_tokens=32,
                    description="acoustic scene (CochlScene)"),
    "instrument": Preset(prompt="What's the music instrument?", max_tokens=32, description="instrument (NSynth)"),
    "genre": Preset(prompt="What's the music genre?", max_tokens=32, description="music genre (FMA)"),
}
DEFAULT_TASK = "caption"


class PresetError(ValueError):
    """An unknown task or language; the message lists the valid ones."""


def preset_prompt(task: str, lang: str | None = None) -> Preset:
    """The preset for `task` with its prompt filled in (`lang` only matters for asr)."""
    preset = PRESETS.get(task)
    if preset is None:
        raise PresetError(f"unknown task {task!r}; tasks: {', '.join(PRESETS)}")
    if "{lang}" not in preset.prompt:
        return preset
    lang = lang or "en"
    if lang not in ASR_LANGUAGES:
        raise PresetError(f"unknown asr language {lang!r}; languages: {', '.join(ASR_LANGUAGES)}")
    return preset.model_copy(update={"prompt": preset.prompt.format(lang=lang)})
