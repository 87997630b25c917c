"""A WhisperLive-compatible listener (collabora/WhisperLive's WebSocket protocol) on its own port.

Off by default; `breeze-stream serve --whisperlive-port 9090` turns it on. Any path is accepted
(WhisperLive clients connect to `ws://HOST:PORT` with no path). Per connection:

- the first frame is a JSON object with `uid` (required, echoed in every server message);
  `language` (null or "auto" to detect; any Whisper language code), `task` (transcribe or
  translate), `audio_format` (float32, the default; int16; uint8), `send_last_n_segments` (10)
  and `initial_prompt` (null, or names and terms to expect: the decoder's previous-text prompt for
  every segment, as WhisperLive's faster-whisper backend uses it; default `serve --prompt`) are read (with `--api-key-file`, also `token`: streaming.server.auth); every other key (model, use_vad, vad_parameters, max_clients, max_connection_time,
  ...) is accepted and ignored;
- a full listener answers `{"uid", "status": "WAIT", "message": <minutes until a slot frees>}` and
  closes (1013, try again later);
- otherwise `{"uid", "message": "SERVER_READY", "backend": "faster_whisper"}`. The stock clients
  keep completed segments only from a backend named faster_whisper, whose segment shape this is;
  `server` and `model` name the real one;
- binary frames are mono 16 kHz audio in that format, any size;
- the server sends `{"uid", "segments": [...]}` on every partial and final: the last
  `send_last_n_segments` completed segments, then the open one with `completed: false`; times are
  strings with three decimals, seconds from the start of the stream;
- `END_OF_AUDIO`, as a binary or a text frame, flushes the open segment, sends its final
  segments, and closes normally (1000);
- at the session time limit (`--whisperlive-max-connection-time`) the open segment is flushed,
  its segments sent, then `{"uid", "message": "DISCONNECT"}`, and the connection closes (1000);
- with `language` null, `{"uid", "language", "language_prob": null}` is sent once, with the
  language of the first final.

Bad input (a first frame that is not a JSON object with a uid, an unknown language, task or
audio_format, an initial_prompt that is not a string or is too long, a text frame other than END_OF_AUDIO, a frame over the limit) gets
`{"uid", "status": "ERROR", "message": ...}`, a log line, and a close (1008 or 1003, 1009 for size);
the listener keeps serving the others. A client that disconnects ends its session at once; on
server shutdown open segments are flushed and sent, then DISCONNECT and a close with 1001.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from engines.whisper.decoding import DecodingOptions

from ..audio.codecs import AudioDecoder
from ..audio.hypothesis_text import check_prompt
from ..audio.transcriber import Event, Failure, Final, Partial, StreamingTranscriber
from .base import WHISPER_LANGUAGES, ProtocolError, ProtocolSession, SessionContext

log = logging.getLogger(__name__)

END_OF_AUDIO = "END_OF_AUDIO"
AUDIO_FORMATS = ("float32", "int16", "uint8")
FIRST_EXAMPLE = '{"uid": "<uuid>", "language": "zh", "task": "transcribe", "model": "small", "use_vad": true}'


@dataclass(frozen=True)
class WhisperLiveConfig:
    port: int | None = None
    """Port of the listener; None: off."""
    max_clients: int = 4
    """Sessions at once; more get WAIT (WhisperLive's default is 4)."""
    max_connection_time: float = 600.0
    """Seconds a session may last before DISCONNECT (WhisperLive's default is 600)."""

    def __post_init__(self) -> None:
        if self.max_clients < 1 or self.max_connection_time <= 0:
            raise ValueError("the WhisperLive listener needs max_clients >= 1 and max_connection_time > 0")


class Seats:
    """The listener's sessions, for WAIT: at most `config.max_clients` at once, each for at most
    `config.max_connection_time` seconds."""

    def __init__(self, config: WhisperLiveConfig) -> None:
        self.config = config
        self.active: dict[WhisperLiveSession, float] = {}  # session -> start time (monotonic)

    @property
    def full(self) -> bool:
        return len(self.active) >= self.config.max_clients

    def wait_minutes(self) -> float:
        """Minutes until the oldest session reaches its time limit (WhisperLive's estimate)."""
        now = time.monotonic()
        remaining = [self.config.max_connection_time - (now - started) for started in self.active.values()]
        return max(0.0, min(remaining)) / 60 if remaining else 0.0


def _refused(message: str, close_code: int, code: str = "bad_request") -> ProtocolError:
    return ProtocolError(code, message, close_code)


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}"


class WhisperLiveSession(ProtocolSession):
    label = "whisperlive"

    def __init__(self, connection: ServerConnection, context: SessionContext, seats: Seats) -> None:
        super().__init__(connection, context, secrets.token_hex(6), context.config.max_send_queue)
        self._seats = seats
        self._uid: object = None
        self._format = "float32"
        self._last_n = 10
        self._completed: list[dict[str, Any]] = []
        self._detect_language = False
        self._started = time.monotonic()
        self._deadline = self._started + seats.config.max_connection_time

    # --- lifecycle ----------------------------------------------------------------------------

    def _refuse(self, exc: ProtocolError) -> None:
        self._error(exc.code, str(exc), exc.close_code, "bad request")

    def _internal_error(self) -> None:
        self._error(
            "internal",
            "the server failed on this session (the failure is logged)",
            CloseCode.INTERNAL_ERROR,
            "internal error",
        )

    def _error_message(self, code: str, message: str) -> dict[str, Any]:
        return {"uid": self._uid, "status": "ERROR", "message": message}

    async def _teardown(self) -> None:
        self._seats.active.pop(self, None)
        await super()._teardown()

    async def _drain(self) -> None:
        if self._transcriber is not None:
            await self._finish(partial(self._flush, True))

    async def _flush(self, disconnect: bool) -> None:
        assert self._transcriber is not None and self._decoder is not None
        self._transcriber.feed(self._decoder.flush())
        await self._transcriber.finish()
        if disconnect:
            self._send({"message": "DISCONNECT"})
        log.info("whisperlive %s: ended after %.1f s of audio", self.id, self._transcriber.seconds)

    # --- receiving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            first = await asyncio.wait_for(self._ws.recv(), self.config.idle_timeout or None)
        except asyncio.TimeoutError:
            raise _refused(
                f"no options message within {self.config.idle_timeout:g} s; send {FIRST_EXAMPLE} right "
                "after connecting",
                CloseCode.POLICY_VIOLATION,
            ) from None
        options = self._options(first)
        if self._seats.full:
            wait = self._seats.wait_minutes()
            log.info("whisperlive %s: full (%d sessions); WAIT %.1f min", self.id, len(self._seats.active), wait)
            self._metrics.errors.labels("overloaded").inc()
            self._send({"status": "WAIT", "message": wait})
            self._out.close(CloseCode.TRY_AGAIN_LATER, "server full")
            return
        self._seats.active[self] = self._started
        self._begin(options)
        await self._receive_loop()

    def _idle_timeout(self) -> float:
        """The idle timeout, or less where the session's time limit comes first."""
        timeout = self._deadline - time.monotonic()
        if self.config.idle_timeout:
            timeout = min(timeout, self.config.idle_timeout)
        return max(timeout, 0.001)

    async def _on_idle(self) -> bool:
        if time.monotonic() >= self._deadline:
            log.info(
                "whisperlive %s: reached the session limit of %g s", self.id, self._seats.config.max_connection_time
            )
            await self._finish(partial(self._flush, True))
            self._out.close(CloseCode.NORMAL_CLOSURE, "session time limit")
            return True
        assert self._transcriber is not None
        self._transcriber.cut()  # idle: the open segment gets its final; the session goes on
        return False

    async def _on_message(self, message: str | bytes) -> bool:
        assert self._transcriber is not None
        if len(message) > self.config.max_frame_bytes:
            raise _refused(
                f"a frame of {len(message)} bytes is over this server's limit of "
                f"{self.config.max_frame_bytes} bytes; send 4096-sample frames",
                CloseCode.MESSAGE_TOO_BIG,
                "frame_too_large",
            )
        if message in (END_OF_AUDIO, END_OF_AUDIO.encode()):
            await self._finish(partial(self._flush, False))
            self._out.close(CloseCode.NORMAL_CLOSURE)
            return True
        if isinstance(message, str):
            raise _refused(
                f"expected binary audio frames or END_OF_AUDIO, got the text frame {message[:60]!r}",
                CloseCode.UNSUPPORTED_DATA,
            )
        self._transcriber.feed(self._decode(message))
        await self._transcriber.room()  # the engine is far behind: stop reading until it catches up
        return False

    def _options(self, first: str | bytes) -> dict[str, Any]:
        if isinstance(first, bytes):
            try:
                first = first.decode()
            except UnicodeDecodeError:
                raise _refused(
                    f"the first frame must be the JSON options, {FIRST_EXAMPLE}; got audio", CloseCode.UNSUPPORTED_DATA
                ) from None
        try:
            options = json.loads(first)
        except ValueError as exc:
            raise _refused(
                f"the first frame is not valid JSON ({exc}); send {FIRST_EXAMPLE}", CloseCode.INVALID_DATA
            ) from None
        if not isinstance(options, dict) or options.get("uid") in (None, ""):
            raise _refused(
                f'the first frame must be a JSON object with a "uid", {FIRST_EXAMPLE}', CloseCode.POLICY_VIOLATION
            )
        self._uid = options["uid"]
        language = options.get("language")
        if language not in (None, "", "auto") and (
            not isinstance(language, str) or language.lower() not in WHISPER_LANGUAGES
        ):
            raise _refused(
                f'language {language!r} is not a Whisper language code; use for example "zh" or "en", or '
                "null to detect it",
                CloseCode.POLICY_VIOLATION,
            )
        task = options.get("task") or "transcribe"
        if task not in ("transcribe", "translate"):
            raise _refused(f'task must be "transcribe" or "translate", got {task!r}', CloseCode.POLICY_VIOLATION)
        audio_format = options.get("audio_format") or "float32"
        if audio_format not in AUDIO_FORMATS:
            raise _refused(
                f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}",
                CloseCode.POLICY_VIOLATION,
                "unsupported_encoding",
            )
        last_n = options.get("send_last_n_segments", 10)
        if not isinstance(last_n, int) or isinstance(last_n, bool) or last_n < 0:
            raise _refused(
                f"send_last_n_segments must be a non-negative integer, got {last_n!r}", CloseCode.POLICY_VIOLATION
            )
        try:
            prompt = check_prompt(options.get("initial_prompt"), "initial_prompt") or self.config.prompt
        except ValueError as exc:
            raise _refused(str(exc), CloseCode.POLICY_VIOLATION) from None
        return {
            "language": None if language in (None, "", "auto") else language.lower(),
            "task": task,
            "audio_format": audio_format,
            "send_last_n_segments": last_n,
            "prompt": prompt,
        }

    def _begin(self, options: dict[str, Any]) -> None:
        self._format = options["audio_format"]
        self._last_n = options["send_last_n_segments"]
        self._detect_language = options["language"] is None
        self._decoder = AudioDecoder("pcm_s16le" if self._format == "int16" else "pcm_f32le", 16000)
        decoding = DecodingOptions(language=options["language"], task=options["task"], prompt=options["prompt"])
        self._transcriber = StreamingTranscriber(
            self._engine, decoding, self._on_event, config=self.config.transcriber, metrics=self._metrics
        )
        self._metrics.sessions.inc()
        self._metrics.sessions_active.inc()
        log.info(
            "whisperlive %s: started from %s, uid %s, %s, language %s, task %s, prompt of %d characters",
            self.id,
            self._ws.remote_address,
            self._uid,
            self._format,
            options["language"] or "auto",
            options["task"],
            len(options["prompt"]),
        )
        self._send(
            {
                "message": "SERVER_READY",
                "backend": "faster_whisper",
                "server": "breeze-stream",
                "model": self._engine.name,
            }
        )

    def _decode(self, frame: bytes) -> np.ndarray:
        if self._format == "uint8":
            samples: np.ndarray = (np.frombuffer(frame, np.uint8).astype(np.float32) - 128.0) / 128.0
            return samples
        assert self._decoder is not None  # set at the options message
        return self._decoder.decode(frame)

    # --- sending ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Failure):
            self._error(
                "internal",
                "transcription failed on the server (the failure is logged)",
                CloseCode.INTERNAL_ERROR,
                "transcription failed",
            )
            return
        segment = {"start": _fmt(event.start), "end": _fmt(event.end), "text": event.text}
        if isinstance(event, Final):
            self._completed.append({**segment, "completed": True})
            if self._detect_language:
                self._detect_language = False
                self._send({"language": event.transcript.language, "language_prob": None})
            self._send({"segments": self._recent()})
        elif isinstance(event, Partial):
            recent = self._recent()
            if event.text or not recent:  # an empty text retracts the partial (never an empty list)
                recent.append({**segment, "completed": False})
            self._send({"segments": recent})

    def _recent(self) -> list[dict[str, Any]]:
        return self._completed[-max(self._last_n, 1) :]  # clients read segments[-1]: never an empty list

    def _send(self, message: dict[str, Any]) -> None:
        self._out.send({"uid": self._uid, **message})
