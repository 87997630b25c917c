"""Hardening (issue 8): API keys, origins and TLS; limits; graceful drain; fault isolation.

Real servers on port 0 with the tiny rigged engine of conftest.py (it answers "好" for every
segment), real WebSocket clients, and for SIGTERM the real command-line server in a subprocess.
The fuzz tests are in tests/test_fuzz.py, the load run in bench/soak.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import receive_all
from hardening_helpers import FakeConnection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

import engines.worker as worker_module
from bench.cli_server import CliServer
from bench.clips import pcm16, phrases, silence, voiced
from bench.tiny import TINY_TEXT, save_tiny_model
from engines.engine import Engine
from streaming.audio.codecs import AudioDecoder
from streaming.audio.transcriber import TranscriberConfig
from streaming.metrics import Metrics
from streaming.protocols.base import Outbox, SessionConfig, SessionContext
from streaming.protocols.native import NativeSession
from streaming.protocols.whisperlive import WhisperLiveConfig
from streaming.server import auth
from streaming.server.admission import AdmissionConfig
from streaming.server.app import Server, ServerConfig
from streaming.server.auth import KeyRing, Replay, handshake_token, without_token
from streaming.server.gate import AuthConfig, Gate, Limits

KEY = "k3y-0123456789abcdef"
OTHER_KEY = "second-key-fedcba9876543210"
TWO_PHRASES = phrases(2)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"# API keys\n{KEY}\n\n{OTHER_KEY}\n")
    return path


def url(server: Server, path: str = "/v1/stream", port: int | None = None, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{port or server.port}{path}"


async def native(
    server: Server,
    audio: np.ndarray = TWO_PHRASES,
    *,
    path: str = "/v1/stream",
    start: dict | None = None,
    frame_bytes: int = 6400,
    pace: float = 0.005,
    stop: bool = True,
    **connect_args,
) -> tuple[list[dict], int]:
    """A native-protocol stream: start, audio, stop; (events, close code)."""
    async with connect(url(server, path), **connect_args) as ws:
        reader = asyncio.ensure_future(receive_all(ws))
        try:
            await ws.send(json.dumps(start or {"type": "start"}))
            data = pcm16(audio)
            for i in range(0, len(data), frame_bytes):
                await ws.send(data[i : i + frame_bytes])
                await asyncio.sleep(pace)
            if stop:
                await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass  # the server ended the session early (the test looks at why)
        events = await asyncio.wait_for(reader, 30)
    return events, ws.close_code


def finals(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "final"]


async def http_get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}, body


async def upgrade_status(server: Server, path: str = "/v1/stream", port: int | None = None, **connect_args) -> int:
    """The HTTP status that refuses an upgrade (101 if it is accepted)."""
    try:
        async with connect(url(server, path, port), **connect_args):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def wait_until(condition, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


def sample(server: Server, name: str, labels: dict | None = None) -> float:
    return server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


# --- auth --------------------------------------------------------------------------------------------


def test_keys_are_compared_in_constant_time(key_file: Path, monkeypatch):
    ring = KeyRing(key_file)
    assert len(ring) == 2 and ring.check(KEY) and ring.check(OTHER_KEY)
    assert not ring.check(KEY[:-1]) and not ring.check(KEY + "x") and not ring.check("") and not ring.check(None)
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    assert ring.check(KEY)  # the first key matches, and the second is compared all the same
    assert compared == [(32, 32), (32, 32)], "every key, as fixed-length digests, without an early exit"


def test_key_rotation_and_bad_files(tmp_path: Path, key_file: Path):
    ring = KeyRing(key_file)
    time.sleep(0.01)
    key_file.write_text("rotated-key-000000000000\n")
    assert ring.check("rotated-key-000000000000") and not ring.check(KEY)
    key_file.write_text("# nothing\n\n")
    assert ring.check("rotated-key-000000000000"), "an emptied file keeps the keys read before"
    with pytest.raises(auth.AuthConfigError, match="no keys"):
        KeyRing(key_file)
    with pytest.raises(auth.AuthConfigError, match="cannot read"):
        KeyRing(tmp_path / "missing.txt")


def test_handshake_tokens():
    from websockets.datastructures import Headers

    assert handshake_token(Headers({"Authorization": "Bearer abc"}), "/v1/stream") == "abc"
    assert handshake_token(Headers({"Authorization": "bearer  abc "}), "/v1/stream") == "abc"
    assert handshake_token(Headers({"Authorization": "Basic abc"}), "/v1/stream") is None
    assert handshake_token(Headers(), "/v1/stream?x=1&token=t%2B1") == "t+1"
    assert handshake_token(Headers({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-1"}), "/") == "sk-1"
    assert handshake_token(Headers(), "/v1/stream") is None
    assert without_token("/v1/realtime?partials=true&token=abc") == "/v1/realtime?partials=true"
    assert without_token("/v1/stream?token=abc") == "/v1/stream"


async def test_native_auth(tiny_engine, key_file: Path):
    config = ServerConfig(port=0, auth=AuthConfig(api_key_file=str(key_file)))
    async with Server(config, engine=tiny_engine) as srv:
        # non-browser clients without a valid key: HTTP 401 before the upgrade
        assert await upgrade_status(srv) == 401
        assert await upgrade_status(srv, additional_headers={"Authorization": "Bearer wrong"}) == 401
        assert await upgrade_status(srv, "/v1/stream?token=wrong") == 401
        status, headers, body = await http_get(
            srv.port,
            "/v1/stream",
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert status == 401 and headers["www-authenticate"].startswith("Bearer") and b"API key" in body
        # a key in the header, in the URL, or (a browser) in the start message
        for kwargs in (
            {"additional_headers": {"Authorization": f"Bearer {KEY}"}},
            {"path": f"/v1/stream?token={OTHER_KEY}"},
            {"origin": "http://page.example", "start": {"type": "start", "token": KEY}},
        ):
            events, code = await native(srv, **kwargs)
            assert code == 1000 and [f["text"] for f in finals(events)] == [TINY_TEXT] * 2, (kwargs, events)
        # a browser without a key, or with a wrong one: told by an error event it can show
        for kwargs in (
            {"origin": "http://page.example"},
            {"origin": "http://page.example", "path": "/v1/stream?token=bad"},
            {"origin": "http://page.example", "start": {"type": "start", "token": "bad"}},
        ):
            events, code = await native(srv, **kwargs)
            assert code == 1008 and events[-1]["type"] == "error" and events[-1]["code"] == "unauthorized", events
            assert all(e["type"] == "error" for e in events), "nothing of a session before the key"
        assert sample(srv, "breeze_connections_rejected_total", {"reason": "unauthorized"}) == 4
        assert sample(srv, "breeze_errors_total", {"code": "unauthorized"}) == 3
        # probes and the page itself need no key
        assert (await http_get(srv.port, "/healthz"))[0] == 200 and (await http_get(srv.port, "/readyz"))[0] == 200
        assert (await http_get(srv.port, "/metrics"))[0] == 200 and (await http_get(srv.port, "/"))[0] == 200


async def test_first_message_key_times_out(tiny_engine, key_file: Path):
    config = ServerConfig(port=0, auth=AuthConfig(api_key_file=str(key_file)), limits=Limits(auth_timeout=0.3))
    async with Server(config, engine=tiny_engine) as srv:
        async with connect(url(srv), origin="http://page.example") as ws:
            events = await asyncio.wait_for(receive_all(ws), 5)
        assert ws.close_code == 1008 and events[-1]["code"] == "unauthorized" and "0.3 s" in events[-1]["message"]
        await wait_until(lambda: srv.gate.active == 0)


async def test_every_endpoint_needs_the_key(tiny_engine, key_file: Path):
    from test_twilio import CALL, call_messages, mulaw8k  # Twilio's messages, as tests/test_twilio.py sends them

    config = ServerConfig(port=0, auth=AuthConfig(api_key_file=str(key_file)), whisperlive=WhisperLiveConfig(port=0))
    async with Server(config, engine=tiny_engine) as srv:
        wl = srv.whisperlive.port
        for path in ("/v1/realtime", "/v1/calls/CA1"):
            assert await upgrade_status(srv, path) == 401, path
            assert await upgrade_status(srv, f"{path}?token={KEY}") == 101, path

        # OpenAI Realtime: the SDK's Authorization header; a browser's key subprotocol
        async with connect(
            url(srv, "/v1/realtime?partials=true"), additional_headers={"Authorization": f"Bearer {KEY}"}
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(
            url(srv, "/v1/realtime"),
            origin="http://page.example",
            subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"],
        ) as ws:
            assert ws.subprotocol == "realtime" and json.loads(await ws.recv())["type"] == "session.created"
        async with connect(url(srv, "/v1/realtime"), origin="http://page.example") as ws:  # browser, no key
            events = await receive_all(ws)
        assert ws.close_code == 1008 and events[-1]["error"]["code"] == "unauthorized"

        # WhisperLive: the key in the options message (its clients can set neither headers nor the URL)
        options = {"uid": "u1", "language": "zh", "task": "transcribe", "model": "small", "use_vad": True}
        for token, expected in ((KEY, "SERVER_READY"), (None, "ERROR"), ("bad", "ERROR")):
            async with connect(url(srv, "/", port=wl)) as ws:
                await ws.send(json.dumps({**options, **({"token": token} if token else {})}))
                reply = json.loads(await ws.recv())
                assert reply.get("message", reply.get("status")) == expected or reply.get("status") == expected, reply
                if expected == "ERROR":
                    assert reply["uid"] == "u1" and "API key" in reply["message"]
                    await receive_all(ws)
                    assert ws.close_code == 1008

        # Twilio: <Parameter name="token"> of the stream; the key never reaches subscribers
        audio = mulaw8k(TWO_PHRASES)
        async with connect(url(srv, f"/v1/calls/{CALL}?token={KEY}")) as subscriber:
            assert json.loads(await subscriber.recv())["type"] == "subscribed"
            messages = call_messages({"inbound": audio})
            messages[1]["start"]["customParameters"] = {"agent": "alice", "token": KEY}
            async with connect(url(srv, "/v1/twilio")) as twilio:
                for message in messages:
                    await twilio.send(json.dumps(message))
            events = await asyncio.wait_for(receive_all(subscriber), 20)
        start = next(e for e in events if e["type"] == "call_start")
        assert start["custom_parameters"] == {"agent": "alice"}
        assert [e["text"] for e in events if e["type"] == "final"] == [TINY_TEXT] * 2
        messages[1]["start"]["customParameters"] = {"agent": "alice"}
        async with connect(url(srv, "/v1/twilio")) as twilio:
            for message in messages[:3]:
                await twilio.send(json.dumps(message))
            await receive_all(twilio)
        assert twilio.close_code == 1008


async def test_allowed_origins(tiny_engine):
    config = ServerConfig(
        port=0, auth=AuthConfig(allowed_origins=auth.parse_origins("https://app.example, http://127.0.0.1:1/"))
    )
    async with Server(config, engine=tiny_engine) as srv:
        assert await upgrade_status(srv, origin="https://evil.example") == 403
        assert await upgrade_status(srv, "/v1/realtime", origin="https://evil.example") == 403
        assert await upgrade_status(srv, origin="https://APP.example") == 101
        assert await upgrade_status(srv, origin="http://127.0.0.1:1") == 101
        assert await upgrade_status(srv) == 101  # not a browser
    assert auth.parse_origins("*") is None and auth.parse_origins(None) is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (the command) makes the test certificate")
async def test_tls(tiny_engine, tmp_path: Path, key_file: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    client = ssl.create_default_context(cafile=str(cert))
    config = ServerConfig(port=0, certfile=str(cert), keyfile=str(key), auth=AuthConfig(api_key_file=str(key_file)))
    async with Server(config, engine=tiny_engine) as srv:
        async with connect(url(srv, f"/v1/stream?token={KEY}", scheme="wss"), ssl=client) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.send(pcm16(voiced(1.0)))
            await ws.send(json.dumps({"type": "stop"}))
            events = await receive_all(ws)
        assert [e["type"] for e in events] == ["ready", "final", "end"] and ws.close_code == 1000
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=client, server_hostname="127.0.0.1")
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        with pytest.raises(InvalidMessage):  # plain ws:// to a TLS port: no HTTP response comes back
            async with connect(url(srv), open_timeout=3):
                pass
    with pytest.raises(auth.AuthConfigError):
        auth.tls_context(tmp_path / "missing.pem", None)


# --- limits ------------------------------------------------------------------------------------------


async def test_max_sessions_and_readyz(tiny_engine):
    config = ServerConfig(port=0, limits=Limits(max_sessions=2))
    async with Server(config, engine=tiny_engine) as srv:
        assert (await http_get(srv.port, "/readyz"))[0] == 200
        async with connect(url(srv)) as a, connect(url(srv, "/v1/realtime")) as b:
            await wait_until(lambda: srv.gate.active == 2)
            status, headers, body = await http_get(srv.port, "/readyz")
            assert status == 503 and json.loads(body)["status"] == "full"
            try:
                async with connect(url(srv)):
                    pytest.fail("a third session was let in")
            except InvalidStatus as exc:
                assert exc.response.status_code == 503 and exc.response.headers["Retry-After"]
                assert b"limit of 2 sessions" in exc.response.body
            assert a.state.name == b.state.name == "OPEN"
        await wait_until(lambda: srv.gate.active == 0)
        assert (await http_get(srv.port, "/readyz"))[0] == 200
        assert sample(srv, "breeze_connections_rejected_total", {"reason": "overloaded"}) == 1


async def test_limits_recheck_after_the_upgrade():
    """Upgrades that passed the HTTP check together: the one over the limit gets `overloaded` and 1013."""
    metrics = Metrics()
    gate = Gate(Limits(max_sessions=1), AuthConfig(), metrics)
    ran = []

    async def run(connection):
        ran.append(connection)
        await asyncio.sleep(0.05)

    first, second = FakeConnection(end="open"), FakeConnection(end="open")
    await asyncio.gather(gate.serve(first, auth.NATIVE, run), gate.serve(second, auth.REALTIME, run))
    assert ran == [first]
    error = json.loads(second.sent[0])
    assert second.close_code == 1013 and error["type"] == "error" and error["error"]["code"] == "overloaded"
    assert gate.active == 0 and not gate._per_client


async def test_connections_per_client(tiny_engine):
    config = ServerConfig(port=0, limits=Limits(max_per_client=2))
    async with Server(config, engine=tiny_engine) as srv:
        async with connect(url(srv)), connect(url(srv, "/v1/realtime")):
            await wait_until(lambda: srv.gate.active == 2)
            assert await upgrade_status(srv) == 429
            assert (await http_get(srv.port, "/readyz"))[0] == 200  # the server is not full
        await wait_until(lambda: srv.gate.active == 0)
        assert await upgrade_status(srv) == 101


def test_client_address_behind_trusted_proxies():
    from types import SimpleNamespace

    from websockets.datastructures import Headers

    from streaming.server.gate import client_address, proxy_networks

    proxies = proxy_networks(("10.0.0.0/8", "127.0.0.1"))
    lb = SimpleNamespace(remote_address=("10.1.2.3", 4000))
    assert client_address(lb, Headers(), proxies) == "10.1.2.3"  # no header: the peer
    # the last hop that is not a trusted proxy; what the client itself wrote (further left) is not believed
    assert client_address(lb, Headers({"X-Forwarded-For": "1.1.1.1, 203.0.113.7, 10.9.9.9"}), proxies) == "203.0.113.7"
    headers = Headers()
    headers["X-Forwarded-For"] = "198.51.100.2"
    headers["X-Forwarded-For"] = "10.0.0.5"  # a second header line is a later hop
    assert client_address(lb, headers, proxies) == "198.51.100.2"
    direct = SimpleNamespace(remote_address=("203.0.113.9", 4000))  # not a proxy: its header is ignored
    assert client_address(direct, Headers({"X-Forwarded-For": "1.2.3.4"}), proxies) == "203.0.113.9"
    assert client_address(lb, Headers({"X-Forwarded-For": "1.2.3.4"})) == "10.1.2.3"  # no trusted proxies
    with pytest.raises(ValueError, match="trusted-proxies"):
        Limits(trusted_proxies=("10.0.0.0/33",))


async def test_connections_per_client_behind_a_trusted_proxy(tiny_engine):
    config = ServerConfig(port=0, limits=Limits(max_per_client=1, trusted_proxies=("127.0.0.0/8",)))
    a, b = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    async with Server(config, engine=tiny_engine) as srv:
        async with connect(url(srv), additional_headers=a):
            await wait_until(lambda: srv.gate.active == 1)
            assert await upgrade_status(srv, additional_headers=b) == 101  # another client behind the same proxy
            assert await upgrade_status(srv, additional_headers=a) == 429  # the same client again


async def test_session_duration(tiny_engine):
    config = ServerConfig(port=0, limits=Limits(max_session_seconds=1.0))
    async with Server(config, engine=tiny_engine) as srv:
        events, code = await native(
            srv, np.concatenate([silence(0.2), voiced(4.0)]), frame_bytes=3200, pace=0.05, stop=False
        )
    assert code == 1008
    assert [e["type"] for e in events][-2:] == ["final", "end"], "the open segment is flushed first"
    assert events[-1]["reason"] == "max_duration" and "1 s" in events[-1]["message"]


async def test_realtime_session_duration(tiny_engine):
    config = ServerConfig(port=0, limits=Limits(max_session_seconds=1.0))
    async with Server(config, engine=tiny_engine) as srv:
        async with connect(url(srv, "/v1/realtime")) as ws:
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                        },
                    }
                )
            )
            data = pcm16(np.concatenate([silence(0.2), voiced(3.0)]))
            try:
                for i in range(0, len(data), 3200):
                    await ws.send(
                        json.dumps(
                            {
                                "type": "input_audio_buffer.append",
                                "audio": base64.b64encode(data[i : i + 3200]).decode(),
                            }
                        )
                    )
                    await asyncio.sleep(0.03)
            except ConnectionClosed:
                pass
            events = await receive_all(ws)
    assert ws.close_code == 1008
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert [e["transcript"] for e in completed] == [TINY_TEXT], "the open turn is transcribed first"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "session_expired"


async def test_idle_timeout_flushes_then_closes(tiny_engine):
    config = ServerConfig(port=0, session=SessionConfig(idle_timeout=0.4))
    async with Server(config, engine=tiny_engine) as srv:
        events, code = await native(srv, voiced(1.0), stop=False, pace=0)
    assert (
        code == 1000 and [e["type"] for e in events][-2:] == ["final", "end"] and events[-1]["reason"] == "idle_timeout"
    )


class SlowEngine:
    """The tiny engine behind a delay per decode; records how much final audio a stream had waiting."""

    def __init__(self, engine: Engine, delay: float) -> None:
        self.engine, self.delay, self.name, self.device = engine, delay, engine.name, engine.device
        self.waiting: dict[object, float] = {}
        self.most_waiting = 0.0
        self.partials = self.finals = 0

    async def transcribe_async(self, audio, options, *, final: bool, stream=None, **kwargs):
        seconds = len(audio) / 16000
        if final:
            self.finals += 1
            self.waiting[stream] = self.waiting.get(stream, 0.0) + seconds
            self.most_waiting = max(self.most_waiting, self.waiting[stream])
        else:
            self.partials += 1
        try:
            await asyncio.sleep(self.delay)
            return await self.engine.transcribe_async(audio, options, final=final, stream=stream, **kwargs)
        finally:
            if final:
                self.waiting[stream] -= seconds

    def health(self) -> dict:
        return self.engine.health()

    def load_stats(self) -> dict:
        return self.engine.load_stats()


async def test_slow_engine_drops_partials_never_finals(tiny_engine):
    """Audio far faster than a slow engine: all finals arrive; the session's waiting audio stays
    bounded (it stops reading); partials are what is given up."""
    slow = SlowEngine(tiny_engine, delay=0.25)
    transcriber = TranscriberConfig(max_queued_audio=3.0)
    config = ServerConfig(port=0, session=SessionConfig(transcriber=transcriber))
    async with Server(config, engine=slow) as srv:
        audio = phrases(12, speech=1.0, pause=0.8)
        started = time.monotonic()
        events, code = await native(srv, audio, frame_bytes=16000, pace=0)  # 0.5 s frames, no pause
        elapsed = time.monotonic() - started
    assert code == 1000 and [f["text"] for f in finals(events)] == [TINY_TEXT] * 12
    # the engine fell behind (the bound was reached), and the session held its reading there:
    # at most the bound plus the segment that crossed it (unbounded, all 12 segments would wait)
    assert 3.0 <= slow.most_waiting <= 3.0 + 1.6, f"{slow.most_waiting:.1f} s of audio waited for finals"
    assert slow.finals == 12 and elapsed >= 0.25 * 12 / 3
    partial_opportunities = 12 * 1.2 / transcriber.partial_interval
    assert slow.partials < partial_opportunities / 2, (slow.partials, partial_opportunities)


async def test_slow_reader_is_disconnected(tiny_engine):
    """A client that stops reading: its events queue up to max_send_queue, then it is cut off."""
    config = SessionConfig(max_send_queue=8)
    connection = FakeConnection([json.dumps({"type": "start"})], block_send=True, end="open")
    session = NativeSession(connection, SessionContext(tiny_engine, Metrics(), config))
    task = asyncio.ensure_future(session.run())
    await wait_until(lambda: session._transcriber is not None)
    for i in range(40):
        session._out.send({"type": "partial", "segment": 0, "start": 0, "end": i, "text": "x" * 100, "stable": ""})
    assert session._out.backlog == 2, "the waiting events are dropped for the error and the close"
    error, close = session._out._queue.get_nowait(), session._out._queue.get_nowait()
    assert json.loads(error)["code"] == "overloaded" and (close.code, close.reason) == (1013, "send queue full")
    assert not connection.aborted, "the client gets limits.REFUSAL_TIMEOUT to read them"
    await asyncio.wait_for(task, 5)
    assert connection.aborted, "it did not read them: cut"
    assert session._metrics.registry.get_sample_value("breeze_errors_total", {"code": "overloaded"}) == 1

    outbox = Outbox(blocked := FakeConnection(block_send=True, end="open"), limit=8)
    outbox.start()
    for i in range(20):
        outbox.send({"type": "x", "i": i})
    assert outbox.overflowed and outbox.backlog <= 1 and not blocked.aborted
    await asyncio.wait_for(outbox.wait(), 5)
    assert (blocked.close_code, blocked.close_reason) == (1013, "send queue full")  # nothing was in the way


async def test_frame_limit_on_every_endpoint(tiny_engine):
    config = ServerConfig(port=0, session=SessionConfig(max_frame_bytes=4096), whisperlive=WhisperLiveConfig(port=0))
    async with Server(config, engine=tiny_engine) as srv:
        events, code = await native(srv, voiced(1.0), frame_bytes=8000)
        assert code == 1009 and events[-1]["code"] == "frame_too_large"
        async with connect(url(srv, "/v1/realtime")) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 8000}))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["error"]["code"] == "message_too_large"
        async with connect(url(srv, "/", port=srv.whisperlive.port)) as ws:
            await ws.send(json.dumps({"uid": "u"}))
            await ws.recv()
            await ws.send(bytes(8000))
            reply = json.loads(await ws.recv())
            assert reply["status"] == "ERROR" and "limit" in reply["message"]


# --- drain -----------------------------------------------------------------------------------------


async def open_stream(server: Server, seconds: float = 1.0) -> ClientConnection:
    """A native stream with an open segment (speech, no pause after it) that the server has received."""
    ws = await connect(url(server))
    await ws.send(json.dumps({"type": "start"}))
    assert json.loads(await ws.recv())["type"] == "ready"
    await ws.send(pcm16(voiced(seconds)))
    return ws


async def test_drain_flushes_every_stream(tiny_engine):
    slow = SlowEngine(tiny_engine, delay=0.5)  # keeps the drain open long enough to look at it
    srv = Server(ServerConfig(port=0, limits=Limits(drain_timeout=10)), engine=slow)
    await srv.start()
    clients = [await open_stream(srv) for _ in range(3)]
    await wait_until(lambda: sample(srv, "breeze_audio_seconds_total") >= 3.0)
    readers = [asyncio.ensure_future(receive_all(ws)) for ws in clients]
    started = time.monotonic()
    closing = asyncio.ensure_future(srv.close())
    await wait_until(lambda: srv.draining)
    status, _, body = await http_get(srv.port, "/readyz")
    assert status == 503 and json.loads(body)["status"] == "draining"
    assert (await http_get(srv.port, "/healthz"))[0] == 200 and sample(srv, "breeze_draining") == 1
    assert await upgrade_status(srv) == 503
    await closing
    assert time.monotonic() - started < 5
    for ws, reader in zip(clients, readers):
        events = await reader
        assert [e["type"] for e in events] == ["final", "end"] and events[1]["reason"] == "shutdown"
        assert ws.close_code == 1001


async def test_drain_timeout_bounds_the_shutdown(tiny_engine):
    """An engine that never answers: the drain gives up at its timeout and closes with 1001."""

    class Stuck:
        name, device = "stuck", "cpu"

        async def transcribe_async(self, *args, **kwargs):
            await asyncio.Event().wait()

        def health(self) -> dict:
            return {"alive": True}

        def load_stats(self) -> dict:
            return {}

    for timeout, force in ((1.5, False), (30.0, True)):  # the timeout; a second signal (force_close)
        srv = Server(ServerConfig(port=0, limits=Limits(drain_timeout=timeout)), engine=Stuck())
        await srv.start()
        ws = await open_stream(srv)
        await wait_until(lambda srv=srv: sample(srv, "breeze_audio_seconds_total") >= 1.0)
        started = time.monotonic()
        closing = asyncio.ensure_future(srv.close())
        if force:
            await asyncio.sleep(0.2)
            srv.force_close()
        await closing
        assert time.monotonic() - started < (1.5 if force else timeout + 0.5)
        await receive_all(ws)
        assert ws.close_code == 1001 and srv.session_count == 0


async def test_sigterm_with_five_streams(tmp_path: Path):
    """The real CLI server: SIGTERM while 5 streams are mid-segment; each gets its final and `end`
    before a 1001 close, and the process exits 0 within --drain-timeout."""
    server = CliServer(
        "--model", str(save_tiny_model(tmp_path / "tiny.pt")), "--device", "cpu", "--drain-timeout", "10"
    )
    try:
        await asyncio.to_thread(server.start, 60)
        base = f"ws://127.0.0.1:{server.port}/v1/stream"
        clients = []
        for i in range(5):
            ws = await connect(base)
            await ws.send(json.dumps({"type": "start"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(pcm16(np.concatenate([voiced(1.0), silence(1.0), voiced(1.0 + 0.1 * i)])))
            clients.append(ws)
        readers = [asyncio.ensure_future(receive_all(ws)) for ws in clients]
        await asyncio.sleep(1.0)  # the audio is in; the second segment of every stream is open
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        results = [await asyncio.wait_for(r, 15) for r in readers]
        code = await asyncio.to_thread(server.wait, 15)
        elapsed = time.monotonic() - started
    finally:
        server.kill()
    assert code == 0, server.output()
    assert elapsed < 10, f"exit {elapsed:.1f} s after SIGTERM"
    print(
        f"\nSIGTERM with 5 streams mid-segment: every stream got its finals, end and 1001; exit 0 {elapsed:.2f} s after"
    )
    for ws, events in zip(clients, results):
        types = [e["type"] for e in events]
        assert types[-1] == "end" and events[-1]["reason"] == "shutdown", types
        assert [e["segment"] for e in events if e["type"] == "final"] == [0, 1], types
        assert ws.close_code == 1001
    assert "shutting down: flushing the finals of 5 sessions" in server.output()


# --- fault isolation ---------------------------------------------------------------------------------


async def test_decode_exception_fails_only_its_session(tiny_engine, monkeypatch):
    real = AudioDecoder.decode
    poison = b"\x00\x80" * 17  # 34 bytes: no client of this test sends a frame of that size otherwise

    def decode(self, frame):
        if bytes(frame) == poison:
            raise RuntimeError("decoder bug")
        return real(self, frame)

    monkeypatch.setattr(AudioDecoder, "decode", decode)
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:

        async def bad() -> tuple[list[dict], int]:
            async with connect(url(srv)) as ws:
                await ws.send(json.dumps({"type": "start"}))
                await ws.send(pcm16(voiced(0.5)))
                await ws.send(poison)
                events = await receive_all(ws)
            return events, ws.close_code

        results = await asyncio.gather(bad(), *(native(srv) for _ in range(3)))
    events, code = results[0]
    assert code == 1011 and events[-1]["type"] == "error" and events[-1]["code"] == "internal"
    for events, code in results[1:]:
        assert code == 1000 and len(finals(events)) == 2


POISON_PEAK = 12345  # int16 peak of the stream whose segments make the encoder fail


async def test_engine_failure_fails_only_its_request(tiny_engine, monkeypatch):
    """An exception in the engine's batch: the request that causes it fails alone (its session gets
    `internal`), the requests batched with it are retried and their sessions see nothing."""
    real = worker_module.clip_mel
    failures = []

    def clip_mel(audio, *args, **kwargs):
        samples = np.asarray(audio)
        if samples.size and round(float(np.abs(samples).max()) * 32768) == POISON_PEAK:
            failures.append(samples.size)
            raise FloatingPointError("poisoned segment")
        return real(audio, *args, **kwargs)

    monkeypatch.setattr(worker_module, "clip_mel", clip_mel)
    poisoned = np.concatenate([silence(0.2), voiced(1.5, peak=POISON_PEAK / 32768)])
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:

        async def bad():
            data = (np.round(poisoned * 32768)).astype("<i2").tobytes()
            async with connect(url(srv)) as ws:
                await ws.send(json.dumps({"type": "start"}))
                try:
                    for i in range(0, len(data), 3200):
                        await ws.send(data[i : i + 3200])
                        await asyncio.sleep(0.005)
                except ConnectionClosed:  # a partial of the segment failed first: the session is closed
                    pass
                events = await receive_all(ws)
            return events, ws.close_code

        results = await asyncio.gather(bad(), *(native(srv, pace=0.003) for _ in range(4)))
    assert failures, "the poisoned segment reached the engine"
    events, code = results[0]
    assert code == 1011 and events[-1]["code"] == "internal"
    for events, code in results[1:]:
        assert code == 1000 and [f["text"] for f in finals(events)] == [TINY_TEXT] * 2


class WorkerCrash(BaseException):
    """Not an Exception: escapes the engine's per-batch handler, as a bug in its loop would."""


async def test_crashed_engine_worker_is_restarted(tiny_checkpoint, monkeypatch):
    engine = Engine(tiny_checkpoint, device="cpu")
    try:
        real = engine._step
        crashes = []

        def step():
            if not crashes:
                crashes.append(1)
                raise WorkerCrash("worker loop bug")
            return real()

        monkeypatch.setattr(engine, "_step", step)
        async with Server(ServerConfig(port=0), engine=engine) as srv:
            events, code = await native(srv)
            assert code == 1011 and events[-1]["code"] == "internal"  # its decode was in the crashed loop
            events, code = await native(srv)  # the restarted worker serves the next session
            assert code == 1000 and len(finals(events)) == 2
            status, _, body = await http_get(srv.port, "/healthz")
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok"
            assert health["engine"]["alive"] and health["engine"]["restarts"] == 1
            assert "WorkerCrash: worker loop bug" in health["engine"]["last_error"]
            assert "breeze_engine_restarts 1.0" in (await http_get(srv.port, "/metrics"))[2].decode()

            # a worker thread that is gone altogether is started again on the next request
            with engine._cv:
                engine._closed = True
                engine._cv.notify_all()
            engine._worker.join(5)
            engine._closed = False
            assert json.loads((await http_get(srv.port, "/readyz"))[2])["status"] == "ready"
            assert engine._worker.is_alive() and engine.restarts == 2
            events, code = await native(srv)
            assert code == 1000 and len(finals(events)) == 2
    finally:
        engine.close()


# --- clients that vanish ------------------------------------------------------------------------------


async def test_fifty_clients_killed_mid_stream(tiny_engine):
    """50 clients (native, Realtime, Twilio) whose TCP connections are cut mid-stream: the
    active-sessions gauge returns to 0, and no task or thread is left behind."""
    from test_twilio import call_messages, mulaw8k

    tasks_before = asyncio.all_tasks()
    threads_before = set(threading.enumerate())
    config = ServerConfig(port=0, limits=Limits(max_per_client=64), admission=AdmissionConfig(mode="off"))  # 50 at once
    async with Server(config, engine=tiny_engine) as srv:
        audio = np.concatenate([silence(0.2), voiced(2.0)])

        async def native_client(ws):
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
            data = pcm16(audio)
            for i in range(0, len(data), 3200):
                await ws.send(data[i : i + 3200])
                await asyncio.sleep(0.01)

        async def realtime_client(ws):
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                        },
                    }
                )
            )
            data = pcm16(audio)
            for i in range(0, len(data), 3200):
                await ws.send(
                    json.dumps(
                        {"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + 3200]).decode()}
                    )
                )
                await asyncio.sleep(0.01)

        async def twilio_client(ws, i):
            messages = call_messages({"inbound": mulaw8k(audio)}, call=f"CA{i:032d}", stream=f"MZ{i:032d}")[:-1]
            for message in messages:
                await ws.send(json.dumps(message))
                await asyncio.sleep(0.002)

        async def client(i: int):
            kind = ("/v1/stream", "/v1/realtime", "/v1/twilio")[i % 3]
            ws = await connect(url(srv, kind))
            run = native_client(ws) if i % 3 == 0 else realtime_client(ws) if i % 3 == 1 else twilio_client(ws, i)
            feeding = asyncio.ensure_future(run)
            await asyncio.sleep(0.3 + 0.02 * (i % 10))  # mid-stream, mid-segment
            ws.transport.abort()  # killed: no close frame, no stop
            await asyncio.gather(feeding, return_exceptions=True)
            await asyncio.gather(ws.wait_closed(), return_exceptions=True)

        await asyncio.gather(*(client(i) for i in range(50)))
        assert sample(srv, "breeze_sessions_total") >= 40
        await wait_until(lambda: srv.session_count == 0 and srv.gate.active == 0, 20, "every session to end")
        assert sample(srv, "breeze_sessions_active") == 0
        assert sample(srv, "breeze_errors_total", {"code": "internal"}) == 0
    await asyncio.sleep(0.1)
    leaked = [t for t in asyncio.all_tasks() - tasks_before if t is not asyncio.current_task() and not t.done()]
    assert not leaked, leaked
    await asyncio.sleep(0)
    threads = set(threading.enumerate()) - threads_before
    assert not [t for t in threads if t.is_alive()], threads


# --- the demo page with auth on ----------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="Debian chromium at /usr/bin/chromium drives the page"
)
async def test_demo_page_with_auth(tiny_engine, key_file: Path, tmp_path: Path):
    """The page passes its own ?token= on to /v1/stream; without it the page shows `unauthorized`."""
    async_api = pytest.importorskip("playwright.async_api")
    import soundfile
    from test_web_demo import QUIET_FLAGS, fake_mic_flags, wait_state

    wav = tmp_path / "speech.wav"
    soundfile.write(wav, np.concatenate([silence(0.5), voiced(1.5), silence(1.5)]), 16000, subtype="PCM_16")
    config = ServerConfig(port=0, auth=AuthConfig(api_key_file=str(key_file)))
    async with Server(config, engine=tiny_engine) as srv, async_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=QUIET_FLAGS + fake_mic_flags(wav)
        )
        try:
            page = await browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"http://127.0.0.1:{srv.port}/?token={KEY}")
            assert KEY not in await page.inner_text("body"), "the key is not shown on the page"
            await page.click('[data-testid="start"]')
            await page.wait_for_function("() => window.breezeDemo.finals.length >= 1", timeout=20_000)
            await page.click('[data-testid="stop"]')
            assert await wait_state(page, ("closed", "error"), 30) == "closed"
            assert (await page.evaluate("window.breezeDemo.finals"))[0]["text"] == TINY_TEXT

            await page.goto(f"http://127.0.0.1:{srv.port}/")  # no key
            await page.click('[data-testid="start"]')
            await page.wait_for_selector('[data-testid="error"]:not([hidden])', timeout=20_000)
            assert "unauthorized" in await page.inner_text('[data-testid="error"]')
            assert errors == []
        finally:
            await browser.close()


def test_serve_arguments(tmp_path: Path, key_file: Path):
    from test_server import serve_args

    from streaming.server.serve import config_from_args, run_serve

    config = config_from_args(
        serve_args(
            "--api-key-file",
            str(key_file),
            "--allowed-origins",
            "https://a.example/",
            "--max-sessions",
            "5",
            "--max-connections-per-client",
            "2",
            "--max-session-seconds",
            "60",
            "--max-queued-audio",
            "10",
            "--max-send-queue",
            "50",
            "--drain-timeout",
            "3",
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.1.1",
        )
    )
    assert config.auth == AuthConfig(api_key_file=str(key_file), allowed_origins=("https://a.example",))
    assert dataclasses.astuple(config.limits)[:3] == (5, 2, 60.0) and config.limits.drain_timeout == 3
    assert config.limits.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    with pytest.raises(ValueError, match="trusted-proxies"):
        config_from_args(serve_args("--trusted-proxies", "not-a-network"))
    assert config.session.max_send_queue == 50 and config.session.transcriber.max_queued_audio == 10
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert run_serve(serve_args("--api-key-file", str(empty))) == 2
    assert run_serve(serve_args("--certfile", str(tmp_path / "none.pem"))) == 2
    assert run_serve(serve_args("--drain-timeout", "0")) == 2


def test_replay_connection():
    async def go():
        connection = FakeConnection(["b"], end="open")
        replay = Replay(connection, ["a"])
        assert await replay.recv() == "a" and await replay.recv() == "b"
        assert replay.remote_address == connection.remote_address

    asyncio.run(go())
