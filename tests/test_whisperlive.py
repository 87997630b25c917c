"""The WhisperLive-compatible listener: collabora's own client library (`whisper-live`, its
StreamingTranscriptionClient) where it is installed, and a client written from the protocol notes
for the details and for bad input.

The tiny engine answers "好" for every segment; the dev-clip test uses the default model.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.clips import DEV_DIR, dev_manifest, pcm16, silence, two_phrases, voiced
from bench.tiny import TINY_TEXT
from engines.whisper.audio import load_audio
from streaming.protocols.base import SessionConfig
from streaming.protocols.whisperlive import WhisperLiveConfig
from streaming.scoring import score
from streaming.server.app import Server, ServerConfig

try:
    from whisper_live.client import StreamingTranscriptionClient
except Exception as exc:  # not installed, or PyAudio/portaudio missing
    StreamingTranscriptionClient = None
    WHY_NO_CLIENT = f"whisper-live's client library is not importable here ({type(exc).__name__}: {exc})"
else:
    WHY_NO_CLIENT = ""

LIMIT = 64 * 1024
OPTIONS = {"uid": "c0ffee", "language": "zh", "task": "transcribe", "model": "small", "use_vad": True}


async def listener(engine, **config) -> Server:
    whisperlive = WhisperLiveConfig(port=0, **config)
    srv = Server(
        ServerConfig(port=0, whisperlive=whisperlive, session=SessionConfig(max_frame_bytes=LIMIT)), engine=engine
    )
    await srv.start()
    return srv


@pytest.fixture
async def server(tiny_engine):
    srv = await listener(tiny_engine)
    yield srv
    await srv.close()


def url(server: Server, path: str = "") -> str:
    return f"ws://127.0.0.1:{server.whisperlive.port}{path}"


async def receive_all(ws: ClientConnection) -> list[dict]:
    messages = []
    try:
        async for message in ws:
            messages.append(json.loads(message))
    except ConnectionClosed:
        pass
    return messages


async def session(
    server: Server,
    audio: bytes,
    options: dict = OPTIONS,
    frame: int = 16384,
    pace: float = 0.01,
    end: str | bytes | None = b"END_OF_AUDIO",
    path: str = "",
) -> tuple[list[dict], int]:
    """Options, audio frames, END_OF_AUDIO; all messages until the server closes, and the close code."""
    async with connect(url(server, path)) as ws:
        await ws.send(json.dumps(options))
        reader = asyncio.ensure_future(receive_all(ws))
        for i in range(0, len(audio), frame):
            await ws.send(audio[i : i + frame])
            await asyncio.sleep(pace)
        if end is not None:
            await ws.send(end)
        messages = await asyncio.wait_for(reader, 30)
    return messages, ws.close_code


def check_segments(messages: list[dict], uid: str = "c0ffee", model: str = "tiny-random") -> list[dict]:
    """WhisperLive's shapes: uid everywhere, SERVER_READY first, segment times as 3-decimal strings,
    completed segments that never change or overlap; returns the completed segments."""
    assert messages[0] == {
        "uid": uid,
        "message": "SERVER_READY",
        "backend": "faster_whisper",
        "server": "breeze-stream",
        "model": model,
    }
    done: dict[str, dict] = {}
    for message in messages[1:]:
        assert message["uid"] == uid
        if "segments" not in message:
            continue
        assert message["segments"], "an empty segments list breaks the stock client (segments[-1])"
        for i, seg in enumerate(message["segments"]):
            for key in ("start", "end"):
                assert isinstance(seg[key], str) and len(seg[key].split(".")[1]) == 3, seg
            assert float(seg["start"]) < float(seg["end"])
            if seg["completed"]:
                assert done.setdefault(seg["start"], seg) == seg, "a completed segment changed"
            else:
                assert i == len(message["segments"]) - 1, "only the last segment may be open"
    completed = sorted(done.values(), key=lambda s: float(s["start"]))
    for a, b in zip(completed, completed[1:]):
        assert float(a["end"]) <= float(b["start"])
    return completed


def float32(audio: np.ndarray) -> bytes:
    return audio.astype("<f4").tobytes()


# --- the protocol, hand-written client -----------------------------------------------------------


async def test_float32_two_phrases(server: Server):
    messages, code = await session(server, float32(two_phrases()), path="/any/path")
    assert code == 1000
    completed = check_segments(messages)
    assert [s["text"] for s in completed] == [TINY_TEXT, TINY_TEXT]
    assert 1.8 <= float(completed[0]["end"]) <= 2.2 and 4.3 <= float(completed[1]["end"]) <= 4.7
    assert any(not s["completed"] for m in messages for s in m.get("segments", []))  # partials


async def test_int16_old_client_keys_and_text_end_of_audio(server: Server):
    """The first message of older clients (iOS app, whisper-live-client) with extra keys; int16
    audio; END_OF_AUDIO as a text frame still flushes the open segment."""
    options = {
        "uid": "ios-1",
        "language": None,
        "task": "transcribe",
        "model": "small",
        "use_vad": True,
        "max_clients": 4,
        "max_connection_time": 600,
        "multilingual": True,
        "audio_format": "int16",
    }
    messages, code = await session(
        server, pcm16(np.concatenate([silence(0.3), voiced(1.2)])), options=options, end="END_OF_AUDIO"
    )
    assert code == 1000
    completed = check_segments(messages, uid="ios-1")
    assert [s["text"] for s in completed] == [TINY_TEXT]
    assert float(completed[0]["end"]) == pytest.approx(1.5, abs=0.05)  # the flush: speech ran to the end
    language = [m for m in messages if "language" in m]
    assert (
        len(language) == 1 and language[0]["language"].isalpha()
    )  # detected (language null): whatever the tiny model says


async def test_wait_when_full(tiny_engine):
    srv = await listener(tiny_engine, max_clients=1, max_connection_time=120)
    try:
        async with connect(url(srv)) as first:
            await first.send(json.dumps(OPTIONS))
            assert json.loads(await first.recv())["message"] == "SERVER_READY"
            async with connect(url(srv)) as second:
                await second.send(json.dumps({**OPTIONS, "uid": "late"}))
                messages = await receive_all(second)
            assert second.close_code == 1013
            assert len(messages) == 1 and messages[0]["uid"] == "late" and messages[0]["status"] == "WAIT"
            assert 1.9 < messages[0]["message"] <= 2.0  # minutes until the first one's 120 s are up
            await first.send(b"END_OF_AUDIO")
            await receive_all(first)
        messages, code = await session(srv, float32(voiced(0.5)))  # a slot is free again
        assert code == 1000 and messages[0]["message"] == "SERVER_READY"
    finally:
        await srv.close()


async def test_disconnect_at_the_time_limit(tiny_engine):
    srv = await listener(tiny_engine, max_connection_time=1.0)
    try:
        started = time.monotonic()
        messages, code = await session(srv, float32(np.concatenate([silence(0.2), voiced(0.6)])), frame=3200, end=None)
        assert 1.0 <= time.monotonic() - started < 5
        assert code == 1000 and messages[-1] == {"uid": "c0ffee", "message": "DISCONNECT"}
        assert [s["text"] for s in check_segments(messages)] == [TINY_TEXT]  # flushed before DISCONNECT
    finally:
        await srv.close()


async def test_shutdown_flushes_then_disconnects(tiny_engine):
    srv = await listener(tiny_engine)
    async with connect(url(srv)) as ws:
        await ws.send(json.dumps(OPTIONS))
        assert json.loads(await ws.recv())["message"] == "SERVER_READY"
        await ws.send(float32(voiced(1.0)))
        while srv.metrics.registry.get_sample_value("breeze_audio_seconds_total") < 1.0:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(srv.close())
        messages = await receive_all(ws)
        await closing
    assert ws.close_code == 1001
    assert messages[-1]["message"] == "DISCONNECT"
    assert any(s["completed"] and s["text"] == TINY_TEXT for m in messages for s in m.get("segments", []))


async def test_listener_is_off_by_default(tiny_engine):
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:
        assert srv.whisperlive is None


# --- bad input -----------------------------------------------------------------------------------

BAD = {
    # case: (frames, close code, words of the message)
    "no uid": ([json.dumps({"language": "zh"})], 1008, "uid"),
    "not JSON": (["{uid: 1"], 1007, "JSON"),
    "audio first": ([b"\x00\x00\x80\x3f" * 100], 1003, "options"),
    "unknown language": ([json.dumps({**OPTIONS, "language": "klingon"})], 1008, "language"),
    "unknown task": ([json.dumps({**OPTIONS, "task": "summarize"})], 1008, "task"),
    "unknown audio_format": ([json.dumps({**OPTIONS, "audio_format": "mp3"})], 1008, "audio_format"),
    "text frame mid-stream": ([json.dumps(OPTIONS), float32(voiced(0.2)), "hello"], 1003, "END_OF_AUDIO"),
    "frame over the limit": ([json.dumps(OPTIONS), bytes(LIMIT + 4)], 1009, "limit"),
}


@pytest.mark.parametrize("case", BAD)
async def test_bad_input(server: Server, case: str):
    frames, close_code, words = BAD[case]
    good = asyncio.ensure_future(session(server, float32(two_phrases())))
    async with connect(url(server)) as ws:
        for frame in frames:
            await ws.send(frame)
        messages = await asyncio.wait_for(receive_all(ws), 10)
    assert ws.close_code == close_code
    error = messages[-1]
    assert error["status"] == "ERROR" and words in error["message"] and len(error["message"]) > 30, error
    good_messages, good_code = await good
    assert good_code == 1000 and len(check_segments(good_messages)) == 2


# --- collabora's client library --------------------------------------------------------------------


def run_stock_client(port: int, audio: np.ndarray, lang: str | None, pace: float) -> tuple[list[str], list[str]]:
    """StreamingTranscriptionClient as its docstring shows it: int16 chunks in, callbacks out."""
    committed, partials = [], []
    client = StreamingTranscriptionClient(
        "127.0.0.1",
        port,
        lang=lang,
        model="small",
        on_partial_transcript=lambda text, segments: partials.append(text),
        on_committed_transcript=lambda text, segments: committed.append(text),
    )
    data = pcm16(audio)
    with client:
        for i in range(0, len(data), 8192):  # 4096 samples, as the stock client sends
            client.send(data[i : i + 8192], pcm_format="int16")
            time.sleep(pace)
    return committed, partials


@pytest.mark.skipif(StreamingTranscriptionClient is None, reason=WHY_NO_CLIENT or "-")
async def test_stock_streaming_client(server: Server):
    committed, partials = await asyncio.to_thread(run_stock_client, server.whisperlive.port, two_phrases(), "zh", 0.02)
    assert committed == [TINY_TEXT, TINY_TEXT]
    assert partials


# --- the embedded default model on a dev clip ----------------------------------------------------


@pytest.mark.dev
@pytest.mark.skipif(not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (the ../shared checkout)")
async def test_dev_clip(default_engine):
    clip = "fireredasr-BAC009S0764W0121.wav"
    entry = dev_manifest()[clip]
    audio = np.concatenate([silence(0.5), load_audio(DEV_DIR / clip), silence(1.0)])
    srv = await listener(default_engine)
    try:
        if StreamingTranscriptionClient is not None:
            committed, _ = await asyncio.to_thread(run_stock_client, srv.whisperlive.port, audio, "zh", 0.05)
        else:
            messages, code = await session(srv, float32(audio), frame=16384, pace=0.05)
            committed = [s["text"] for s in check_segments(messages, model=default_engine.name)]
    finally:
        await srv.close()
    text = "".join(committed)
    assert score(entry["text"], text, entry["lang"]).rate < 0.25, (text, entry["text"])
