"""The transcription settings of an OpenAI Realtime session (streaming.protocols.realtime): the GA
`session.update` and the beta `transcription_session.update` parsed into `Settings`, each bad field
answered with the `ClientError` OpenAI would send; the session views the server echoes; and the
webrtcvad settings of a turn detection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from ..audio.hypothesis_text import check_prompt
from ..audio.segmenter import SegmenterConfig
from .base import WHISPER_LANGUAGES, SessionConfig

SEMANTIC_HANGOVER_MS = {"low": 1200, "medium": 800, "auto": 800, "high": 500}
GA_FORMATS = {"audio/pcm": "pcm_s16le", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}
BETA_FORMATS = {"pcm16": "pcm_s16le", "g711_ulaw": "mulaw", "g711_alaw": "alaw"}


class ClientError(Exception):
    """A client event the session cannot take; becomes an `error` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, metric: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.metric = metric  # the breeze_errors_total label


@dataclass(frozen=True)
class Settings:
    """The effective transcription settings of one session."""

    encoding: str = "pcm_s16le"
    rate: int = 24000
    language: str | None = "zh"  # None: detect
    model: str | None = None
    prompt: str | None = None
    turn_detection: dict[str, Any] | None = None  # effective server_vad / semantic_vad settings, None: manual commit
    noise_reduction: dict[str, Any] | None = None
    include: tuple[str, ...] = ()


def default_settings(config: SessionConfig) -> Settings:
    base = config.transcriber.segmenter
    vad = {
        "type": "server_vad",
        "threshold": base.aggressiveness / 4,
        "prefix_padding_ms": base.pre_roll_ms,
        "silence_duration_ms": base.hangover_ms,
    }
    return Settings(language=None if config.language == "auto" else config.language, turn_detection=vad)


def json_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClientError(
            "invalid_type", f"Invalid type for '{param}': expected an object, got {short_json(value)}", param
        )
    return value


def short_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _opt_str(section: dict[str, Any], key: str, param: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise ClientError(
            "invalid_type",
            f"Invalid type for '{param}.{key}': expected a string, got {short_json(value)}",
            f"{param}.{key}",
        )
    return value


def _number(td: dict[str, Any], key: str, param: str, low: float, high: float, integer: bool) -> float | int | None:
    value = td.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ClientError(
            "invalid_value",
            f"Invalid value for '{param}.{key}': expected {kind} from {low:g} to {high:g}, got {short_json(value)}",
            f"{param}.{key}",
        )
    return int(value) if integer else float(value)


def _language(section: dict[str, Any], param: str, current: str | None) -> str | None:
    if "language" not in section:
        return current
    language = _opt_str(section, "language", param)
    if language in (None, "", "auto"):
        return None
    if language.lower() not in WHISPER_LANGUAGES:
        raise ClientError(
            "invalid_value",
            f"Invalid value for '{param}.language': {language!r} is not an ISO-639-1 "
            'code this model knows; use for example "zh" or "en", or omit it to detect the language',
            f"{param}.language",
        )
    return language.lower()


def _transcription(section: Any, param: str, settings: Settings) -> Settings:
    if section is None:  # "transcription": null turns transcription off at OpenAI; here it always runs
        return settings
    section = json_object(section, param)
    model = _opt_str(section, "model", param) if "model" in section else settings.model
    prompt = _opt_str(section, "prompt", param) if "prompt" in section else settings.prompt
    try:
        check_prompt(prompt, f"{param}.prompt")
    except ValueError as exc:
        raise ClientError("invalid_value", f"Invalid value for '{param}.prompt': {exc}", f"{param}.prompt") from None
    return replace(settings, model=model, prompt=prompt, language=_language(section, param, settings.language))


def _turn_detection(value: Any, param: str, base: SegmenterConfig) -> dict[str, Any] | None:
    if value is None:
        return None
    td = json_object(value, param)
    kind = td.get("type", "server_vad")
    if kind == "server_vad":
        threshold = _number(td, "threshold", param, 0.0, 1.0, integer=False)
        prefix = _number(td, "prefix_padding_ms", param, 0, 5000, integer=True)
        silence = _number(td, "silence_duration_ms", param, 0, 10000, integer=True)
        aggressiveness = base.aggressiveness if threshold is None else min(3, int(threshold * 4))
        return {
            "type": "server_vad",
            "threshold": aggressiveness / 4 if threshold is None else threshold,
            "prefix_padding_ms": base.pre_roll_ms if prefix is None else prefix,
            "silence_duration_ms": max(base.frame_ms, base.hangover_ms if silence is None else silence),
        }
    if kind == "semantic_vad":
        eagerness = td.get("eagerness", "auto")
        if eagerness not in SEMANTIC_HANGOVER_MS:
            raise ClientError(
                "invalid_value",
                f"Invalid value for '{param}.eagerness': {short_json(eagerness)}; use low, medium, high or auto",
                f"{param}.eagerness",
            )
        return {"type": "semantic_vad", "eagerness": eagerness}
    raise ClientError(
        "invalid_value",
        f"Invalid value for '{param}.type': {short_json(kind)}; use \"server_vad\", "
        '"semantic_vad", or turn_detection null for manual commits',
        f"{param}.type",
    )


def segmenter_config(turn_detection: dict[str, Any] | None, base: SegmenterConfig) -> SegmenterConfig:
    """The webrtcvad segmenter settings of a session's turn detection."""
    if turn_detection is None:
        return base
    if turn_detection["type"] == "semantic_vad":
        hangover, pre_roll, aggressiveness = (
            SEMANTIC_HANGOVER_MS[turn_detection["eagerness"]],
            base.pre_roll_ms,
            base.aggressiveness,
        )
    else:
        hangover = turn_detection["silence_duration_ms"]
        pre_roll = turn_detection["prefix_padding_ms"]
        aggressiveness = min(3, int(turn_detection["threshold"] * 4))
    hangover = max(hangover, base.frame_ms)
    return replace(
        base,
        hangover_ms=hangover,
        pre_roll_ms=pre_roll,
        aggressiveness=aggressiveness,
        end_padding_ms=min(base.end_padding_ms, hangover),
    )


def _noise_reduction(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    section = json_object(value, param)
    if section.get("type") not in (None, "near_field", "far_field"):
        raise ClientError(
            "invalid_value",
            f"Invalid value for '{param}.type': {short_json(section.get('type'))}; use near_field or far_field",
            f"{param}.type",
        )
    return section  # accepted and echoed; webrtcvad and Whisper get the audio as it is


def _include(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClientError("invalid_type", f"Invalid type for '{param}': expected a list of strings", param)
    return tuple(value)  # logprobs are not produced: the key is accepted and echoed


def parse_ga(session: dict[str, Any], settings: Settings, base: SegmenterConfig) -> Settings:
    """A GA `session.update` (`session.type = "transcription"`, `audio.input.*`)."""
    kind = session.get("type")
    if kind not in (None, "transcription"):
        raise ClientError(
            "invalid_value",
            f"Invalid value for 'session.type': {short_json(kind)}. This server only "
            'transcribes: use "transcription" (connect with ?intent=transcription)',
            "session.type",
        )
    audio = json_object(session.get("audio", {}), "session.audio")
    section = json_object(audio.get("input", {}), "session.audio.input")
    param = "session.audio.input"
    if "format" in section:
        fmt = json_object(section["format"], f"{param}.format")
        encoding = GA_FORMATS.get(str(fmt.get("type")))
        if encoding is None:
            raise ClientError(
                "invalid_value",
                f"Invalid value for '{param}.format.type': {short_json(fmt.get('type'))}; "
                f"use one of {', '.join(GA_FORMATS)}",
                f"{param}.format.type",
            )
        rate = fmt.get("rate", 24000) if encoding == "pcm_s16le" else 8000
        settings = replace(settings, encoding=encoding, rate=rate)
    if "transcription" in section:
        settings = _transcription(section["transcription"], f"{param}.transcription", settings)
    if "turn_detection" in section:
        settings = replace(
            settings, turn_detection=_turn_detection(section["turn_detection"], f"{param}.turn_detection", base)
        )
    if "noise_reduction" in section:
        settings = replace(
            settings, noise_reduction=_noise_reduction(section["noise_reduction"], f"{param}.noise_reduction")
        )
    if "include" in session:
        settings = replace(settings, include=_include(session["include"], "session.include"))
    return settings


def parse_beta(session: dict[str, Any], settings: Settings, base: SegmenterConfig) -> Settings:
    """A beta `transcription_session.update` (flat fields)."""
    if "input_audio_format" in session:
        value = session["input_audio_format"]
        encoding = BETA_FORMATS.get(value) if isinstance(value, str) else None
        if encoding is None:
            raise ClientError(
                "invalid_value",
                f"Invalid value for 'session.input_audio_format': {short_json(value)}; use one of {', '.join(BETA_FORMATS)}",
                "session.input_audio_format",
            )
        settings = replace(settings, encoding=encoding, rate=24000 if encoding == "pcm_s16le" else 8000)
    if "input_audio_transcription" in session:
        settings = _transcription(session["input_audio_transcription"], "session.input_audio_transcription", settings)
    if "turn_detection" in session:
        settings = replace(
            settings, turn_detection=_turn_detection(session["turn_detection"], "session.turn_detection", base)
        )
    if "input_audio_noise_reduction" in session:
        settings = replace(
            settings,
            noise_reduction=_noise_reduction(
                session["input_audio_noise_reduction"], "session.input_audio_noise_reduction"
            ),
        )
    if "include" in session:
        settings = replace(settings, include=_include(session["include"], "session.include"))
    return settings


def _transcription_view(settings: Settings, model_name: str) -> dict[str, Any]:
    return {"model": settings.model or model_name, "language": settings.language, "prompt": settings.prompt or ""}


def ga_session(settings: Settings, session_id: str, model_name: str) -> dict[str, Any]:
    if settings.encoding == "pcm_s16le":
        fmt = {"type": "audio/pcm", "rate": settings.rate}
    else:
        fmt = {"type": "audio/pcmu" if settings.encoding == "mulaw" else "audio/pcma"}
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session_id,
        "audio": {
            "input": {
                "format": fmt,
                "transcription": _transcription_view(settings, model_name),
                "turn_detection": settings.turn_detection,
                "noise_reduction": settings.noise_reduction,
            }
        },
        "include": list(settings.include),
    }


def beta_session(settings: Settings, session_id: str, model_name: str) -> dict[str, Any]:
    fmt = {"pcm_s16le": "pcm16", "mulaw": "g711_ulaw", "alaw": "g711_alaw"}[settings.encoding]
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "modalities": ["text"],
        "input_audio_format": fmt,
        "input_audio_transcription": _transcription_view(settings, model_name),
        "turn_detection": settings.turn_detection,
        "input_audio_noise_reduction": settings.noise_reduction,
        "include": list(settings.include),
        "client_secret": None,
    }
