"""The server over real sockets: native protocol, bad input, HTTP, shutdown, and the default model.

Most tests use the tiny engine of conftest.py (it answers "好" for any segment), so they check
protocol behaviour, not recognition; the dev-set tests at the end use the embedded whisper-base.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soxr
from conftest import receive_all
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bench.clips import DEV_DIR
from bench.tiny import TINY_TEXT
from engines.config import EngineConfig
from engines.engine import Engine
from engines.whisper.audio import load_audio
from engines.whisper.text import convert
from streaming.audio.codecs import encode_mulaw
from streaming.options import add_model_arguments, add_serve_arguments
from streaming.protocols.base import SessionConfig
from streaming.server.app import Server, ServerConfig
from streaming.server.http import WEB_ROOT
from streaming.server.serve import config_from_args, run_serve

RATE = 16000
LIMIT = 64 * 1024  # frame limit of the test server


def voiced(seconds: float, f0: float = 140.0) -> np.ndarray:
    """A harmonic-rich, syllable-modulated buzz: steady speech to webrtcvad (every frame voiced)."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / RATE
    x = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


TWO_PHRASES = np.concatenate([silence(0.3), voiced(1.5), silence(1.0), voiced(1.5), silence(1.0)])


@pytest.fixture
async def server(tiny_engine):
    config = ServerConfig(port=0, session=SessionConfig(max_frame_bytes=LIMIT))
    async with Server(config, engine=tiny_engine) as srv:
        yield srv


def url(server: Server, path: str = "/v1/stream") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def stream(
    server: Server,
    audio: bytes,
    *,
    start: dict | None = None,
    frame_bytes: int = 3200,
    pace: float = 0.01,
    stop: bool = True,
) -> tuple[list[dict], int]:
    """Sends start, the audio in frames (`pace` seconds apart), stop; returns (events, close code)."""
    async with connect(url(server)) as ws:
        await ws.send(json.dumps(start or {"type": "start"}))
        reader = asyncio.ensure_future(receive_all(ws))
        for i in range(0, len(audio), frame_bytes):
            await ws.send(audio[i : i + frame_bytes])
            await asyncio.sleep(pace)
        if stop:
            await ws.send(json.dumps({"type": "stop"}))
        events = await asyncio.wait_for(reader, 30)
    return events, ws.close_code


def check_contract(events: list[dict], duration: float) -> dict[int, dict]:
    """docs/architecture.md's ordering rules (and the retraction rule of streaming.protocols.native); returns the finals by segment."""
    assert events[0]["type"] == "ready" and events[-1]["type"] == "end", events
    finals: dict[int, dict] = {}
    stable: dict[int, str] = {}
    retracted: set[int] = set()
    last_final = -1
    for event in events[1:-1]:
        segment = event["segment"]
        assert 0 <= event["start"] < event["end"] <= duration + 0.05, event
        assert segment not in retracted, f"an event of segment {segment} after its retraction"
        if event["type"] == "partial" and not event["text"]:
            retracted.add(segment)  # its final found no speech: the partials are withdrawn, no final comes
        elif event["type"] == "partial":
            assert segment not in finals, f"partial after the final of segment {segment}"
            assert event["text"].startswith(event["stable"]), event
            assert event["stable"].startswith(stable.get(segment, "")), "the stable prefix shrank"
            stable[segment] = event["stable"]
        else:
            assert event["type"] == "final", event
            assert segment not in finals, f"two finals for segment {segment}"
            assert segment > last_final, "finals out of segment order"
            finals[segment] = event
            last_final = segment
    return finals


# --- protocol ------------------------------------------------------------------------------------


async def test_two_phrases(server: Server):
    events, code = await stream(server, pcm16(TWO_PHRASES), pace=0.03)  # 3x real time: room for partials
    assert code == 1000
    ready = events[0]
    assert ready["model"] == "tiny-random" and ready["sample_rate"] == 16000 and ready["session"]
    finals = check_contract(events, len(TWO_PHRASES) / RATE)
    assert sorted(finals) == [0, 1]
    assert all(f["text"] == TINY_TEXT for f in finals.values())
    # speech ends at 1.8 s and 4.3 s; a final's end is the last voiced frame plus padding (0.2 s)
    assert 1.8 <= finals[0]["end"] <= 2.2 and 4.3 <= finals[1]["end"] <= 4.7
    assert 0.0 <= finals[0]["start"] <= 0.3 and 2.4 <= finals[1]["start"] <= 2.8
    assert any(e["type"] == "partial" for e in events)


async def test_stop_flushes_the_open_segment(server: Server):
    events, code = await stream(server, pcm16(voiced(1.2)), pace=0)
    assert code == 1000
    finals = check_contract(events, 1.2)
    assert list(finals) == [0] and finals[0]["end"] == pytest.approx(1.2, abs=0.03)


async def test_odd_byte_frames_give_the_same_finals(server: Server):
    """pcm_s16le cut at odd byte offsets (3-byte and 1-byte frames among them): every byte joins the
    next frame, so the finals are those of whole-sample frames. A dropped byte would shift every later
    sample by half a sample, turning the rest of the stream into noise and moving the segments."""
    audio = pcm16(TWO_PHRASES)
    whole, _ = await stream(server, audio, frame_bytes=3200, pace=0.001)
    cuts, position = [], 0
    for size in itertools.cycle((3, 1, 1999, 3201, 5)):
        if position >= len(audio):
            break
        cuts.append(audio[position : position + size])
        position += size
    async with connect(url(server)) as ws:
        await ws.send(json.dumps({"type": "start"}))
        reader = asyncio.ensure_future(receive_all(ws))
        for frame in cuts:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "stop"}))
        split = await asyncio.wait_for(reader, 30)
    key = lambda events: [(e["segment"], e["start"], e["end"], e["text"]) for e in events if e["type"] == "final"]  # noqa: E731
    assert len(key(whole)) == 2 and key(split) == key(whole)
    assert "warning" not in split[-1]


async def test_half_sample_at_the_end_is_reported(server: Server):
    """A stream that stops one byte into a sample: the finals still come, and `end` says the byte was dropped."""
    events, code = await stream(server, pcm16(voiced(1.2)) + b"\x01", pace=0)
    assert code == 1000 and [e["type"] for e in events][-2:] == ["final", "end"]
    assert "1 byte(s) into a pcm_s16le sample" in events[-1]["warning"]


async def test_other_formats_and_no_partials(server: Server):
    """8 kHz mu-law (resampled) with partials off: finals only, times in stream seconds."""
    audio = soxr.resample(TWO_PHRASES, RATE, 8000)
    start = {"type": "start", "encoding": "mulaw", "sample_rate": 8000, "partials": False, "language": "auto"}
    events, code = await stream(server, encode_mulaw(audio), start=start, frame_bytes=800)
    assert code == 1000 and events[0]["sample_rate"] == 8000
    finals = check_contract(events, len(TWO_PHRASES) / RATE)
    assert sorted(finals) == [0, 1] and 4.2 <= finals[1]["end"] <= 4.7
    assert not any(e["type"] == "partial" for e in events)


async def test_concurrent_sessions(server: Server):
    results = await asyncio.gather(*(stream(server, pcm16(TWO_PHRASES), frame_bytes=1600 * (i + 1)) for i in range(4)))
    assert len({events[0]["session"] for events, _ in results}) == 4
    for events, code in results:
        assert code == 1000
        assert sorted(check_contract(events, len(TWO_PHRASES) / RATE)) == [0, 1]


async def test_close_without_stop_ends_the_session(server: Server):
    async with connect(url(server)) as ws:
        await ws.send(json.dumps({"type": "start"}))
        await ws.send(pcm16(voiced(1.0)))
        assert json.loads(await ws.recv())["type"] == "ready"
    for _ in range(100):
        if server.session_count == 0:
            break
        await asyncio.sleep(0.01)
    assert server.session_count == 0
    assert "breeze_sessions_active 0.0" in server.metrics.render().decode()
    assert not [t for t in asyncio.all_tasks() if "StreamingTranscriber" in repr(t)]


async def test_idle_timeout_flushes(tiny_engine):
    config = ServerConfig(port=0, session=SessionConfig(idle_timeout=0.5))
    async with Server(config, engine=tiny_engine) as srv:
        events, code = await stream(srv, pcm16(voiced(1.0)), stop=False, pace=0)
    assert code == 1000
    assert [e["type"] for e in events][-2:] == ["final", "end"] and events[-1]["reason"] == "idle_timeout"


async def test_shutdown_flushes_and_goes_away(tiny_engine):
    srv = Server(ServerConfig(port=0), engine=tiny_engine)
    await srv.start()
    async with connect(url(srv)) as ws:
        await ws.send(json.dumps({"type": "start"}))
        await ws.send(pcm16(voiced(1.0)))
        assert json.loads(await ws.recv())["type"] == "ready"
        while srv.metrics.registry.get_sample_value("breeze_audio_seconds_total") < 1.0:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(srv.close())
        events = await receive_all(ws)
        await closing
    assert [e["type"] for e in events] == ["final", "end"] and events[1]["reason"] == "shutdown"
    assert ws.close_code == 1001


# --- bad input -----------------------------------------------------------------------------------

START = json.dumps({"type": "start"})
BAD_INPUT = {
    # case: (frames to send, error code, close code)
    "malformed JSON": (['{"type": "start", '], "bad_request", 1007),
    "binary before start": ([b"\x00\x01" * 160], "bad_request", 1003),
    "first message not start": (['{"type": "stop"}'], "bad_request", 1008),
    "unknown encoding": (['{"type": "start", "encoding": "opus"}'], "unsupported_encoding", 1003),
    "sample rate too high": (['{"type": "start", "sample_rate": 96000}'], "bad_request", 1008),
    "sample rate too low": (['{"type": "start", "sample_rate": 4000}'], "bad_request", 1008),
    "stereo": (['{"type": "start", "channels": 2}'], "bad_request", 1008),
    "unknown language": (['{"type": "start", "language": "fr"}'], "bad_request", 1008),
    "words not a boolean": (['{"type": "start", "words": "yes"}'], "bad_request", 1008),
    "frame over the limit": ([START, bytes(LIMIT + 2)], "frame_too_large", 1009),
    "text where audio is expected": ([START, b"\x00" * 320, "AAAAAAAA"], "bad_request", 1003),
}


@pytest.mark.parametrize("case", BAD_INPUT)
async def test_bad_input(server: Server, case: str):
    frames, code, close_code = BAD_INPUT[case]

    async def bad() -> list[dict]:
        async with connect(url(server)) as ws:
            for frame in frames:
                await ws.send(frame)
            events = await asyncio.wait_for(receive_all(ws), 10)
        assert ws.close_code == close_code, (ws.close_code, ws.close_reason)
        return events

    good = asyncio.ensure_future(stream(server, pcm16(TWO_PHRASES)))
    events = await bad()
    error = events[-1]
    assert error["type"] == "error" and error["code"] == code, events
    assert len(error["message"]) > 30  # says what was wrong and how to fix it
    assert all(e["type"] == "ready" for e in events[:-1])
    good_events, good_code = await good
    assert good_code == 1000 and sorted(check_contract(good_events, len(TWO_PHRASES) / RATE)) == [0, 1]
    assert f'breeze_errors_total{{code="{code}"}} 1.0' in server.metrics.render().decode()


# --- HTTP ----------------------------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A raw GET, so that paths reach the server exactly as written (no client normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    root = tmp_path / "web"
    (root / "js").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>demo</title>")
    (root / "js" / "app.js").write_text("console.log(1)")
    (root / "style.css").write_text("body {}")
    (root / ".secret").write_text("SECRET")
    (tmp_path / "outside.txt").write_text("TOP SECRET")
    return root


async def test_http(tiny_engine, web_root: Path):
    config = ServerConfig(port=0, web_root=web_root)
    async with Server(config, engine=tiny_engine) as srv:
        status, headers, body = await http_get(srv.port, "/healthz")
        assert status == 200 and json.loads(body)["model"] == "tiny-random"

        await stream(srv, pcm16(TWO_PHRASES))
        status, headers, body = await http_get(srv.port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        text = body.decode()
        for name in (
            "breeze_sessions_active",
            "breeze_sessions_total",
            "breeze_audio_seconds_total",
            "breeze_segments_total",
            "breeze_partials_total",
            "breeze_finals_total",
            "breeze_decoder_forwards_total",
            "breeze_tokens_total",
            "breeze_encoder_seconds_total",
            "breeze_decoder_seconds_total",
            "breeze_final_latency_seconds_bucket",
            "breeze_final_engine_seconds_bucket",
            'breeze_draft_tokens_proposed_total{source="hypothesis"}',
            'breeze_draft_tokens_accepted_total{source="medusa"}',
            'breeze_errors_total{code="internal"}',
        ):
            assert name in text, name
        assert "breeze_finals_total 2.0" in text and "breeze_segments_total 2.0" in text
        assert "breeze_final_latency_seconds_count 2.0" in text
        assert "breeze_final_engine_seconds_count 2.0" in text
        assert (
            "_created" not in text
        )  # counters export no creation timestamps (breeze_sessions_created read as a count)

        status, headers, body = await http_get(srv.port, "/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and b"demo" in body
        status, headers, _ = await http_get(srv.port, "/js/app.js")
        assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
        status, headers, _ = await http_get(srv.port, "/style.css")
        assert status == 200 and headers["content-type"] == "text/css; charset=utf-8"
        for path in (
            "/missing.html",
            "/../outside.txt",
            "/%2e%2e/outside.txt",
            "/js/..%2f..%2f..%2foutside.txt",
            "/.secret",
            "/js/",
            "/v1/nothing",
        ):
            status, _, body = await http_get(srv.port, path)
            assert status == 404 and b"SECRET" not in body, path
        status, _, _ = await http_get(srv.port, "/v1/stream")  # no upgrade: not a WebSocket request
        assert status == 426

        with pytest.raises(InvalidStatus) as info:
            async with connect(url(srv, "/v1/other")):
                pass
        assert info.value.response.status_code == 404


def test_default_web_root():
    assert WEB_ROOT == Path(__file__).resolve().parents[1] / "web"


async def test_healthz_503_while_loading(tiny_engine, monkeypatch):
    release = threading.Event()

    def slow_load(spec: str, device: str = "auto", **kwargs) -> Engine:
        release.wait(10)
        return tiny_engine

    monkeypatch.setattr(Engine, "load", staticmethod(slow_load))
    monkeypatch.setattr(tiny_engine, "close", lambda: None)  # the session fixture owns it
    async with Server(ServerConfig(port=0)) as srv:
        status, _, body = await http_get(srv.port, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "loading"
        with pytest.raises(InvalidStatus) as info:
            async with connect(url(srv)):
                pass
        assert info.value.response.status_code == 503
        release.set()
        assert await srv.wait_ready() is tiny_engine
        status, _, _ = await http_get(srv.port, "/healthz")
        assert status == 200


async def test_failed_model_load_is_reported(monkeypatch):
    def broken_load(spec: str, device: str = "auto", **kwargs) -> Engine:
        raise FileNotFoundError(f"{spec}: no such file or directory")

    monkeypatch.setattr(Engine, "load", staticmethod(broken_load))
    async with Server(ServerConfig(port=0, engine=EngineConfig(model="/nowhere.pt"))) as srv:
        with pytest.raises(FileNotFoundError):
            await srv.wait_ready()
        status, _, body = await http_get(srv.port, "/healthz")
        assert status == 503 and "/nowhere.pt" in json.loads(body)["error"]


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_serve_arguments():
    config = config_from_args(
        serve_args(
            "--port",
            "0",
            "--silence-ms",
            "300",
            "--partial-window",
            "full",
            "--max-frame-bytes",
            "4096",
            "--language",
            "auto",
            "--vad-aggressiveness",
            "3",
        )
    )
    assert config.port == 0 and config.engine.model == "default" and config.session.language == "auto"
    assert config.session.max_frame_bytes == 4096 and config.session.transcriber.partial_window is None
    segmenter = config.session.transcriber.segmenter
    assert segmenter.hangover_ms == 300 and segmenter.aggressiveness == 3 and segmenter.pre_roll_ms == 300
    assert config_from_args(serve_args()).session.transcriber.partial_window == 2.0
    assert run_serve(serve_args("--vad-aggressiveness", "7")) == 2  # refused before anything starts


def test_cuda_graph_modes_reach_the_engine():
    from engines.gpu.cuda_graphs import GraphOptions

    assert config_from_args(serve_args()).engine.cuda_graphs == "graph"
    config = config_from_args(serve_args("--cuda-graphs", "compile", "--fp32-weights"))
    assert config.engine.engine_options() == {"fp16_weights": False, "cuda_graphs": GraphOptions(mode="compile")}
    with pytest.raises(SystemExit):
        serve_args("--cuda-graphs", "sometimes")


# --- the embedded default model on dev clips -----------------------------------------------------

needs_dev = pytest.mark.skipif(
    not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (the ../shared checkout)"
)


@pytest.fixture
async def default_server(default_engine):
    async with Server(ServerConfig(port=0), engine=default_engine) as srv:
        yield srv


async def replay(server: Server, audio: np.ndarray, speed: float) -> tuple[list[dict], int]:
    """pcm_s16le in 100 ms frames at `speed` x real time."""
    return await stream(server, pcm16(audio), frame_bytes=3200, pace=0.1 / speed)


def is_traditional(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text) and convert(text, "s2twp") == text


@pytest.mark.dev
@needs_dev
@pytest.mark.parametrize("clip", ["hhchen-f05-read-0056.wav", "fireredasr-BAC009S0764W0121.wav"])
async def test_dev_clip(default_server: Server, clip: str):
    audio = np.concatenate([silence(0.5), load_audio(DEV_DIR / clip), silence(1.0)])
    started = time.monotonic()
    events, code = await replay(default_server, audio, speed=4.0)
    assert code == 1000
    finals = check_contract(events, len(audio) / RATE)
    assert finals, events
    assert all(is_traditional(f["text"]) for f in finals.values()), finals
    assert any(e["type"] == "partial" and e["text"] for e in events)
    assert time.monotonic() - started < len(audio) / RATE  # faster than real time, finals included


@pytest.mark.dev
@needs_dev
@pytest.mark.parametrize("noise", ["silence", "white noise"])
async def test_dev_no_final_without_speech(default_server: Server, noise: str):
    """White noise this loud opens VAD segments, so the model's no-speech verdict is what keeps
    finals (and partials) away."""
    audio = (
        silence(30)
        if noise == "silence"
        else (np.random.default_rng(0).standard_normal(30 * RATE) * 0.1).astype(np.float32)
    )
    events, code = await replay(default_server, audio, speed=15.0)
    assert code == 1000
    assert check_contract(events, 30.0) == {}, events
    last_partial = {e["segment"]: e["text"] for e in events if e["type"] == "partial"}
    assert not any(last_partial.values()), "hallucinated partials were not retracted"
    segments = default_server.metrics.registry.get_sample_value("breeze_segments_total")
    assert segments == 0 if noise == "silence" else segments >= 1
