"""`serve --workers N` (streaming.server.workers): front-end processes in front of one engine process.

The engine service and RemoteEngine are checked in one process over their real Unix socket
(results, errors, superseded partials, cancellation, a lost engine); then the real command runs
with two workers and a random-weight model: streams on one port, metrics summed over workers,
drain on SIGTERM, and workers that exit when the engine process dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
from conftest import receive_all
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.analysis import parse_prometheus
from bench.clips import pcm16, two_phrases, voiced
from bench.tiny import TINY_TEXT
from engines.whisper.decoding import DecodingOptions
from streaming.server.workers import EngineAddress, EngineService, RemoteEngine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def address(tmp_path: Path) -> EngineAddress:
    return EngineAddress(str(tmp_path / "engine.sock"), secrets.token_bytes(16))


@pytest.fixture
def service(address: EngineAddress, tiny_engine):
    service = EngineService(address)
    service.loaded(tiny_engine)
    yield service
    service.close()


def test_remote_engine_gives_the_engines_transcripts(service, address, tiny_engine):
    remote = RemoteEngine.connect(address)
    try:
        assert remote.name == tiny_engine.name and remote.device == str(tiny_engine.device)
        audio = voiced(1.0)
        got = remote.submit(audio, DecodingOptions(language="zh")).result(30)
        want = tiny_engine.transcribe(audio, DecodingOptions(language="zh"))
        assert got.text == want.text == TINY_TEXT and got.tokens == want.tokens
        assert remote.health()["alive"] and "restarts" in remote.health()
    finally:
        remote.close()


def test_remote_errors_reach_the_caller(service, address):
    remote = RemoteEngine.connect(address)
    try:
        with pytest.raises(ValueError, match="speculative"):
            remote.submit(voiced(0.5), speculative="sideways").result(30)
        assert remote.submit(voiced(0.5)).result(30).text == TINY_TEXT  # the connection goes on
    finally:
        remote.close()


def test_partials_of_one_stream_supersede_each_other(service, address):
    """The stream key survives the trip: of a burst of partials of one stream, the newest always
    gets a transcript and older ones still queued are answered None, as in one process; partials
    of another stream are not touched."""
    remote = RemoteEngine.connect(address)
    mine, other = object(), object()
    superseded = False
    try:
        for _ in range(3):
            futures = [remote.submit(voiced(0.5 + 0.05 * i), final=False, stream=mine) for i in range(20)]
            theirs = remote.submit(voiced(0.5), final=False, stream=other)
            results = [f.result(30) for f in futures]
            assert results[-1] is not None and results[-1].text == TINY_TEXT
            assert theirs.result(30) is not None
            superseded |= None in results[:-1]
        assert superseded, "no partial was ever superseded: the stream key was lost on the way"
    finally:
        remote.close()


def test_cancelled_requests_are_withdrawn(service, address):
    remote = RemoteEngine.connect(address)
    try:
        futures = [remote.submit(voiced(2.0)) for _ in range(6)]
        assert futures[-1].cancel()
        with pytest.raises(CancelledError):
            futures[-1].result()
        assert all(f.result(30).text == TINY_TEXT for f in futures[:-1])
        assert not remote._pending  # answered or withdrawn: nothing is kept for the cancelled one
    finally:
        remote.close()


def test_an_answer_that_does_not_pickle_fails_its_request_alone(address):
    """Whatever an engine answers that cannot cross the socket fails that request, not the connection."""
    from concurrent.futures import Future

    class Odd:
        name, device = "odd", "cpu"

        def submit(self, audio, options, **keywords) -> Future:
            future: Future = Future()
            future.set_result((lambda: None) if keywords.get("final", True) else "fine")
            return future

        def health(self) -> dict:
            return {"alive": True}

        def load_stats(self) -> dict:
            return {}

    service = EngineService(address)
    service.loaded(Odd())
    remote = RemoteEngine.connect(address)
    try:
        with pytest.raises(RuntimeError, match="pickle|lambda"):
            remote.submit(voiced(0.5)).result(10)
        assert remote.submit(voiced(0.5), final=False).result(10) == "fine"
    finally:
        remote.close()
        service.close()


def test_a_failed_load_is_reported_to_workers(address):
    service = EngineService(address)
    service.failed("no such model")
    try:
        with pytest.raises(RuntimeError, match="no such model"):
            RemoteEngine.connect(address)
    finally:
        service.close()


# --- the real command ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "breeze_stream",
            "serve",
            "--model",
            "random:tiny",
            "--device",
            "cpu",
            "--port",
            str(port),
            "--workers",
            "2",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            if (await get(port, "/healthz"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.3)
    raise AssertionError("the server did not become healthy")


async def one_stream(port: int, audio: bytes, *, stop: bool = True, pace: float = 0.005) -> list[dict]:
    """Streams `audio` (then stop) while reading events, until the server ends the session."""
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.send(json.dumps({"type": "start"}))
        events = asyncio.ensure_future(receive_all(ws))
        try:
            for i in range(0, len(audio), 3200):
                await ws.send(audio[i : i + 3200])
                await asyncio.sleep(pace)
            if stop:
                await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:  # the server ended the session (a drain)
            pass
        return await asyncio.wait_for(events, 60)


def finish(process: subprocess.Popen) -> str:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    return process.communicate(timeout=10)[0].decode()


async def test_two_workers_serve_one_port_and_sum_their_metrics():
    port = free_port()
    process = start_server(port)
    try:
        await wait_healthy(port, process)
        audio = pcm16(two_phrases())
        results = await asyncio.gather(*(one_stream(port, audio) for _ in range(6)))
        for events in results:
            assert events[0]["type"] == "ready" and "random" in events[0]["model"]
            assert [e["segment"] for e in events if e["type"] == "final"] == [0, 1] and events[-1]["type"] == "end"
        for _ in range(4):  # whichever worker answers the scrape, it counts every worker's sessions
            status, body = await get(port, "/metrics")
            metrics = parse_prometheus(body.decode())
            assert status == 200 and metrics["breeze_sessions_total"] == 6 and metrics["breeze_finals_total"] == 12
        status, body = await get(port, "/healthz")
        assert status == 200 and json.loads(body)["engine"]["alive"]
    finally:
        output = finish(process)
    assert output.count("engine process ready") == 2, output


async def test_sigterm_drains_every_workers_sessions():
    port = free_port()
    process = start_server(port, "--drain-timeout", "20")
    try:
        await wait_healthy(port, process)
        audio = pcm16(np.concatenate([voiced(1.5), np.zeros(16000, np.float32), voiced(30.0)]))
        streams = [asyncio.ensure_future(one_stream(port, audio, stop=False, pace=0.1)) for _ in range(4)]
        await asyncio.sleep(5.0)  # every stream is in its second segment
        os.kill(process.pid, signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert process.wait(30) == 0
    finally:
        output = finish(process)
    for events in results:
        finals = [e for e in events if e["type"] == "final"]
        assert [f["segment"] for f in finals] == [0, 1], output
        assert events[-1] == {"type": "end", "reason": "shutdown"}


async def test_workers_exit_when_the_engine_process_dies():
    port = free_port()
    process = start_server(port)
    try:
        await wait_healthy(port, process)
        os.kill(process.pid, signal.SIGKILL)  # the parent only: the workers are in its session
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await get(port, "/healthz")
            except OSError:
                break  # nothing listens any more: every worker has exited
            await asyncio.sleep(0.3)
        else:
            raise AssertionError("workers still listen after the engine process died")
    finally:
        os.killpg(process.pid, signal.SIGKILL) if _group_alive(process.pid) else None
        process.communicate(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
