"""What every protocol session shares (native, OpenAI Realtime, Twilio and its subscribers, WhisperLive).

`ProtocolSession` owns a connection's lifecycle: one writer task (`Outbox`), so events, errors and
the close go out in the order they were queued and nothing is sent after a close is queued; the
receive loop with the idle timeout; finishing exactly once, whoever asks (the client's stop, the
idle timeout, the server's shutdown or maximum duration); and the teardown, which cancels what is
still outstanding when the client vanished. A protocol overrides only what differs: `_serve` (its
first message, then usually `_receive_loop`), `_on_message`, `_on_idle`, `_drain` (what shutdown
flushes), `_error_message` (its wire format for an error) and the event callbacks of its
transcriber. Sessions see the server through a `SessionContext`, not the `Server` itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.whisper.tokenizer import LANGUAGES as WHISPER_LANGUAGES

from ..audio.codecs import AudioDecoder
from ..audio.transcriber import StreamingTranscriber, TranscriberConfig, TranscriptionEngine
from ..metrics import Metrics
from ..server.gate import REFUSAL_TIMEOUT, closing
from .calls import CallConfig, CallHub

log = logging.getLogger(__name__)

__all__ = ["WHISPER_LANGUAGES"]


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


@dataclass(frozen=True)
class SessionContext:
    """What a session may use of its server."""

    engine: TranscriptionEngine
    metrics: Metrics
    config: SessionConfig
    calls: CallHub = field(default_factory=lambda: CallHub(CallConfig()))
    """Transcripts of Twilio calls, for the Twilio streams and the call subscribers."""


class ProtocolError(Exception):
    """The client broke the protocol; the session ends with this error (`code`, also the metrics
    label) and close code."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class Outbox:
    """The single writer of one connection: `send` queues a message, `close` queues the close.

    With a `limit`, a client that lets that many messages wait (it stopped reading) is let go: its
    queue must not grow the server's memory. The waiting messages are dropped for a close 1013
    "send queue full" (preceded by the message `last_words(waiting)` returns, where given), and the
    connection is cut if that is not out within REFUSAL_TIMEOUT."""

    def __init__(
        self,
        connection: ServerConnection,
        limit: int | None = None,
        last_words: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> None:
        self._ws = connection
        self._last_words = last_words
        self._queue: asyncio.Queue[str | _Close] = asyncio.Queue()
        self.closing = False  # a close is queued: nothing more goes out
        self._task: asyncio.Task[None] | None = None
        self._limit = limit
        self.overflowed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, message: str | dict[str, Any]) -> None:
        if self.closing:
            return
        if self._limit is not None and self._queue.qsize() >= self._limit:
            waiting = self._queue.qsize()
            log.warning(
                "%d messages wait for a client (%s) that does not read them; closing the connection",
                waiting,
                self._ws.remote_address,
            )
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            last = self._last_words(waiting) if self._last_words is not None else None
            if last is not None:
                self._queue.put_nowait(json.dumps(last, ensure_ascii=False))
            self.close(CloseCode.TRY_AGAIN_LATER, "send queue full")
            # else the writer's send and the session's recv end with ConnectionClosed
            asyncio.get_running_loop().call_later(REFUSAL_TIMEOUT, self._ws.transport.abort)
            return
        self._queue.put_nowait(message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))

    def close(self, code: int, reason: str = "") -> None:
        """Queues the close (the first one wins); `reason` must fit a close frame (123 bytes)."""
        if not self.closing:
            self.closing = True
            self._queue.put_nowait(_Close(code, reason.encode()[:120].decode(errors="ignore")))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def wait(self) -> None:
        """Until the close went out (or the client vanished); what the client still sends meanwhile
        is read and dropped (streaming.server.gate.discard_incoming), so the close is not held up."""
        if self._task is not None:
            await closing(self._ws, self._task)

    async def _run(self) -> None:
        try:
            while not isinstance(item := await self._queue.get(), _Close):
                await self._ws.send(item)
            await self._ws.close(item.code, item.reason)
        except ConnectionClosed:
            pass


class Complaints:
    """Logs the first few bad messages of each kind on a connection, then only counts them.

    Peers that ignore replies (Twilio) can repeat one mistake 50 times a second; the log gets
    the first `limit` of each kind and a summary line at the end of the session.
    """

    def __init__(self, logger: logging.Logger, prefix: str, limit: int = 3) -> None:
        self._log = logger
        self._prefix = prefix
        self._limit = limit
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self._limit:
            more = " (further ones are counted, not logged)" if n == self._limit else ""
            self._log.warning("%s: ignored %s: %s%s", self._prefix, kind, message, more)

    def summary(self) -> None:
        if any(n > self._limit for n in self.counts.values()):
            self._log.warning(
                "%s: ignored messages by kind: %s",
                self._prefix,
                ", ".join(f"{kind} x{n}" for kind, n in sorted(self.counts.items())),
            )


class ProtocolSession:
    """One WebSocket connection of one protocol; `run` serves it to its end, `shutdown` and `expire`
    end it from the server's side (both flush what was said first)."""

    label = "session"
    """How log lines name the protocol; they add the session's id."""
    reads_after_finish = False
    """Whether `_on_message` still gets what the client sends once the session is finishing (where
    it has nowhere to go; Twilio's session reports it)."""

    def __init__(
        self, connection: ServerConnection, context: SessionContext, session_id: str, send_limit: int | None
    ) -> None:
        self.id = session_id
        self._ws = connection
        assert connection.request is not None  # sessions start after the handshake
        self.request = connection.request
        self.context = context
        self._engine = context.engine
        self._metrics = context.metrics
        self.config = context.config
        self._out = Outbox(connection, send_limit, self._last_words)
        self._decoder: AudioDecoder | None = None
        self._transcriber: StreamingTranscriber | None = None
        self._finishing: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.label} {self.id}"

    async def run(self) -> None:
        self._out.start()
        try:
            await self._serve()
        except ConnectionClosed as exc:
            self._client_closed(exc)
        except ProtocolError as exc:
            self._refuse(exc)
        except Exception:
            log.exception("%s: internal error", self.name)
            self._internal_error()
        finally:
            await self._teardown()
            self._out.close(CloseCode.NORMAL_CLOSURE)  # unless an earlier close is queued
            await self._out.wait()  # frames the client still sends must not hold up the close

    async def shutdown(self) -> None:
        """The server is stopping: flush what is open (`_drain`), then close with 1001 (going away)."""
        await self._drain()
        self._out.close(CloseCode.GOING_AWAY, "server shutting down")

    async def expire(self, seconds: float) -> None:
        """The session reached the server's maximum duration; unless a protocol says otherwise, it
        ends as at shutdown."""
        await self.shutdown()

    # --- what a protocol overrides -------------------------------------------------------------

    async def _serve(self) -> None:
        """Serves the connection until the session ends; by default, the receive loop."""
        await self._receive_loop()

    async def _on_message(self, message: str | bytes) -> bool:
        """One frame from the client; True ends the receive loop."""
        raise NotImplementedError

    async def _on_idle(self) -> bool:
        """No frame within the idle timeout; True ends the receive loop (by default it goes on)."""
        return False

    def _idle_timeout(self) -> float | None:
        """Seconds the receive loop waits for a frame before `_on_idle` (None: forever)."""
        return self.config.idle_timeout or None

    async def _drain(self) -> None:
        """Shutdown: flush what the client said so far (by default, nothing to flush)."""

    def _error_message(self, code: str, message: str) -> dict[str, Any]:
        """An error event in the protocol's wire format."""
        raise NotImplementedError

    def _last_words(self, waiting: int) -> dict[str, Any] | None:
        """The message a client that stopped reading gets before its close 1013 (None: just the close)."""
        return None

    def _client_closed(self, exc: ConnectionClosed) -> None:
        if not self._out.closing and self._finishing is None:
            log.info("%s: client closed (%s)", self.name, exc)

    def _refuse(self, exc: ProtocolError) -> None:
        self._error(exc.code, str(exc), exc.close_code)

    def _internal_error(self) -> None:
        self._error(
            "internal",
            "the server failed on this session; reconnect and start again (the failure is logged)",
            CloseCode.INTERNAL_ERROR,
        )

    async def _teardown(self) -> None:
        """The session is over: what is still outstanding is cancelled, without waiting for the engine."""
        if self._transcriber is not None:
            await self._transcriber.aclose()  # nothing left to flush after a finish
            self._metrics.sessions_active.dec()
        if self._decoder is not None:
            self._decoder.close()

    # --- what protocols share ------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Frames until `_on_message` or `_on_idle` says the session ends; once finishing, what the
        client still sends is dropped (unless `reads_after_finish`)."""
        while True:
            try:
                message = await asyncio.wait_for(self._ws.recv(), self._idle_timeout())  # recv is cancel-safe
            except asyncio.TimeoutError:
                if await self._on_idle():
                    return
                continue
            if self._finishing is not None and not self.reads_after_finish:
                continue
            if await self._on_message(message):
                return

    async def _finish(self, flush: Callable[[], Awaitable[None]]) -> None:
        """Flushes once, whoever asks (stop, idle timeout, shutdown, expiry; the first one's `flush`
        runs); every caller waits for it."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(flush())
        await asyncio.shield(self._finishing)

    def _error(self, code: str, message: str, close_code: int, reason: str | None = None) -> None:
        """An error event, counted by `code`, then the close (`reason`: the code unless given)."""
        log.warning("%s: error %s (close %d): %s", self.name, code, close_code, message)
        if self._out.closing:  # already ending (the client left, or an earlier error): nobody to tell
            return
        self._metrics.errors.labels(code).inc()
        self._out.send(self._error_message(code, message))
        self._out.close(close_code, code if reason is None else reason)
