"""Evaluation inputs: a manifest, or a folder of WAV files with a transcript beside each.

- Manifest (`.jsonl`): one JSON object a line with `audio` (a path relative to the manifest's
  folder, or absolute), `text` (the reference transcript) and `lang` (`zh`, `mix` for
  Mandarin-English code-switching, or `en`; default `zh`). Other fields are ignored.
- Folder: every `*.wav` in it (sorted by name, not recursive) with `NAME.txt` beside it holding the
  reference. `lang` is `zh` when the transcript holds a CJK character, else `en` (zh and mix score
  alike).

`eval`, `replay` and `bench-offline` read their inputs here, before any model loads, so that a
missing file is reported at once (docs/evaluation.md). Standard library only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

LANGS = ("zh", "mix", "en")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")


@dataclass(frozen=True)
class Clip:
    audio: Path
    text: str
    lang: str  # zh | mix | en
    prompt: str | None = None  # names and terms to expect in this clip, in place of the command's --prompt


def read_clips(path: Path) -> list[Clip]:
    """The clips of a manifest file or a folder; ValueError naming the file for anything unusable."""
    if path.is_dir():
        clips = folder_clips(path)
    elif path.is_file():
        clips = manifest_clips(path)
    else:
        raise ValueError(f"{path}: no such file or folder")
    missing = [str(clip.audio) for clip in clips if not clip.audio.is_file()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} audio file(s) missing, first {missing[0]}")
    if not clips:
        raise ValueError(f"{path}: no clips (a manifest line or a WAV file with a .txt beside it)")
    return clips


def manifest_clips(path: Path) -> list[Clip]:
    clips = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio, text, lang = Path(entry["audio"]), entry["text"], entry.get("lang", "zh")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a manifest line with 'audio' and 'text' ({exc})") from None
        if lang not in LANGS:
            raise ValueError(f"{path}:{number}: lang must be one of {', '.join(LANGS)}, got {lang!r}")
        prompt = entry.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: 'prompt' must be a string, got {prompt!r}")
        clips.append(Clip(audio if audio.is_absolute() else path.parent / audio, text, lang, prompt))
    return clips


def folder_clips(folder: Path) -> list[Clip]:
    clips = []
    for audio in sorted(folder.glob("*.wav")):
        transcript = audio.with_suffix(".txt")
        if not transcript.is_file():
            raise ValueError(f"{audio}: no transcript {transcript.name} beside it")
        text = transcript.read_text(encoding="utf-8").strip()
        clips.append(Clip(audio, text, "zh" if _CJK.search(text) else "en"))
    return clips
