"""Pieces the protocol adapters share (OpenAI Realtime, WhisperLive, Twilio and its subscribers).

Every adapter follows the native session's rules (streaming.session): one writer task per
connection, so events, errors and the close go out in the order they were queued; nothing is
sent after a close is queued; a vanished client just ends the writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.whisper.tokenizer import LANGUAGES as WHISPER_LANGUAGES

from .limits import REFUSAL_TIMEOUT, closing
from .transcriber import StreamingTranscriber, join_text

log = logging.getLogger(__name__)

__all__ = ["Outbox", "Complaints", "ItemTranscriber", "join_text", "WHISPER_LANGUAGES"]


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class Outbox:
    """The single writer of one connection: `send` queues a message, `close` queues the close.

    With a `limit`, a client that lets that many messages wait (it stopped reading) is let go: its
    queue must not grow the server's memory. The waiting messages are dropped for a close 1013
    "send queue full", and the connection is cut if that is not out within REFUSAL_TIMEOUT."""

    def __init__(self, connection: ServerConnection, limit: int | None = None) -> None:
        self._ws = connection
        self._queue: asyncio.Queue[str | _Close] = asyncio.Queue()
        self.closing = False  # a close is queued: nothing more goes out
        self._task: asyncio.Task[None] | None = None
        self._limit = limit
        self.overflowed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, message: str | dict) -> None:
        if self.closing:
            return
        if self._limit is not None and self._queue.qsize() >= self._limit:
            log.warning(
                "%d messages wait for a client (%s) that does not read them; closing the connection",
                self._queue.qsize(),
                self._ws.remote_address,
            )
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
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
        is read and dropped (streaming.limits.discard_incoming), so the close is not held up."""
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


class ItemTranscriber(StreamingTranscriber):
    """The streaming transcriber with what the adapters need besides: `cut` closes the open segment
    now (an OpenAI commit, an idle WhisperLive client) without waiting for its final, and `on_resolved(index)` is called once a
    segment's final is resolved (its `Final` emitted, or found to hold no speech: OpenAI items
    need a `.completed` either way).

    It reaches into StreamingTranscriber's internals (`_handle`, `_segmenter`, `_final`); tests/test_realtime.py covers each hook, so a change there shows up as a failure.
    """

    def __init__(self, *args, on_resolved=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_resolved = on_resolved

    def cut(self) -> None:
        self._handle(self._segmenter.flush())

    async def _final(self, segment, arrival, before) -> None:
        await super()._final(segment, arrival, before)
        if self._on_resolved is not None and not self._failed and not self._closed:
            self._on_resolved(segment.index)
