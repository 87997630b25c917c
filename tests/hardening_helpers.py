"""Helpers of the hardening and fuzz tests: `FakeConnection`, a ServerConnection stand-in for
driving sessions in-process. The tiny model, the audio and the subprocess server they share with
the benchmarks are in bench/ (tiny.py, clips.py, cli_server.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

REPO = Path(__file__).resolve().parents[1]
RATE = 16000


# --- in-process connections ----------------------------------------------------------------------


class FakeConnection:
    """What sessions use of a ServerConnection: recv (the given messages, then the client's close),
    send, close, transport.abort, request, remote_address, id."""

    def __init__(
        self,
        messages: list[str | bytes] = (),
        *,
        path: str = "/v1/stream",
        headers: dict | None = None,
        block_send: bool = False,
        end: str = "close",
    ) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        for message in messages:
            self.incoming.put_nowait(message)
        if end == "close":
            self.incoming.put_nowait(None)  # the client goes away after its last message
        self.sent: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.aborted = False
        self._block = asyncio.Event() if block_send else None
        self.remote_address = ("10.0.0.1", 40000)
        self.request = SimpleNamespace(path=path, headers=Headers(headers or {}))
        self.transport = SimpleNamespace(abort=self._abort)
        self.id = SimpleNamespace(hex="0123456789abcdef")

    def _closed(self) -> Exception:
        if self.aborted:
            return ConnectionClosedError(None, None)
        return ConnectionClosedOK(Close(self.close_code or 1000, ""), None)

    def _abort(self) -> None:
        self.aborted = True
        self.incoming.put_nowait(None)
        if self._block is not None:
            self._block.set()

    async def recv(self, decode: bool | None = None) -> str | bytes:
        if self.aborted or self.close_code is not None:
            raise self._closed()
        message = await self.incoming.get()
        if message is None:
            self.incoming.put_nowait(None)
            raise ConnectionClosedOK(Close(1000, ""), None) if not self.aborted else self._closed()
        return message

    async def send(self, message: str | bytes) -> None:
        if self._block is not None:
            await self._block.wait()
        if self.aborted or self.close_code is not None:
            raise self._closed()
        self.sent.append(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is None and not self.aborted:
            self.close_code, self.close_reason = code, reason

    def events(self) -> list[dict]:
        return [json.loads(m) for m in self.sent]
