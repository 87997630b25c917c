"""Overload without collapse (issue 27): keepalive under backpressure, admission by measured
capacity, and how sessions end under load.

Real servers on port 0, real WebSocket clients over real sockets. The engine is conftest's tiny
rigged one (it answers TINY_TEXT for every segment) behind `SerialEngine`: one decode at a time,
each taking `rtf` seconds per second of its audio, reported in the transcript's encoder seconds
as the real engine reports its work. That is a CPU engine of known speed, so tests can offer
more streams than it can serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
from websockets.asyncio.client import connect

from conftest import TINY_TEXT, receive_all
from engines.engine import Engine
from hardening_helpers import pcm16, phrases
from streaming.limits import Limits
from streaming.server import Server, ServerConfig
from streaming.session import SessionConfig
from streaming.transcriber import TranscriberConfig

RATE = 16000


class SerialEngine:
    """A real engine made slow: one decode at a time, `rtf` seconds per second of audio."""

    def __init__(self, engine: Engine, rtf: float) -> None:
        self.engine, self.rtf, self.name = engine, rtf, engine.name
        self._lock = asyncio.Lock()
        self.finals = 0

    async def transcribe_async(self, audio, options, *, final: bool, **kwargs):
        async with self._lock:
            cost = self.rtf * len(audio) / RATE
            await asyncio.sleep(cost)
            transcript = await self.engine.transcribe_async(audio, options, final=final, **kwargs)
        self.finals += final
        if transcript is None:
            return None
        return dataclasses.replace(transcript, encoder_seconds=transcript.encoder_seconds + cost)


def url(server: Server, path: str = "/v1/stream") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def stream(server: Server, audio: np.ndarray, *, frame_s: float = 0.1, speed: float | None = None,
                 start: dict | None = None, **connect_args) -> tuple[list[dict], int | None, str | None]:
    """start, `audio` in frames (at `speed` times real time; None: as fast as the server reads), stop;
    (events, close code, close reason)."""
    async with connect(url(server), **connect_args) as ws:
        reader = asyncio.ensure_future(receive_all(ws))
        await ws.send(json.dumps(start or {"type": "start"}))
        data, step = pcm16(audio), 2 * round(frame_s * RATE)
        began = time.monotonic()
        for k, i in enumerate(range(0, len(data), step)):
            if speed is not None:
                await asyncio.sleep(max(0.0, began + k * frame_s / speed - time.monotonic()))
            await ws.send(data[i:i + step])
        await ws.send(json.dumps({"type": "stop"}))
        events = await asyncio.wait_for(reader, 60)
    return events, ws.close_code, ws.close_reason


async def longest_pause(server: Server, done: asyncio.Future) -> float:
    """The longest stretch during which the server did not read some client's socket, until `done`."""
    paused: dict[object, float] = {}
    longest = 0.0
    while not done.done():
        now = time.monotonic()
        for connection in list(server._ws.connections):
            if connection.transport.is_reading():
                paused.pop(connection, None)
            else:
                longest = max(longest, now - paused.setdefault(connection, now))
        await asyncio.sleep(0.02)
    return longest


# --- 1. keepalive --------------------------------------------------------------------------------


async def test_backpressured_fast_sender_outlives_the_ping_timeout(tiny_engine):
    """A client sending far faster than a slow engine transcribes: the server stops reading it for
    many ping timeouts, yet keeps the connection and sends every final and `end`."""
    slow = SerialEngine(tiny_engine, rtf=0.5)
    config = ServerConfig(port=0, limits=Limits(ping_interval=0.2, ping_timeout=0.5),
                          session=SessionConfig(transcriber=TranscriberConfig(max_queued_audio=2.0)))
    async with Server(config, engine=slow) as srv:
        client = asyncio.ensure_future(stream(srv, phrases(12, speech=1.0, pause=0.8), frame_s=0.1))
        paused = await longest_pause(srv, client)
        events, code, reason = await client
    assert (code, reason) == (1000, "") and events[-1] == {"type": "end"}
    assert paused > 4 * 0.5, f"the server stopped reading the client for only {paused:.2f} s"
    assert [e["text"] for e in events if e["type"] == "final"] == [TINY_TEXT] * 12


async def test_peer_that_stops_answering_pings_is_closed(tiny_engine):
    """A client that no longer reads its socket (so never answers a ping) is closed with 1011."""
    config = ServerConfig(port=0, limits=Limits(ping_interval=0.2, ping_timeout=0.5))
    async with Server(config, engine=tiny_engine) as srv:
        ws = await connect(url(srv), ping_interval=None)
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        [server_side] = srv._ws.connections
        ws.transport.pause_reading()  # pings now sit unread in this socket: no pong goes back
        started = time.monotonic()
        while srv.session_count and time.monotonic() - started < 10:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        ws.transport.resume_reading()
        await receive_all(ws)
    assert srv.session_count == 0 and elapsed < 0.2 + 0.5 + 0.5 + 1.0, f"closed after {elapsed:.2f} s"
    sent = server_side.protocol.close_sent
    assert (sent.code, sent.reason) == (1011, "keepalive ping timeout")
