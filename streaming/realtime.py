"""OpenAI Realtime transcription sessions at `ws://HOST:PORT/v1/realtime`, GA and beta.

The unmodified `openai` SDK connects with `OpenAI(base_url="http://HOST:PORT/v1", api_key=...)`:
GA `client.realtime.connect(extra_query={"intent": "transcription"})` or beta
`client.beta.realtime.connect(model=...)` (which adds `OpenAI-Beta: realtime=v1`). Any query
(`intent`, `model`) and any API key are accepted. The server opens with `session.created` (GA) or
`transcription_session.created` (beta); the client then configures the session:

- GA `session.update` with `session.type = "transcription"` and `audio.input.{format,
  transcription, turn_detection, noise_reduction}`, answered by `session.updated`;
- beta `transcription_session.update` (flat `input_audio_format`, `input_audio_transcription`,
  `turn_detection`), answered by `transcription_session.updated`; a `session.update` in the flat
  shape is taken too. Only the fields present change; `turn_detection: null` means manual commit.

Audio comes as `input_audio_buffer.append` (base64): `audio/pcm` (pcm16 little-endian at 24 kHz;
other rates from 8 to 48 kHz are taken too), `audio/pcmu` / `g711_ulaw`, `audio/pcma` /
`g711_alaw` (8 kHz). It is decoded and resampled to 16 kHz and fed to the same streaming
transcriber as the native protocol.

Items. Each VAD turn (server VAD) or each commit (turn_detection null) is one user item:

- server VAD: `input_audio_buffer.speech_started {item_id, audio_start_ms}` when a segment opens,
  `speech_stopped {item_id, audio_end_ms}`, `input_audio_buffer.committed {item_id,
  previous_item_id}` and `conversation.item.added` (GA) / `conversation.item.created` (beta)
  when it closes; `server_vad` maps `silence_duration_ms` to the silence hangover,
  `prefix_padding_ms` to the pre-roll, `threshold` to the webrtcvad mode (threshold x 4, so 0.5 is
  mode 2); `semantic_vad` maps eagerness to a hangover (low 1200 ms, medium/auto 800, high 500);
- manual (`turn_detection: null`): `input_audio_buffer.commit` closes the item: every speech
  segment since the last commit (webrtcvad still skips silence inside the buffer, so no
  hallucinated text from it) is one item; a commit of less than 100 ms of audio is an error.

Text. `conversation.item.input_audio_transcription.delta` carries only text that will not change
(the stable prefix of the partials, then the rest of the final when it extends what was sent), so
the deltas of an item are append-only; `.completed` carries the authoritative full transcript
(usage in seconds of audio) and is sent once per committed item, in item order, also when the
audio held no speech (empty transcript). GA clients also get `conversation.item.done`. A
connection opened with `?partials=true` also gets the revisable hypothesis as
`x.transcription.partial {item_id, content_index, text, stable}` (unknown types are harmless to
the SDK). If the engine fails, every open item gets `.failed`, then an `error` (server_error),
and the connection closes with 1011.

`input_audio_buffer.clear` drops uncommitted audio (and the open turn's text) and answers
`input_audio_buffer.cleared`. Protocol errors (bad JSON, unknown event types, malformed base64,
audio before the session is set up, bad session fields, an empty commit, binary frames, events
the transcription session does not support) get an OpenAI-style `error` event
`{type: "error", error: {type: "invalid_request_error", code, message, param, event_id}}`, are
logged, and the session goes on; nothing already accepted is lost.

Idle (no event for the idle timeout) closes the open turn under server VAD. On server shutdown
the buffer is committed and transcribed before the close (1001); at the server's maximum session
duration the same, then an `error` (`session_expired`) and a close (1008). A client that
disconnects ends its session at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.engine import Engine
from engines.whisper.decoding import DecodingOptions

from .adapters import WHISPER_LANGUAGES, ItemTranscriber, Outbox, join_text
from .codecs import AudioDecoder, AudioFormatError
from .metrics import Metrics
from .segmenter import (
    SAMPLE_RATE,
    SegmentClosed,
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    SegmentGrew,
    SegmentStarted,
)
from .session import SessionConfig
from .transcriber import Event, Failure, Final, Partial, check_prompt

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100  # OpenAI's minimum for input_audio_buffer.commit
SEMANTIC_HANGOVER_MS = {"low": 1200, "medium": 800, "auto": 800, "high": 500}
GA_FORMATS = {"audio/pcm": "pcm_s16le", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}
BETA_FORMATS = {"pcm16": "pcm_s16le", "g711_ulaw": "mulaw", "g711_alaw": "alaw"}
SETUP_EXAMPLE = (
    '{"type": "session.update", "session": {"type": "transcription", "audio": {"input": '
    '{"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": {"type": "server_vad"}}}}}'
)
UNSUPPORTED_EVENTS = (
    "response.create",
    "response.cancel",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.truncate",
    "conversation.item.retrieve",
    "output_audio_buffer.clear",
)


def realtime_session(connection: ServerConnection, server: Server) -> RealtimeSession:
    return RealtimeSession(connection, server.engine, server.metrics, server.config.session)


class ClientError(Exception):
    """A client event the session cannot take; becomes an `error` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, metric: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.metric = metric  # the breeze_errors_total label


# --- session settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The effective transcription settings of one session."""

    encoding: str = "pcm_s16le"
    rate: int = 24000
    language: str | None = "zh"  # None: detect
    model: str | None = None
    prompt: str | None = None
    turn_detection: dict | None = None  # effective server_vad / semantic_vad settings, None: manual commit
    noise_reduction: dict | None = None
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


def _obj(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise ClientError("invalid_type", f"Invalid type for '{param}': expected an object, got {_json(value)}", param)
    return value


def _json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _opt_str(section: dict, key: str, param: str) -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise ClientError(
            "invalid_type", f"Invalid type for '{param}.{key}': expected a string, got {_json(value)}", f"{param}.{key}"
        )
    return value


def _number(td: dict, key: str, param: str, low: float, high: float, integer: bool) -> float | int | None:
    value = td.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ClientError(
            "invalid_value",
            f"Invalid value for '{param}.{key}': expected {kind} from {low:g} to {high:g}, got {_json(value)}",
            f"{param}.{key}",
        )
    return int(value) if integer else float(value)


def _language(section: dict, param: str, current: str | None) -> str | None:
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
    section = _obj(section, param)
    model = _opt_str(section, "model", param) if "model" in section else settings.model
    prompt = _opt_str(section, "prompt", param) if "prompt" in section else settings.prompt
    try:
        check_prompt(prompt, f"{param}.prompt")
    except ValueError as exc:
        raise ClientError("invalid_value", f"Invalid value for '{param}.prompt': {exc}", f"{param}.prompt") from None
    return replace(settings, model=model, prompt=prompt, language=_language(section, param, settings.language))


def _turn_detection(value: Any, param: str, base: SegmenterConfig) -> dict | None:
    if value is None:
        return None
    td = _obj(value, param)
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
                f"Invalid value for '{param}.eagerness': {_json(eagerness)}; use low, medium, high or auto",
                f"{param}.eagerness",
            )
        return {"type": "semantic_vad", "eagerness": eagerness}
    raise ClientError(
        "invalid_value",
        f"Invalid value for '{param}.type': {_json(kind)}; use \"server_vad\", "
        '"semantic_vad", or turn_detection null for manual commits',
        f"{param}.type",
    )


def segmenter_config(turn_detection: dict | None, base: SegmenterConfig) -> SegmenterConfig:
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


def _noise_reduction(value: Any, param: str) -> dict | None:
    if value is None:
        return None
    value = _obj(value, param)
    if value.get("type") not in (None, "near_field", "far_field"):
        raise ClientError(
            "invalid_value",
            f"Invalid value for '{param}.type': {_json(value.get('type'))}; use near_field or far_field",
            f"{param}.type",
        )
    return value  # accepted and echoed; webrtcvad and Whisper get the audio as it is


def _include(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClientError("invalid_type", f"Invalid type for '{param}': expected a list of strings", param)
    return tuple(value)  # logprobs are not produced: the key is accepted and echoed


def parse_ga(session: dict, settings: Settings, base: SegmenterConfig) -> Settings:
    """A GA `session.update` (`session.type = "transcription"`, `audio.input.*`)."""
    kind = session.get("type")
    if kind not in (None, "transcription"):
        raise ClientError(
            "invalid_value",
            f"Invalid value for 'session.type': {_json(kind)}. This server only "
            'transcribes: use "transcription" (connect with ?intent=transcription)',
            "session.type",
        )
    audio = _obj(session.get("audio", {}), "session.audio")
    section = _obj(audio.get("input", {}), "session.audio.input")
    param = "session.audio.input"
    if "format" in section:
        fmt = _obj(section["format"], f"{param}.format")
        encoding = GA_FORMATS.get(fmt.get("type"))
        if encoding is None:
            raise ClientError(
                "invalid_value",
                f"Invalid value for '{param}.format.type': {_json(fmt.get('type'))}; "
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


def parse_beta(session: dict, settings: Settings, base: SegmenterConfig) -> Settings:
    """A beta `transcription_session.update` (flat fields)."""
    if "input_audio_format" in session:
        value = session["input_audio_format"]
        encoding = BETA_FORMATS.get(value) if isinstance(value, str) else None
        if encoding is None:
            raise ClientError(
                "invalid_value",
                f"Invalid value for 'session.input_audio_format': {_json(value)}; use one of {', '.join(BETA_FORMATS)}",
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


def _transcription_view(settings: Settings, model_name: str) -> dict:
    return {"model": settings.model or model_name, "language": settings.language, "prompt": settings.prompt or ""}


def ga_session(settings: Settings, session_id: str, model_name: str) -> dict:
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


def beta_session(settings: Settings, session_id: str, model_name: str) -> dict:
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


# --- segmentation with turns ------------------------------------------------------------------------


class TurnSegmenter:
    """A `Segmenter` the session can steer: `clear` drops the open segment, `reconfigure` swaps the
    VAD settings at the next point where no segment is open. Segment indices and positions stay
    those of the whole stream across swaps; `observe` sees every event before the transcriber."""

    def __init__(self, config: SegmenterConfig, observe) -> None:
        self._config = config
        self._inner = Segmenter(config)
        self._observe = observe
        self._pending: SegmenterConfig | None = None
        self._offset = 0  # stream sample where the inner segmenter began
        self._fed = 0  # samples fed so far
        self._next_index = 0
        self._indices: dict[int, int] = {}  # inner index -> stream index
        self.open: int | None = None  # stream index of the announced open segment

    def feed(self, audio: np.ndarray) -> list[SegmentEvent]:
        self._fed += audio.size
        return self._translate(self._inner.feed(audio))

    def flush(self) -> list[SegmentEvent]:
        return self._translate(self._inner.flush())

    def clear(self) -> int | None:
        """Forgets the open segment and the audio not yet in a segment; the index it dropped, if any."""
        dropped, self.open = self.open, None
        self._restart(self._pending or self._config)
        return dropped

    def reconfigure(self, config: SegmenterConfig) -> None:
        if config == (self._pending or self._config):
            return
        self._pending = config
        if self.open is None:
            self._restart(config)

    def _restart(self, config: SegmenterConfig) -> None:
        self._config, self._pending = config, None
        self._inner = Segmenter(config)
        self._offset = self._fed
        self._indices.clear()

    def _translate(self, events: list[SegmentEvent]) -> list[SegmentEvent]:
        out: list[SegmentEvent] = []
        for event in events:
            if isinstance(event, (SegmentStarted, SegmentGrew, SegmentClosed)):
                if isinstance(event, SegmentStarted):
                    self._indices[event.index] = self._next_index
                    self._next_index += 1
                index = self._indices[event.index]
                event = replace(
                    event,
                    index=index,
                    start=event.start + self._offset,
                    **({} if isinstance(event, SegmentStarted) else {"end": event.end + self._offset}),
                )
                self.open = None if isinstance(event, SegmentClosed) else index
            else:
                event = replace(event, start=event.start + self._offset, end=event.end + self._offset)
            self._observe(event)
            out.append(event)
        if self.open is None and self._pending is not None:
            self._restart(self._pending)
        return out


# --- the session ------------------------------------------------------------------------------------


@dataclass
class _Item:
    id: str
    start: int  # stream samples
    end: int = 0
    segments: list[int] = field(default_factory=list)
    finals: dict[int, str] = field(default_factory=dict)
    resolved: set[int] = field(default_factory=set)
    sent: dict[int, str] = field(default_factory=dict)  # per segment: text already sent as deltas
    committed: bool = False


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class RealtimeSession:
    """One `/v1/realtime` connection: a transcription session."""

    def __init__(self, connection: ServerConnection, engine: Engine, metrics: Metrics, config: SessionConfig) -> None:
        self.id = _id("sess")
        self._ws = connection
        self._engine = engine
        self._metrics = metrics
        self.config = config
        self._base = config.transcriber.segmenter
        self._out = Outbox(connection, config.max_send_queue)
        self._beta = "realtime=v1" in connection.request.headers.get("OpenAI-Beta", "")
        query = parse_qs(urlsplit(connection.request.path).query)
        self._extension_partials = query.get("partials", ["false"])[-1].lower() in ("1", "true", "yes")
        self._settings = default_settings(config)
        self._configured = False
        self._decoder: AudioDecoder | None = None
        self._segmenter: TurnSegmenter | None = None
        self._transcriber: ItemTranscriber | None = None
        self._buffer_ms = 0.0  # audio appended since the last commit or clear
        self._fed = 0  # 16 kHz samples fed to the transcriber
        self._buffer_start = 0  # where the uncommitted buffer begins, in fed samples
        self._pending: _Item | None = None  # the uncommitted item
        self._committed: deque[_Item] = deque()  # committed, transcription not completed yet
        self._items: dict[int, _Item] = {}  # segment index -> item of uncompleted items
        self._last_item: str | None = None
        self._committing = False
        self._finishing: asyncio.Future | None = None
        self._failed = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._out.start()
        self._event("transcription_session.created" if self._beta else "session.created", session=self._view())
        log.info(
            "realtime %s: connected from %s (%s)", self.id, self._ws.remote_address, "beta" if self._beta else "GA"
        )
        try:
            await self._serve()
        except ConnectionClosed as exc:
            if self._finishing is None:
                log.info("realtime %s: client closed (%s)", self.id, exc)
        except Exception:
            log.exception("realtime %s: internal error", self.id)
            self._server_error("the server failed on this session; reconnect and start again (the failure is logged)")
            self._out.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            if self._transcriber is not None:
                await self._transcriber.aclose()
                self._metrics.sessions_active.dec()
            self._out.close(CloseCode.NORMAL_CLOSURE)
            await self._out.wait()

    async def shutdown(self) -> None:
        """Server stopping: commit the buffer, wait for its transcript, close with 1001."""
        await self._finish()
        self._out.close(CloseCode.GOING_AWAY, "server shutting down")

    async def expire(self, seconds: float) -> None:
        """The server's maximum session duration (streaming.limits): commit and transcribe the buffer,
        then OpenAI's `session_expired` error and a close (1008)."""
        await self._finish()
        self._event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": "session_expired",
                "param": None,
                "message": f"Your session hit the maximum duration of {seconds:g} seconds; connect again to go on.",
                "event_id": None,
            },
        )
        self._out.close(CloseCode.POLICY_VIOLATION, "session expired")

    async def _finish(self) -> None:
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._flush())
        await asyncio.shield(self._finishing)

    async def _flush(self) -> None:
        if self._transcriber is None or self._failed:
            return
        self._feed(self._decoder.flush())
        self._cut()
        if self._pending is not None and self._pending.segments:
            self._commit_item(self._pending)
        await self._transcriber.finish()

    # --- receiving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        idle = self.config.idle_timeout or None
        while True:
            try:
                message = await asyncio.wait_for(self._ws.recv(), idle)
            except asyncio.TimeoutError:
                if self._transcriber is not None and self._vad and self._segmenter.open is not None:
                    log.info("realtime %s: no events for %g s; closing the open turn", self.id, idle)
                    self._cut()
                continue
            if self._finishing is not None:
                continue  # shutting down: the buffer was committed
            event_id = None
            try:
                event = self._parse(message)
                event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                self._dispatch(event)
            except ClientError as exc:
                self._client_error(exc, event_id)
            if self._failed:
                return
            if self._transcriber is not None:
                await self._transcriber.room()  # the engine is far behind: stop reading until it catches up

    def _parse(self, message: str | bytes) -> dict:
        if isinstance(message, bytes):
            raise ClientError(
                "invalid_message",
                "binary frames are not part of the Realtime protocol; send audio as "
                '{"type": "input_audio_buffer.append", "audio": "<base64>"} text frames',
            )
        if len(message) > self.config.max_frame_bytes:
            raise ClientError(
                "message_too_large",
                f"an event of {len(message)} bytes is over this server's limit of "
                f"{self.config.max_frame_bytes} bytes; append audio in chunks of 20-500 ms",
                metric="frame_too_large",
            )
        try:
            event = json.loads(message)
        except ValueError as exc:
            raise ClientError(
                "invalid_json", f"the event is not valid JSON ({exc}); send one JSON object per text frame"
            ) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ClientError("invalid_event", 'an event must be a JSON object with a string "type"', "type")
        return event

    def _dispatch(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.update":
            session = _obj(event.get("session"), "session")
            flat = (
                "type" not in session and "audio" not in session and any(k.startswith("input_audio") for k in session)
            )
            self._configure(
                parse_beta(session, self._settings, self._base)
                if flat
                else parse_ga(session, self._settings, self._base),
                "session.updated",
                beta=flat,
            )
        elif kind == "transcription_session.update":
            self._beta = True
            session = _obj(event.get("session"), "session")
            self._configure(parse_beta(session, self._settings, self._base), "transcription_session.updated", beta=True)
        elif kind == "input_audio_buffer.append":
            self._append(event)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self._clear()
        elif kind in UNSUPPORTED_EVENTS:
            raise ClientError(
                "unsupported_event",
                f"{kind} is not supported: this is a transcription session (it "
                "transcribes input audio and creates no responses)",
                "type",
            )
        else:
            raise ClientError(
                "invalid_event_type",
                f"Invalid value for 'type': {_json(kind)}. A transcription session "
                "takes session.update, transcription_session.update, input_audio_buffer.append, "
                "input_audio_buffer.commit and input_audio_buffer.clear",
                "type",
            )

    def _configure(self, settings: Settings, reply: str, beta: bool) -> None:
        previous = self._settings
        new_format = (settings.encoding, settings.rate) != (previous.encoding, previous.rate)
        if new_format or self._decoder is None:
            try:
                decoder = AudioDecoder(settings.encoding, settings.rate)
            except AudioFormatError as exc:
                raise ClientError(
                    "invalid_value", str(exc), "session.audio.input.format.rate", metric=exc.code
                ) from None
            if self._decoder is not None:
                self._feed(self._decoder.flush())  # the old format's resampler tail
            self._decoder = decoder
        self._settings = settings
        if not self._configured:
            self._configured = True
            self._metrics.sessions.inc()
            log.info(
                "realtime %s: set up: %s at %d Hz, language %s, %s",
                self.id,
                settings.encoding,
                settings.rate,
                settings.language or "auto",
                (settings.turn_detection or {"type": "manual commit"})["type"],
            )
        if self._transcriber is not None:
            self._segmenter.reconfigure(segmenter_config(settings.turn_detection, self._base))
            if self._decoding(settings) != self._decoding(previous):  # from the next turn on
                self._transcriber.set_options(self._decoding(settings))
        self._event(
            reply,
            session=beta_session(settings, self.id, self._engine.name)
            if beta
            else ga_session(settings, self.id, self._engine.name),
        )

    def _decoding(self, settings: Settings) -> DecodingOptions:
        """The transcription settings as decoding options: the language, and the prompt (the
        server's `--prompt` where the session set none)."""
        prompt = self.config.prompt if settings.prompt is None else settings.prompt
        return DecodingOptions(language=settings.language, prompt=prompt)

    def _view(self) -> dict:
        return (beta_session if self._beta else ga_session)(self._settings, self.id, self._engine.name)

    @property
    def _vad(self) -> bool:
        return self._settings.turn_detection is not None

    def _append(self, event: dict) -> None:
        if not self._configured:
            raise ClientError(
                "session_not_configured",
                "input_audio_buffer.append before the session was set up; this "
                f"audio was not accepted. First send {SETUP_EXAMPLE} (beta: transcription_session.update)",
            )
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("invalid_type", "Invalid type for 'audio': expected a base64 string", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientError(
                "invalid_base64", f"'audio' is not valid base64 ({exc}); this chunk was not accepted", "audio"
            ) from None
        if self._transcriber is None:
            self._start()
        width = 2 if self._settings.encoding == "pcm_s16le" else 1
        self._buffer_ms += 1000 * len(data) / width / self._settings.rate
        self._feed(self._decoder.decode(data))

    def _start(self) -> None:
        self._segmenter = TurnSegmenter(segmenter_config(self._settings.turn_detection, self._base), self._on_segment)
        self._transcriber = ItemTranscriber(
            self._engine,
            self._decoding(self._settings),
            self._on_event,
            config=self.config.transcriber,
            metrics=self._metrics,
            segmenter=self._segmenter,
            on_resolved=self._on_resolved,
        )
        self._metrics.sessions_active.inc()

    def _feed(self, audio: np.ndarray) -> None:
        if audio.size and self._transcriber is not None:
            self._fed += audio.size
            self._transcriber.feed(audio)

    def _cut(self) -> None:
        self._committing = True
        try:
            self._transcriber.cut()
        finally:
            self._committing = False

    def _commit(self) -> None:
        if self._buffer_ms < MIN_COMMIT_MS and (self._pending is None or not self._pending.segments):
            raise ClientError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms "
                f"of audio, but the buffer only has {self._buffer_ms:.2f} ms of audio",
            )
        self._feed(self._decoder.flush())
        self._cut()  # under server VAD an open turn commits itself here
        if self._pending is not None or self._buffer_ms >= MIN_COMMIT_MS:
            self._commit_item(self._pending or _Item(_id("item"), self._buffer_start))

    def _clear(self) -> None:
        if self._transcriber is not None:
            self._decoder = AudioDecoder(self._settings.encoding, self._settings.rate)  # drop the resampler's tail
            self._segmenter.clear()
            if self._pending is not None:  # its segments' events are dropped from now on
                for segment in self._pending.segments:
                    self._items.pop(segment, None)
                self._pending = None
        self._buffer_ms = 0.0
        self._buffer_start = self._fed
        self._event("input_audio_buffer.cleared")

    # --- segments, items and text -------------------------------------------------------------

    def _on_segment(self, event: SegmentEvent) -> None:
        """The segmenter's events, as the transcriber gets them (synchronously, in stream order)."""
        if isinstance(event, SegmentStarted):
            if self._pending is None:
                self._pending = _Item(_id("item"), event.start if self._vad else min(event.start, self._buffer_start))
            self._pending.segments.append(event.index)
            self._items[event.index] = self._pending
            if self._vad:
                self._event(
                    "input_audio_buffer.speech_started",
                    item_id=self._pending.id,
                    audio_start_ms=event.start * 1000 // SAMPLE_RATE,
                )
        elif isinstance(event, SegmentClosed):
            item = self._items.get(event.index)
            if item is None or item.committed or not self._vad:
                return
            item.end = event.end
            if not self._committing:
                self._event(
                    "input_audio_buffer.speech_stopped", item_id=item.id, audio_end_ms=event.end * 1000 // SAMPLE_RATE
                )
            self._commit_item(item)

    def _commit_item(self, item: _Item) -> None:
        item.committed = True
        if not item.end:  # a commit, not a VAD turn: the item holds the whole buffer
            item.end = self._fed
        if self._pending is item:
            self._pending = None
        self._buffer_ms = 0.0
        self._buffer_start = item.end
        previous, self._last_item = self._last_item, item.id
        self._event("input_audio_buffer.committed", item_id=item.id, previous_item_id=previous)
        self._event(
            "conversation.item.created" if self._beta else "conversation.item.added",
            item=self._item_view(item, None),
            previous_item_id=previous,
        )
        self._committed.append(item)
        self._complete_ready()

    def _item_view(self, item: _Item, transcript: str | None) -> dict:
        return {
            "id": item.id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript}],
        }

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Failure):
            self._fail(event.error)
            return
        item = self._items.get(event.segment)
        if item is None:  # cleared, or already completed
            return
        if isinstance(event, Partial):
            self._delta(item, event.segment, event.stable)
            if self._extension_partials:
                self._event(
                    "x.transcription.partial",
                    item_id=item.id,
                    content_index=0,
                    text=self._item_text(item, event.segment, event.text),
                    stable=self._item_text(item, event.segment, event.stable),
                )
        elif isinstance(event, Final):
            item.finals[event.segment] = event.text
            self._delta(item, event.segment, event.text)

    def _item_text(self, item: _Item, segment: int, text: str) -> str:
        earlier = [item.finals.get(s, item.sent.get(s, "")) for s in item.segments if s < segment]
        return join_text([*earlier, text])

    def _delta(self, item: _Item, segment: int, text: str) -> None:
        """Sends what `text` adds to what this segment already sent, if it extends it."""
        sent = item.sent.get(segment, "")
        if len(text) <= len(sent) or not text.startswith(sent):
            return  # nothing new, or a correction: only .completed can carry it
        delta = text[len(sent) :]
        if not sent:  # a later segment's first text: a space between two Latin words, as join_text does
            earlier = [s for s in item.segments if s < segment and item.sent.get(s)]
            last = item.sent[earlier[-1]].rstrip()[-1:] if earlier else ""
            if last.isascii() and last.isalnum() and delta[:1].isascii() and delta[:1].isalnum():
                delta = " " + delta
        item.sent[segment] = text
        self._event("conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0, delta=delta)

    def _on_resolved(self, segment: int) -> None:
        item = self._items.get(segment)
        if item is not None:
            item.resolved.add(segment)
            self._complete_ready()

    def _complete_ready(self) -> None:
        """Completes committed items whose segments are all resolved, in item order."""
        while self._committed and all(s in self._committed[0].resolved for s in self._committed[0].segments):
            item = self._committed.popleft()
            transcript = join_text([item.finals[s] for s in item.segments if s in item.finals])
            seconds = round(max(0, item.end - item.start) / SAMPLE_RATE, 3)
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item.id,
                content_index=0,
                transcript=transcript,
                usage={"type": "duration", "seconds": seconds},
            )
            if not self._beta:
                self._event("conversation.item.done", item=self._item_view(item, transcript), previous_item_id=None)
            for s in item.segments:
                self._items.pop(s, None)

    def _fail(self, error: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        items = list(self._committed) + ([self._pending] if self._pending is not None else [])
        for item in items:
            self._event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item.id,
                content_index=0,
                error={
                    "type": "server_error",
                    "code": "transcription_failed",
                    "param": None,
                    "message": "transcription failed on the server (the failure is logged)",
                },
            )
        self._committed.clear()
        self._pending = None
        self._server_error("transcription failed on the server; reconnect and start again (the failure is logged)")
        self._out.close(CloseCode.INTERNAL_ERROR, "transcription failed")

    # --- sending ------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        self._out.send({"type": kind, "event_id": _id("event"), **fields})

    def _client_error(self, exc: ClientError, event_id: str | None) -> None:
        log.warning("realtime %s: error %s: %s", self.id, exc.code, exc)
        self._metrics.errors.labels(exc.metric).inc()
        self._event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": exc.code,
                "message": str(exc),
                "param": exc.param,
                "event_id": event_id,
            },
        )

    def _server_error(self, message: str) -> None:
        self._metrics.errors.labels("internal").inc()
        self._event(
            "error",
            error={
                "type": "server_error",
                "code": "internal_error",
                "message": message,
                "param": None,
                "event_id": None,
            },
        )
