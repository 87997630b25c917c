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
import contextlib
import dataclasses
import json
import socket
import time

import numpy as np
from test_hardening import http_get
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.clips import pcm16, phrases
from bench.tiny import TINY_TEXT
from engines.engine import Engine
from streaming.audio.transcriber import TranscriberConfig
from streaming.protocols.base import SessionConfig
from streaming.server import gate
from streaming.server.admission import Admission, AdmissionConfig, LoadMeter
from streaming.server.app import Server, ServerConfig
from streaming.server.gate import Limits

RATE = 16000


class SerialEngine:
    """A real engine made slow: one decode at a time, `rtf` seconds per second of audio."""

    def __init__(self, engine: Engine, rtf: float) -> None:
        self.engine, self.rtf, self.name, self.device = engine, rtf, engine.name, engine.device
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

    def health(self) -> dict:
        return self.engine.health()

    def load_stats(self) -> dict:
        return self.engine.load_stats()


def url(server: Server, path: str = "/v1/stream") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def stream(
    server: Server,
    audio: np.ndarray,
    *,
    frame_s: float = 0.1,
    speed: float | None = None,
    start: dict | None = None,
    **connect_args,
) -> tuple[list[dict], int | None, str | None, list[float]]:
    """start, `audio` in frames (at `speed` times real time; None: as fast as the server reads), stop;
    (events, close code, close reason, final latencies: arrival minus the time the audio at its end was sent)."""
    received: list[tuple[float, dict]] = []
    sent: list[tuple[float, float]] = []  # (seconds of audio sent, when)

    async def read(ws) -> None:
        try:
            async for message in ws:
                received.append((time.monotonic(), json.loads(message)))
        except ConnectionClosed:
            pass

    async with connect(url(server), **connect_args) as ws:
        reader = asyncio.ensure_future(read(ws))
        await ws.send(json.dumps(start or {"type": "start"}))
        data, step = pcm16(audio), 2 * round(frame_s * RATE)
        began = time.monotonic()
        for k, i in enumerate(range(0, len(data), step)):
            if speed is not None:
                await asyncio.sleep(max(0.0, began + k * frame_s / speed - time.monotonic()))
            await ws.send(data[i : i + step])
            sent.append(((i + step) / 2 / RATE, time.monotonic()))
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 60)
    latencies = [
        at - next(t for end, t in sent if end >= event["end"] - 1e-6)
        for at, event in received
        if event["type"] == "final"
    ]
    return [event for _, event in received], ws.close_code, ws.close_reason, latencies


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
    config = ServerConfig(
        port=0,
        limits=Limits(ping_interval=0.2, ping_timeout=0.5),
        session=SessionConfig(transcriber=TranscriberConfig(max_queued_audio=2.0)),
    )
    async with Server(config, engine=slow) as srv:
        client = asyncio.ensure_future(stream(srv, phrases(12, speech=1.0, pause=0.8), frame_s=0.1))
        paused = await longest_pause(srv, client)
        events, code, reason, _ = await client
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
        await ws.wait_closed()
    assert srv.session_count == 0 and elapsed < 0.2 + 0.5 + 0.5 + 1.0, f"closed after {elapsed:.2f} s"
    sent = server_side.protocol.close_sent
    assert (sent.code, sent.reason) == (1011, "keepalive ping timeout")


# --- 2. admission by measured capacity ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_capacity_estimate_and_hysteresis():
    """The estimator's arithmetic on known measurements (streaming.server.admission's docstring)."""
    clock = Clock()
    meter = LoadMeter(horizon=30.0, clock=clock)
    admission = Admission(AdmissionConfig(floor=2, utilization=0.8, max_wait=2.0, hold=5.0), meter, clock=clock)
    assert admission.capacity == 2 and admission.admits(0) and admission.admits(1) and not admission.admits(2)
    assert admission.admits(0), "a server without sessions always admits"
    for _ in range(2):
        meter.session_opened()

    def talk(seconds: float) -> None:
        """Two sessions, each closing a 1 s segment every 2 s, decoded at 0.5 s per audio second."""
        for _ in range(round(seconds / 2)):
            clock.now += 2.0
            for _ in range(2):
                meter.queued(1.0)
                meter.final_decoded(1.0, 0.5, 0.5)
                meter.queued(-1.0)

    talk(20.0)
    assert abs(meter.rtf - 0.5) < 1e-9 and abs(meter.speech - 0.5) < 0.05
    assert abs(admission.capacity - 0.8 / (0.5 * meter.speech)) < 1e-9 and 3.0 < admission.capacity < 3.4
    assert admission.admits(2) and not admission.admits(3)
    talk(2.0)
    assert not admission.admits(1), "refusing lasts `hold` seconds"
    talk(4.0)
    assert not admission.admits(2), "and ends only with a tenth of the capacity free"
    assert admission.admits(1)
    meter.queued(5.0)  # a burst: 5 s of audio waits, 2.5 s of engine work > max_wait
    assert admission.pressure > 1 and not admission.admits(1) and admission.free(1) == 0
    meter.queued(-5.0)
    talk(6.0)
    assert admission.admits(1)
    meter.session_closed(), meter.session_closed()
    clock.now += 30.0 * 20  # idle for 20 horizons: the measurements have faded
    assert meter.rtf is None and admission.capacity == 2
    assert Admission(AdmissionConfig(mode="off", floor=1), LoadMeter()).admits(50)


def test_floor_and_utilization_default_by_device():
    """Unset on the command line, the floor and utilization follow the engine's device: a CPU
    queues finals one by one behind partials, a GPU batches them (streaming.server.admission)."""
    clock = Clock()
    meter = LoadMeter(horizon=30.0, clock=clock)
    admission = Admission(AdmissionConfig(), meter, clock=clock)
    assert admission.capacity == 8 and admission.utilization == 0.5, "a CPU engine by default"
    admission.device = "cuda"
    assert admission.capacity == 32 and admission.utilization == 0.6
    meter.session_opened()
    for _ in range(10):  # one session, a 1 s segment every 2 s, 0.01 engine seconds per audio second
        clock.now += 2.0
        meter.queued(1.0), meter.final_decoded(1.0, 0.01, 0.01), meter.queued(-1.0)
    gpu = admission.capacity
    admission.device = "cpu"
    assert abs(admission.capacity / gpu - 0.5 / 0.6) < 1e-9, "the same measurements, the CPU's utilization"
    pinned = Admission(AdmissionConfig(floor=5, utilization=0.7), LoadMeter(clock=clock), clock=clock)
    pinned.device = "cuda"
    assert pinned.capacity == 5 and pinned.utilization == 0.7, "what the command line sets wins"


async def get_json(port: int, path: str) -> tuple[int, dict]:
    status, _, body = await http_get(port, path)
    return status, json.loads(body)


async def test_streams_beyond_measured_capacity_are_refused_at_connect(tiny_engine):
    """An engine that serves about 2 real-time streams: 2 admitted streams keep every final at
    a bounded latency; 4 more offered are refused with 503 + Retry-After; /readyz is 503 while
    full and 200 again once the streams end; the estimate is in /metrics and /healthz."""
    slow = SerialEngine(tiny_engine, rtf=0.5)
    admission = AdmissionConfig(floor=2, utilization=0.8, hold=1.0, horizon=10.0)
    config = ServerConfig(
        port=0, admission=admission, session=SessionConfig(transcriber=TranscriberConfig(partial_interval=0))
    )
    audio = phrases(7, speech=1.0, pause=0.8)
    async with Server(config, engine=slow) as srv:
        admitted = [asyncio.ensure_future(stream(srv, audio, speed=1.0)) for _ in range(2)]
        deadline = time.monotonic() + 20
        while srv.metrics.load.speech is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        refused = []
        for _ in range(4):
            try:
                async with connect(url(srv)):
                    refused.append(101)
            except InvalidStatus as exc:
                refused.append(
                    (
                        exc.response.status_code,
                        exc.response.headers.get("Retry-After"),
                        json.loads(exc.response.body)["error"],
                    )
                )
            await asyncio.sleep(0.3)
        ready, readiness = await get_json(srv.port, "/readyz")
        health = (await get_json(srv.port, "/healthz"))[1]["capacity"]
        results = await asyncio.gather(*admitted)
        await asyncio.sleep(admission.hold)
        ready_after = (await get_json(srv.port, "/readyz"))[0]
        metrics = srv.metrics.render().decode()
    assert refused == [(503, "1", "overloaded")] * 4, refused
    assert ready == 503 and readiness["status"] == "overloaded" and ready_after == 200
    assert 1.5 < health["capacity"] < 3.5 and 0.45 < health["rtf"] < 0.6 and health["free"] == 0, health
    assert (
        "breeze_capacity_streams" in metrics and 'breeze_connections_rejected_total{reason="capacity"} 4.0' in metrics
    )
    latencies = []
    for events, code, _, latency in results:
        assert code == 1000 and events[-1] == {"type": "end"}
        assert [e["text"] for e in events if e["type"] == "final"] == [TINY_TEXT] * 7
        latencies += latency
    # unloaded: the 0.5 s silence hangover, 0.5 s of engine time per second of segment; behind one
    # final of the other stream at most
    assert max(latencies) < 3.0, sorted(latencies)


# --- 3. sessions that end under load ---------------------------------------------------------------


def overloaded(server: Server) -> float:
    return server.metrics.registry.get_sample_value("breeze_errors_total", {"code": "overloaded"})


async def test_client_that_stops_reading_is_told_why(tiny_engine):
    """A client that stops reading its events while partials keep coming: once `max_send_queue` of
    them wait, the waiting ones are dropped for the `overloaded` error and a close 1013 "send queue
    full", which a client that reads again within gate.REFUSAL_TIMEOUT gets; one that does not
    is cut then. Either way the session ends."""
    config = ServerConfig(
        port=0, session=SessionConfig(max_send_queue=4, transcriber=TranscriberConfig(partial_interval=0.05))
    )
    async with Server(config, engine=tiny_engine) as srv:
        for reads_again in (True, False):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", srv.port))
            async with connect(url(srv), sock=sock, ping_interval=None, close_timeout=1) as ws:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
                [server_side] = srv._ws.connections  # a slow network: little room on the way to the client
                server_side.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                server_side.transport.set_write_buffer_limits(high=1024)
                ws.transport.pause_reading()
                overflows = overloaded(srv)
                data, step = pcm16(np.tile(phrases(4, speech=2.5, pause=0.6), 4)), 3200
                for i in range(0, len(data), step):
                    if overloaded(srv) > overflows:
                        break
                    await ws.send(data[i : i + step])
                    await asyncio.sleep(0.02)  # 0.1 s of audio in 20 ms
                else:
                    raise AssertionError("the send queue never filled")
                if not reads_again:
                    await asyncio.sleep(gate.REFUSAL_TIMEOUT + 0.5)
                ws.transport.resume_reading()
                events = []
                with contextlib.suppress(ConnectionClosed):
                    async for message in ws:
                        events.append(json.loads(message))
            sent = server_side.protocol.close_sent
            if reads_again:
                assert events[-1]["type"] == "error" and events[-1]["code"] == "overloaded", events[-3:]
                assert (sent.code, sent.reason) == (1013, "send queue full") and ws.close_code == 1013
            else:
                assert all(e["type"] in ("partial", "final") for e in events), "only what it had been sent before"
                assert sent is None and ws.close_code == 1006
            await asyncio.sleep(0.1)
            assert srv.session_count == 0
