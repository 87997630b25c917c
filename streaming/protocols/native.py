"""The native protocol, `ws://HOST:PORT/v1/stream` (docs/native-protocol.md): one connection, one session.

The client sends a `start` text frame, binary audio frames, then a `stop` text frame; the server
answers `ready`, then `partial`/`final` events as the transcriber produces them, and after
`stop` flushes the open segment, sends its final, `end`, and closes normally. A segment whose
partials showed text but whose final decode finds no speech gets a last partial with empty
`text` and `stable` (a retraction) and no final.

Errors end the session: an `error` event with its code (docs/architecture.md) and a message saying
how to fix it, then a close with the matching WebSocket close code (RFC 6455, 7.4.1):

- start message not JSON: bad_request, 1007 (invalid frame payload data);
- binary frame before start, or a text frame other than stop or update where audio is expected:
  bad_request, 1003 (unsupported data: the wrong kind of frame);
- start message not an object or not of type start, fields of the wrong type, unknown
  language, sample rate outside 8-48 kHz, channels != 1: bad_request, 1008 (policy violation);
- unknown encoding: unsupported_encoding, 1003 (unsupported data);
- frame over the limit: frame_too_large, 1009 (message too big); past 4 times the limit
  (streaming.server.app.FRAME_SLACK) the WebSocket layer refuses the frame unread, with 1009 and no
  event;
- no start message within the idle timeout: bad_request, 1008;
- the engine failed on this session's audio: internal, 1011 (internal error);
- the client reads events so slowly that `max_send_queue` of them wait: overloaded, 1013 (try
  again later; reason "send queue full"); the waiting events are dropped, and the connection is
  cut if the error and close have not gone out within streaming.server.gate.REFUSAL_TIMEOUT.

`ServerConfig.limits` (streaming.server.gate) adds what happens before a session starts: keys, the
session and per-client limits (HTTP 401/403/429/503 before the upgrade, or an `unauthorized` /
`overloaded` error event and close 1008 / 1013 after it). A session that reaches the server's
maximum duration flushes its finals, then gets `end` with `"reason": "max_duration"` and a
close 1008. While the engine is behind by more than `max_queued_audio` seconds of this session's
audio, the session stops reading frames (TCP pushes back on the client) rather than queue more;
the server's keepalive does not count that time against the client's pong (streaming.server.keepalive).

Without errors the session closes with 1000 after `end` (on `stop`; on the idle timeout with
`"reason": "idle_timeout"` in `end`), or with 1001 after `end` with `"reason": "shutdown"` when
the server shuts down; all three flush finals first. A client that closes without `stop` ends
the session at once: outstanding decodes are cancelled and nothing more is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from engines.options import LANGUAGES
from engines.whisper.alignment import Word
from engines.whisper.decoding import DecodingOptions

from ..audio.codecs import AudioDecoder, AudioFormatError
from ..audio.hypothesis_text import check_prompt
from ..audio.transcriber import Event, Failure, Final, Partial, StreamingTranscriber
from .base import ProtocolError, ProtocolSession, SessionContext

log = logging.getLogger(__name__)

START_EXAMPLE = '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1, "language": "zh"}'


def segment_event(event: Partial | Final) -> dict[str, Any]:
    """A partial or final as the native protocol sends it (call subscribers get the same; native
    finals add stats and words)."""
    out: dict[str, Any] = {
        "type": "partial" if isinstance(event, Partial) else "final",
        "segment": event.segment,
        "start": round(event.start, 3),
        "end": round(event.end, 3),
        "text": event.text,
    }
    if isinstance(event, Partial):
        out["stable"] = event.stable
    return out


@dataclass(frozen=True)
class Start:
    decoder: AudioDecoder
    language: str
    partials: bool
    prompt: str = ""
    condition_on_previous: bool = False
    words: bool = False


def parse_start(
    message: str | bytes, default_language: str = "zh", default_prompt: str = "", condition_on_previous: bool = False
) -> Start:
    """Validates the first message; every failure says what to send instead."""
    if isinstance(message, bytes):
        raise ProtocolError(
            "bad_request",
            f"got audio before the start message; first send a text frame {START_EXAMPLE}",
            CloseCode.UNSUPPORTED_DATA,
        )
    try:
        start = json.loads(message)
    except ValueError as exc:
        raise ProtocolError(
            "bad_request", f"the start message is not valid JSON ({exc}); send {START_EXAMPLE}", CloseCode.INVALID_DATA
        ) from None
    if not isinstance(start, dict) or start.get("type") != "start":
        raise ProtocolError(
            "bad_request", f"the first message must be a start message, {START_EXAMPLE}", CloseCode.POLICY_VIOLATION
        )
    encoding = start.get("encoding", "pcm_s16le")
    language = start.get("language", default_language)
    partials = start.get("partials", True)
    condition = start.get("condition_on_previous", condition_on_previous)
    words = start.get("words", False)
    if not isinstance(encoding, str):
        raise ProtocolError(
            "bad_request",
            f'encoding must be a string such as "pcm_s16le", got {encoding!r}',
            CloseCode.POLICY_VIOLATION,
        )
    if language not in LANGUAGES:
        raise ProtocolError(
            "bad_request",
            f"language must be one of {', '.join(LANGUAGES)}, got {language!r}",
            CloseCode.POLICY_VIOLATION,
        )
    if not isinstance(partials, bool):
        raise ProtocolError(
            "bad_request", f"partials must be true or false, got {partials!r}", CloseCode.POLICY_VIOLATION
        )
    if not isinstance(condition, bool):
        raise ProtocolError(
            "bad_request", f"condition_on_previous must be true or false, got {condition!r}", CloseCode.POLICY_VIOLATION
        )
    if not isinstance(words, bool):
        raise ProtocolError(
            "bad_request",
            f"words must be true (finals carry word timings) or false, got {words!r}",
            CloseCode.POLICY_VIOLATION,
        )
    try:
        prompt = check_prompt(start["prompt"]) if "prompt" in start else default_prompt
    except ValueError as exc:
        raise ProtocolError("bad_request", str(exc), CloseCode.POLICY_VIOLATION) from None
    try:
        decoder = AudioDecoder(encoding, start.get("sample_rate", 16000), start.get("channels", 1))
    except AudioFormatError as exc:
        close = CloseCode.UNSUPPORTED_DATA if exc.code == "unsupported_encoding" else CloseCode.POLICY_VIOLATION
        raise ProtocolError(exc.code, str(exc), close) from None
    return Start(decoder, language, partials, prompt, condition, words)


def word_list(words: list[Word]) -> list[dict[str, Any]]:
    """Word timings as the protocols send them: text, start and end (stream seconds), probability."""
    return [
        {"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3), "probability": round(w.probability, 3)}
        for w in words
    ]


def control_message(message: str) -> dict[str, Any] | None:
    """A text frame after start as a JSON object with a type (stop, update), else None."""
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and isinstance(parsed.get("type"), str) else None


class NativeSession(ProtocolSession):
    """One `/v1/stream` connection."""

    label = "session"

    def __init__(self, connection: ServerConnection, context: SessionContext) -> None:
        super().__init__(connection, context, secrets.token_hex(6), context.config.max_send_queue)

    async def expire(self, seconds: float) -> None:
        """The session reached the server's maximum duration: flush finals, `end`, close 1008."""
        if self._transcriber is None:
            self._out.close(CloseCode.POLICY_VIOLATION, "max duration")
        else:
            message = f"this server ends sessions after {seconds:g} s; connect again to go on"
            await self._finish(
                partial(self._flush, CloseCode.POLICY_VIOLATION, "max duration", "max_duration", message)
            )

    async def _drain(self) -> None:
        """The server is stopping: flush finals, send `end`, close with 1001 (going away)."""
        if self._transcriber is not None:
            await self._finish(partial(self._flush, CloseCode.GOING_AWAY, "server shutting down", "shutdown"))

    # --- receiving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            message = await asyncio.wait_for(self._ws.recv(), self._idle_timeout())
        except asyncio.TimeoutError:
            raise ProtocolError(
                "bad_request",
                f"no start message within {self.config.idle_timeout:g} s; send {START_EXAMPLE} right after connecting",
                CloseCode.POLICY_VIOLATION,
            ) from None
        self._check_size(message)
        start = parse_start(
            message, self.config.language, self.config.prompt, self.config.transcriber.condition_on_previous
        )
        self._begin(start)
        await self._receive_loop()

    async def _on_idle(self) -> bool:
        log.info("session %s: idle for %g s, ending it", self.id, self.config.idle_timeout)
        await self._finish(partial(self._flush, CloseCode.NORMAL_CLOSURE, "idle timeout", "idle_timeout"))
        return True

    async def _on_message(self, message: str | bytes) -> bool:
        self._check_size(message)
        assert self._transcriber is not None and self._decoder is not None
        if isinstance(message, bytes):
            self._transcriber.feed(self._decoder.decode(message))
            await self._transcriber.room()  # the engine is far behind: stop reading until it catches up
            return False
        control = control_message(message)
        kind = control and control["type"]
        if kind == "stop":
            await self._finish(partial(self._flush, CloseCode.NORMAL_CLOSURE, "", None))
            return True
        if control is not None and kind == "update":
            self._update(control)
            return False
        raise ProtocolError(
            "bad_request",
            f'expected binary audio frames, {{"type": "update", "prompt": "..."}} or '
            f'{{"type": "stop"}} after start, got the text frame {message[:80]!r}; send audio as '
            "binary WebSocket frames",
            CloseCode.UNSUPPORTED_DATA,
        )

    def _check_size(self, message: str | bytes) -> None:
        if len(message) > self.config.max_frame_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"a frame of {len(message)} bytes is over this server's limit of "
                f"{self.config.max_frame_bytes} bytes; send audio in frames of 20-100 ms",
                CloseCode.MESSAGE_TOO_BIG,
            )

    def _update(self, update: dict[str, Any]) -> None:
        """`update`: a new prompt from the next segment on. A bad one is refused with an error event
        and the session goes on with the prompt it had."""
        try:
            if set(update) != {"type", "prompt"}:
                raise ValueError(
                    f'an update takes "prompt" (got the fields {", ".join(sorted(update))}); send '
                    '{"type": "update", "prompt": "names and terms to expect"}'
                )
            prompt = check_prompt(update["prompt"])
        except ValueError as exc:
            log.warning("session %s: refused an update: %s", self.id, exc)
            self._metrics.errors.labels("bad_request").inc()
            self._out.send(
                {"type": "error", "code": "bad_request", "message": f"update refused, the prompt is unchanged: {exc}"}
            )
            return
        assert self._transcriber is not None  # updates come after start
        segment = self._transcriber.set_options(replace(self._transcriber.options, prompt=prompt))
        log.info("session %s: prompt of %d characters from segment %d on", self.id, len(prompt), segment)
        self._out.send({"type": "updated", "prompt": prompt, "segment": segment})

    def _begin(self, start: Start) -> None:
        self._decoder = start.decoder
        options = DecodingOptions(language=None if start.language == "auto" else start.language, prompt=start.prompt)
        config = replace(self.config.transcriber, condition_on_previous=start.condition_on_previous, words=start.words)
        if not start.partials:
            config = replace(config, partial_interval=0.0)
        self._transcriber = StreamingTranscriber(
            self._engine, options, self._on_event, config=config, metrics=self._metrics
        )
        self._metrics.sessions.inc()
        self._metrics.sessions_active.inc()
        log.info(
            "session %s: started from %s, %s at %d Hz, language %s, prompt of %d characters%s",
            self.id,
            self._ws.remote_address,
            start.decoder.encoding,
            start.decoder.sample_rate,
            start.language,
            len(start.prompt),
            ", conditioned on previous finals" if start.condition_on_previous else "",
        )
        self._out.send(
            {
                "type": "ready",
                "session": self.id,
                "model": self._engine.name,
                "sample_rate": start.decoder.sample_rate,
                "encoding": start.decoder.encoding,
                "language": start.language,
                "words": start.words,
            }
        )

    async def _flush(self, code: int, reason: str, end_reason: str | None, message: str | None = None) -> None:
        assert self._transcriber is not None and self._decoder is not None  # a flush comes after start
        leftover = self._decoder.pending_bytes
        self._transcriber.feed(self._decoder.flush())
        await self._transcriber.finish()
        end = {"type": "end"} if end_reason is None else {"type": "end", "reason": end_reason}
        if message is not None:
            end["message"] = message
        if leftover:
            end["warning"] = (
                f"the stream ended {leftover} byte(s) into a {self._decoder.encoding} sample; they were "
                "dropped (send whole samples: every frame's bytes join the next frame's)"
            )
            log.warning("session %s: %s", self.id, end["warning"])
        self._out.send(end)
        self._out.close(code, reason)
        log.info(
            "session %s: ended (%s) after %.1f s of audio", self.id, end_reason or "stop", self._transcriber.seconds
        )

    # --- sending ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Partial):
            self._out.send(segment_event(event))
        elif isinstance(event, Final):
            t = event.transcript
            final: dict[str, Any] = {
                **segment_event(event),
                "stats": {
                    "decoder_forwards": t.forwards,
                    "tokens": len(t.tokens),
                    "encoder_seconds": round(t.encoder_seconds, 4),
                    "decoder_seconds": round(t.decoder_seconds, 4),
                    "draft_accepted": t.draft_accepted,
                },
            }
            if event.words is not None:
                final["words"] = word_list(event.words)
                final["stats"]["alignment_seconds"] = round(t.alignment_seconds, 4)
            self._out.send(final)
        elif isinstance(event, Failure):
            self._error(
                "internal",
                "transcription failed on the server; reconnect and start again (the failure is logged)",
                CloseCode.INTERNAL_ERROR,
            )

    def _error_message(self, code: str, message: str) -> dict[str, Any]:
        return {"type": "error", "code": code, "message": message}

    def _last_words(self, waiting: int) -> dict[str, Any]:
        """The client stopped reading: the events waiting for it are dropped for the `overloaded`
        error and a close 1013 (streaming.protocols.base.Outbox)."""
        self._metrics.errors.labels("overloaded").inc()
        return {
            "type": "error",
            "code": "overloaded",
            "message": f"{waiting} events "
            "waited for this client, which did not read them; read events as they "
            "arrive, and connect again",
        }
