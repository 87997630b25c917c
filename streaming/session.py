"""The native protocol, `ws://HOST:PORT/v1/stream` (DESIGN.md): one connection, one session.

The client sends a `start` text frame, binary audio frames, then a `stop` text frame; the server
answers `ready`, then `partial`/`final` events as the transcriber produces them, and after
`stop` flushes the open segment, sends its final, `end`, and closes normally. A segment whose
partials showed text but whose final decode finds no speech gets a last partial with empty
`text` and `stable` (a retraction) and no final.

Errors end the session: an `error` event with the DESIGN.md code and a message saying how to
fix it, then a close with the matching WebSocket close code (RFC 6455, 7.4.1):

- start message not JSON: bad_request, 1007 (invalid frame payload data);
- binary frame before start, or a text frame other than stop or update where audio is expected:
  bad_request, 1003 (unsupported data: the wrong kind of frame);
- start message not an object or not of type start, fields of the wrong type, unknown
  language, sample rate outside 8-48 kHz, channels != 1: bad_request, 1008 (policy violation);
- unknown encoding: unsupported_encoding, 1003 (unsupported data);
- frame over the limit: frame_too_large, 1009 (message too big); past 4 times (server.FRAME_SLACK) the
  limit the WebSocket layer refuses the frame unread, with 1009 and no event;
- no start message within the idle timeout: bad_request, 1008;
- the engine failed on this session's audio: internal, 1011 (internal error);
- the client reads events so slowly that `max_send_queue` of them wait: overloaded, 1013 (try
  again later; reason "send queue full"); the waiting events are dropped, and the connection is
  cut if the error and close have not gone out within limits.REFUSAL_TIMEOUT.

`ServerConfig.limits` (streaming.limits) adds what happens before a session starts: keys, the
session and per-client limits (HTTP 401/403/429/503 before the upgrade, or an `unauthorized` /
`overloaded` error event and close 1008 / 1013 after it). A session that reaches the server's
maximum duration flushes its finals, then gets `end` with `"reason": "max_duration"` and a
close 1008. While the engine is behind by more than `max_queued_audio` seconds of this session's
audio, the session stops reading frames (TCP pushes back on the client) rather than queue more;
the server's keepalive does not count that time against the client's pong (streaming.keepalive).

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
from dataclasses import dataclass, field, replace

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.engine import Engine
from engines.options import LANGUAGES
from engines.whisper.alignment import Word
from engines.whisper.decoding import DecodingOptions

from .codecs import AudioDecoder, AudioFormatError
from .limits import REFUSAL_TIMEOUT, closing
from .metrics import Metrics
from .transcriber import Event, Failure, Final, Partial, StreamingTranscriber, TranscriberConfig, check_prompt

log = logging.getLogger(__name__)

START_EXAMPLE = '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1, "language": "zh"}'


@dataclass(frozen=True)
class SessionConfig:
    max_frame_bytes: int = 1 << 20
    """Largest frame accepted (audio or text)."""
    idle_timeout: float = 30.0
    """Seconds without any frame after which the session flushes and ends (0: never)."""
    language: str = "zh"
    """Language of sessions whose start message names none."""
    prompt: str = ""
    """Prompt of sessions that send none (`serve --prompt`): names and terms every session expects."""
    max_send_queue: int = 1024
    """Events queued for a client that does not read them; past it the client is disconnected
    (error code overloaded, logged), so a stalled reader cannot grow the server's memory."""
    transcriber: TranscriberConfig = field(default_factory=TranscriberConfig)


class ProtocolError(Exception):
    """The client broke the protocol; the session ends with this error event and close code."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


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


def word_list(words: list[Word]) -> list[dict]:
    """Word timings as the protocols send them: text, start and end (stream seconds), probability."""
    return [
        {"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3), "probability": round(w.probability, 3)}
        for w in words
    ]


def control_message(message: str) -> dict | None:
    """A text frame after start as a JSON object with a type (stop, update), else None."""
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and isinstance(parsed.get("type"), str) else None


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class NativeSession:
    """One `/v1/stream` connection. Only the sender task writes to the socket, so events,
    errors, `end` and the close go out in the order they were queued."""

    def __init__(self, connection: ServerConnection, engine: Engine, metrics: Metrics, config: SessionConfig) -> None:
        self.id = secrets.token_hex(6)
        self._ws = connection
        self._engine = engine
        self._metrics = metrics
        self.config = config
        self._outbox: asyncio.Queue[str | _Close] = asyncio.Queue()
        self._decoder: AudioDecoder | None = None
        self._transcriber: StreamingTranscriber | None = None
        self._finishing: asyncio.Task[None] | None = None
        self._closing = False  # a close is queued: nothing more goes out

    async def run(self) -> None:
        sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            await self._serve()
        except ConnectionClosed as exc:
            if not self._closing and self._finishing is None:
                log.info("session %s: client closed without stop (%s)", self.id, exc)
        except ProtocolError as exc:
            self._error(exc.code, str(exc), exc.close_code)
        except Exception:
            log.exception("session %s: internal error", self.id)
            self._error(
                "internal",
                "the server failed on this session; reconnect and start again (the failure is logged)",
                CloseCode.INTERNAL_ERROR,
            )
        finally:
            if self._transcriber is not None:
                await self._transcriber.aclose()  # nothing left to flush after a finish
                self._decoder.close()
                self._metrics.sessions_active.dec()
            self._close(CloseCode.NORMAL_CLOSURE, "")  # unless an earlier close is queued
            await closing(self._ws, sender)  # frames the client still sends must not hold up the close

    async def shutdown(self) -> None:
        """The server is stopping: flush finals, send `end`, close with 1001 (going away)."""
        if self._transcriber is None:
            self._close(CloseCode.GOING_AWAY, "server shutting down")
        else:
            await self._finish(CloseCode.GOING_AWAY, "server shutting down", "shutdown")

    async def expire(self, seconds: float) -> None:
        """The session reached the server's maximum duration: flush finals, `end`, close 1008."""
        if self._transcriber is None:
            self._close(CloseCode.POLICY_VIOLATION, "max duration")
        else:
            await self._finish(
                CloseCode.POLICY_VIOLATION,
                "max duration",
                "max_duration",
                f"this server ends sessions after {seconds:g} s; connect again to go on",
            )

    # --- receiving ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            message = await self._recv()
        except asyncio.TimeoutError:
            raise ProtocolError(
                "bad_request",
                f"no start message within {self.config.idle_timeout:g} s; send {START_EXAMPLE} right after connecting",
                CloseCode.POLICY_VIOLATION,
            ) from None
        start = parse_start(
            message, self.config.language, self.config.prompt, self.config.transcriber.condition_on_previous
        )
        self._begin(start)
        while True:
            try:
                message = await self._recv()
            except asyncio.TimeoutError:
                log.info("session %s: idle for %g s, ending it", self.id, self.config.idle_timeout)
                await self._finish(CloseCode.NORMAL_CLOSURE, "idle timeout", "idle_timeout")
                return
            if self._finishing is not None:
                continue  # shutting down: audio after the flush has nowhere to go
            if isinstance(message, bytes):
                self._transcriber.feed(self._decoder.decode(message))
                await self._transcriber.room()  # the engine is far behind: stop reading until it catches up
                continue
            control = control_message(message)
            kind = control and control["type"]
            if kind == "stop":
                await self._finish(CloseCode.NORMAL_CLOSURE, "", None)
                return
            if kind == "update":
                self._update(control)
            else:
                raise ProtocolError(
                    "bad_request",
                    f'expected binary audio frames, {{"type": "update", "prompt": "..."}} or '
                    f'{{"type": "stop"}} after start, got the text frame {message[:80]!r}; send audio as '
                    "binary WebSocket frames",
                    CloseCode.UNSUPPORTED_DATA,
                )

    async def _recv(self) -> str | bytes:
        message = await asyncio.wait_for(self._ws.recv(), self.config.idle_timeout or None)  # recv is cancel-safe
        if len(message) > self.config.max_frame_bytes:
            raise ProtocolError(
                "frame_too_large",
                f"a frame of {len(message)} bytes is over this server's limit of "
                f"{self.config.max_frame_bytes} bytes; send audio in frames of 20-100 ms",
                CloseCode.MESSAGE_TOO_BIG,
            )
        return message

    def _update(self, update: dict) -> None:
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
            self._send(
                {"type": "error", "code": "bad_request", "message": f"update refused, the prompt is unchanged: {exc}"}
            )
            return
        segment = self._transcriber.set_options(replace(self._transcriber.options, prompt=prompt))
        log.info("session %s: prompt of %d characters from segment %d on", self.id, len(prompt), segment)
        self._send({"type": "updated", "prompt": prompt, "segment": segment})

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
        self._send(
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

    async def _finish(self, code: int, reason: str, end_reason: str | None, message: str | None = None) -> None:
        """Flush once, whoever asks (stop, idle timeout, shutdown); every caller waits for it."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._flush(code, reason, end_reason, message))
        await asyncio.shield(self._finishing)

    async def _flush(self, code: int, reason: str, end_reason: str | None, message: str | None) -> None:
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
        self._send(end)
        self._close(code, reason)
        log.info(
            "session %s: ended (%s) after %.1f s of audio", self.id, end_reason or "stop", self._transcriber.seconds
        )

    # --- sending ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Partial):
            self._send(
                {
                    "type": "partial",
                    "segment": event.segment,
                    "start": round(event.start, 3),
                    "end": round(event.end, 3),
                    "text": event.text,
                    "stable": event.stable,
                }
            )
        elif isinstance(event, Final):
            t = event.transcript
            final = {
                "type": "final",
                "segment": event.segment,
                "start": round(event.start, 3),
                "end": round(event.end, 3),
                "text": event.text,
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
            self._send(final)
        elif isinstance(event, Failure):
            self._error(
                "internal",
                "transcription failed on the server; reconnect and start again (the failure is logged)",
                CloseCode.INTERNAL_ERROR,
            )

    def _error(self, code: str, message: str, close_code: int) -> None:
        log.warning("session %s: error %s (close %d): %s", self.id, code, close_code, message)
        if self._closing:  # already ending (the client left, or an earlier error): nobody to tell
            return
        self._metrics.errors.labels(code).inc()
        self._send({"type": "error", "code": code, "message": message})
        self._close(close_code, code)

    def _send(self, event: dict) -> None:
        if self._closing:
            return
        if self._outbox.qsize() >= self.config.max_send_queue:
            self._drop_slow_client()
            return
        self._outbox.put_nowait(json.dumps(event, ensure_ascii=False))

    def _drop_slow_client(self) -> None:
        """The client stopped reading: the events waiting for it are dropped, the `overloaded` error and
        a close 1013 take their place, and the connection is cut if they are not out within
        REFUSAL_TIMEOUT (the sender's send and the receiver's recv then end with ConnectionClosed)."""
        waiting = self._outbox.qsize()
        log.warning(
            "session %s: %d events wait for a client that does not read them; ending the session", self.id, waiting
        )
        self._metrics.errors.labels("overloaded").inc()
        self._closing = True
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._outbox.put_nowait(
            json.dumps(
                {
                    "type": "error",
                    "code": "overloaded",
                    "message": f"{waiting} events "
                    "waited for this client, which did not read them; read events as they "
                    "arrive, and connect again",
                }
            )
        )
        self._outbox.put_nowait(_Close(CloseCode.TRY_AGAIN_LATER, "send queue full"))
        asyncio.get_running_loop().call_later(REFUSAL_TIMEOUT, self._ws.transport.abort)

    def _close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._outbox.put_nowait(_Close(code, reason))

    async def _send_loop(self) -> None:
        """Writes queued events, then the close; a vanished client just ends it."""
        try:
            while not isinstance(item := await self._outbox.get(), _Close):
                await self._ws.send(item)
            await self._ws.close(item.code, item.reason)
        except ConnectionClosed:
            pass
