"""Twilio Media Streams at /v1/twilio and the transcripts of calls: subscribers of
/v1/calls/{callSid}, the webhook and the JSONL call log. Twilio's side is simulated message for
message (connected, start, 20 ms mu-law media per track, stop) over a real socket.

The tiny engine answers "好" for every segment; the dev-clip test compares the default model on an
8 kHz mu-law call with the same clip at 16 kHz on the native endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.clips import DEV_DIR, RATE, dev_manifest, pcm16, silence, two_phrases, voiced
from bench.tiny import TINY_TEXT
from engines.whisper.audio import load_audio
from streaming.audio.codecs import encode_mulaw
from streaming.protocols.calls import PHONE_SEGMENTER, CallConfig
from streaming.scoring import score
from streaming.server.app import Server, ServerConfig

CALL = "CA0123456789abcdef0123456789abcdef"
STREAM = "MZ0123456789abcdef0123456789abcdef"
PARAMS = {"agent": "alice", "queue": "billing"}


@pytest.fixture
async def server(tiny_engine):
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:
        yield srv


def mulaw8k(audio16k: np.ndarray) -> bytes:
    return encode_mulaw(soxr.resample(audio16k, RATE, 8000))


def start_message(call: str = CALL, stream: str = STREAM, tracks=("inbound", "outbound"), params=PARAMS) -> dict:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": stream,
        "start": {
            "streamSid": stream,
            "accountSid": "AC00",
            "callSid": call,
            "tracks": list(tracks),
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }


def media_messages(tracks: dict[str, bytes], stream: str = STREAM, first_sequence: int = 2) -> list[dict]:
    """20 ms (160-byte) media messages, the tracks interleaved as Twilio sends them."""
    out, sequence = [], first_sequence
    chunks = max(len(data) for data in tracks.values()) // 160
    for i in range(chunks):
        for track, data in tracks.items():
            chunk = data[i * 160 : (i + 1) * 160]
            if chunk:
                out.append(
                    {
                        "event": "media",
                        "sequenceNumber": str(sequence),
                        "streamSid": stream,
                        "media": {
                            "track": track,
                            "chunk": str(i + 1),
                            "timestamp": str(i * 20),
                            "payload": base64.b64encode(chunk).decode(),
                        },
                    }
                )
                sequence += 1
    return out


def call_messages(tracks: dict[str, bytes], call: str = CALL, stream: str = STREAM) -> list[dict | str | bytes]:
    media = media_messages(tracks, stream)
    stop = {
        "event": "stop",
        "sequenceNumber": str(len(media) + 2),
        "streamSid": stream,
        "stop": {"accountSid": "AC00", "callSid": call},
    }
    return [{"event": "connected", "protocol": "Call", "version": "1.0.0"}, start_message(call, stream), *media, stop]


async def play(server: Server, messages: list, burst: int = 25, pace: float = 0.005, close: bool = True) -> list:
    """Sends the messages as Twilio would (faster than real time); what the server sent back."""
    async with connect(f"ws://127.0.0.1:{server.port}/v1/twilio") as ws:
        for i, message in enumerate(messages):
            await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
            if i % burst == burst - 1:
                await asyncio.sleep(pace)
        if not close:
            return []
        await asyncio.sleep(0.05)
        replies = []
        while True:
            try:
                replies.append(await asyncio.wait_for(ws.recv(), 0.05))
            except (asyncio.TimeoutError, ConnectionClosed):
                return replies


async def subscribe(server: Server, call: str = CALL) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{server.port}/v1/calls/{call}")
    assert json.loads(await ws.recv())["type"] == "subscribed"
    return ws


async def transcript(ws: ClientConnection, timeout: float = 20) -> list[dict]:
    """Events until the server closes the subscription (after call_end)."""
    events = []

    async def read():
        try:
            async for message in ws:
                events.append(json.loads(message))
        except ConnectionClosed:
            pass

    await asyncio.wait_for(read(), timeout)
    return events


def finals(events: list[dict], track: str) -> list[dict]:
    return [e for e in events if e["type"] == "final" and e["track"] == track]


OUTBOUND = np.concatenate([silence(2.0), voiced(1.2), silence(2.1)])  # the agent speaks between the caller's phrases


# --- calls -----------------------------------------------------------------------------------------


async def test_both_tracks_reach_subscribers(server: Server):
    ws = await subscribe(server)
    replies = await play(server, call_messages({"inbound": mulaw8k(two_phrases()), "outbound": mulaw8k(OUTBOUND)}))
    events = await transcript(ws)
    assert ws.close_code == 1000 and replies == []  # Twilio gets nothing back
    assert events[0] == {
        "type": "call_start",
        "call_sid": CALL,
        "stream_sid": STREAM,
        "account_sid": "AC00",
        "tracks": ["inbound", "outbound"],
        "custom_parameters": PARAMS,
        "media_format": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    assert events[-1] == {"type": "call_end", "call_sid": CALL}
    inbound, outbound = finals(events, "inbound"), finals(events, "outbound")
    assert [f["text"] for f in inbound] == [TINY_TEXT, TINY_TEXT] and [f["text"] for f in outbound] == [TINY_TEXT]
    # seconds of each track's own audio: speech ends at 1.8 and 4.3 s (inbound), runs 2.0-3.2 s (outbound)
    pad, pre = PHONE_SEGMENTER.end_padding_ms / 1000, PHONE_SEGMENTER.pre_roll_ms / 1000
    assert [round(f["end"] - pad, 1) for f in inbound] in ([1.8, 4.3], [1.9, 4.3], [1.8, 4.4], [1.9, 4.4]), inbound
    assert 2.0 - pre - 0.1 <= outbound[0]["start"] <= 2.1 and 3.1 <= outbound[0]["end"] - pad <= 3.35, outbound
    for event in events[1:-1]:
        assert event["call_sid"] == CALL and event["stream_sid"] == STREAM and event["track"] in ("inbound", "outbound")
        assert event["type"] in ("partial", "final")
    for track in ("inbound", "outbound"):  # the native ordering, per track
        segments = [(e["type"], e["segment"]) for e in events[1:-1] if e["track"] == track]
        finals_at = [i for i, (kind, _) in enumerate(segments) if kind == "final"]
        assert all(seg > segments[i][1] for i in finals_at for kind, seg in segments[i + 1 :] if kind == "partial")


async def test_late_subscriber_gets_the_transcript(server: Server):
    await play(server, call_messages({"inbound": mulaw8k(two_phrases())}))
    for _ in range(100):
        if server.calls.status(CALL) == "ended":
            break
        await asyncio.sleep(0.02)
    async with connect(f"ws://127.0.0.1:{server.port}/v1/calls/{CALL}") as ws:
        events = [json.loads(m) async for m in ws]
    assert events[0] == {"type": "subscribed", "call_sid": CALL, "status": "ended"}
    assert [e["type"] for e in events[1:]] == ["call_start", "final", "final", "call_end"]  # finals only, no partials


async def test_close_without_stop_is_flushed(server: Server):
    ws = await subscribe(server)
    messages = call_messages({"inbound": mulaw8k(voiced(1.5))})[:-1]  # no stop, no trailing silence
    await play(server, messages)
    events = await transcript(ws)
    assert [e["text"] for e in finals(events, "inbound")] == [TINY_TEXT] and events[-1]["type"] == "call_end"


async def test_two_streams_of_one_call(server: Server):
    """<Stream track="inbound_track"> and <Stream track="outbound_track">: two connections, one call;
    call_end once both have stopped."""
    ws = await subscribe(server)
    inbound = call_messages({"inbound": mulaw8k(two_phrases())}, stream="MZ1")
    outbound = call_messages({"outbound": mulaw8k(OUTBOUND)}, stream="MZ2")
    await asyncio.gather(play(server, inbound), play(server, outbound))
    events = await transcript(ws)
    assert [e["stream_sid"] for e in events if e["type"] == "call_start"] in (["MZ1", "MZ2"], ["MZ2", "MZ1"])
    assert len(finals(events, "inbound")) == 2 and len(finals(events, "outbound")) == 1
    assert [e["type"] for e in events].count("call_end") == 1 and events[-1]["type"] == "call_end"


async def test_shutdown_flushes_calls(tiny_engine):
    srv = Server(ServerConfig(port=0), engine=tiny_engine)
    await srv.start()
    sub = await subscribe(srv)
    async with connect(f"ws://127.0.0.1:{srv.port}/v1/twilio") as twilio:
        for message in call_messages({"inbound": mulaw8k(voiced(1.2))})[:-1]:
            await twilio.send(json.dumps(message))
        while (srv.metrics.registry.get_sample_value("breeze_audio_seconds_total") or 0) < 1.1:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(srv.close())
        events = await transcript(sub)
        try:
            await twilio.recv()
        except ConnectionClosed:
            pass
        await closing
    assert twilio.close_code == 1001
    assert [e["text"] for e in finals(events, "inbound")] == [TINY_TEXT] and events[-1]["type"] == "call_end"


# --- out of band: webhook and call log -----------------------------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    posts: list[dict] = []
    attempts = 0

    def do_POST(self):
        type(self).attempts += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).attempts == 1:
            time.sleep(0.5)  # slow, then a server error: the post is retried, audio is not held up
            self.send_response(503)
        else:
            type(self).posts.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.posts, Receiver.attempts = [], 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", Receiver
    httpd.shutdown()


async def test_webhook_and_call_log(tiny_engine, receiver, tmp_path: Path):
    url, received = receiver
    calls = CallConfig(webhook=url, log_dir=tmp_path / "calls", webhook_backoff=0.05)
    async with Server(ServerConfig(port=0, calls=calls), engine=tiny_engine) as srv:
        ws = await subscribe(srv)
        started = time.monotonic()
        await play(srv, call_messages({"inbound": mulaw8k(two_phrases()), "outbound": mulaw8k(OUTBOUND)}))
        events = await transcript(ws)
        assert time.monotonic() - started < 5  # a slow webhook holds nothing up
        for _ in range(200):
            if len(received.posts) == 4:
                break
            await asyncio.sleep(0.02)
    posts = received.posts
    assert received.attempts == 5  # one retried
    assert [p["type"] for p in posts] == ["final", "final", "final", "call_end"]
    assert sorted(p["track"] for p in posts[:3]) == ["inbound", "inbound", "outbound"]
    assert all(p["call_sid"] == CALL and p["custom_parameters"] == PARAMS and p["text"] == TINY_TEXT for p in posts[:3])
    assert posts[:3] == [{**e, "custom_parameters": PARAMS} for e in events if e["type"] == "final"]
    lines = [json.loads(line) for line in (tmp_path / "calls" / f"{CALL}.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == ["call_start", "final", "final", "final", "call_end"]
    assert lines[0]["custom_parameters"] == PARAMS and all("time" in line for line in lines)


# --- bad input -------------------------------------------------------------------------------------


async def test_bad_messages_are_logged_and_ignored(server: Server, caplog):
    """Nothing goes back to Twilio, every bad message is logged, the call's good audio is all transcribed."""
    good = call_messages({"inbound": mulaw8k(two_phrases())})
    media = [m for m in good if m["event"] == "media"]
    half = len(media) // 2
    bad = [
        {"event": "media", "media": {"track": "inbound", "payload": "AAAA"}},  # before start
        {"event": "stop"},  # before start
        *good[:2],  # connected, start
        "{not json",
        b"\x00\x01\x02",
        {"event": "hangup"},
        ["media"],
        {"event": "media", "sequenceNumber": "999999", "media": {"track": "inbound", "payload": "%%%not base64%%%"}},
        start_message(call="CAother"),  # a second start
        *media[:half],
        {"event": "media", "sequenceNumber": "3", "media": {"track": "inbound", "payload": "AAAA"}},  # out of order
        {"event": "mark", "mark": {"name": "m1"}},
        {"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}},
        *media[half:],
        good[-1],  # stop
        {**media[0], "sequenceNumber": str(10**7)},  # after stop
    ]
    ws = await subscribe(server)
    with caplog.at_level(logging.WARNING, logger="streaming.protocols.twilio"):
        replies = await play(server, bad)
        events = await transcript(ws)
    assert replies == []
    assert [e["text"] for e in finals(events, "inbound")] == [TINY_TEXT, TINY_TEXT]
    assert {"type": "dtmf", "call_sid": CALL, "stream_sid": STREAM, "track": "inbound", "digit": "5"} in events
    logged = caplog.text
    for kind in (
        "media before start",
        "stop before start",
        "invalid JSON",
        "binary frame",
        "unknown event",
        "message without an event",
        "malformed base64",
        "out-of-order message",
        "second start",
        "media after stop",
    ):
        assert f"ignored {kind}" in logged, kind
    assert server.calls.status("CAother") == "waiting"


async def test_bad_subscriber_path(server: Server):
    async with connect(f"ws://127.0.0.1:{server.port}/v1/calls/") as ws:
        events = await transcript(ws)
    assert ws.close_code == 1008 and events[0]["type"] == "error" and "callSid" in events[0]["message"]


# --- the embedded default model on a dev clip ------------------------------------------------------


@pytest.mark.dev
@pytest.mark.skipif(not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (the ../shared checkout)")
async def test_dev_clip_over_the_phone(default_engine):
    """A dev clip as an 8 kHz mu-law call (20 ms media messages): its finals on /v1/calls/{callSid},
    scored against the reference and against the same clip at 16 kHz on the native endpoint."""
    clip = "hhchen-f05-read-0056.wav"
    entry = dev_manifest()[clip]
    audio = np.concatenate([silence(0.5), load_audio(DEV_DIR / clip), silence(1.0)])
    async with Server(ServerConfig(port=0), engine=default_engine) as srv:
        ws = await subscribe(srv)
        await play(srv, call_messages({"inbound": mulaw8k(audio)}), burst=25, pace=0.1)  # 5x real time
        events = await transcript(ws, timeout=60)
        async with connect(f"ws://127.0.0.1:{srv.port}/v1/stream") as native:
            await native.send(json.dumps({"type": "start"}))
            data = pcm16(audio)
            for i in range(0, len(data), 3200):
                await native.send(data[i : i + 3200])
            await native.send(json.dumps({"type": "stop"}))
            native_events = [json.loads(m) async for m in native]
    phone = "".join(f["text"] for f in finals(events, "inbound"))
    wideband = "".join(e["text"] for e in native_events if e["type"] == "final")
    phone_score = score(entry["text"], phone, entry["lang"])
    wideband_cer = score(entry["text"], wideband, entry["lang"]).rate
    margin = max(0.05, 1 / phone_score.ref_tokens)  # 5 points, or one character of a short reference
    assert phone and phone_score.rate <= wideband_cer + margin, (phone, wideband, entry["text"])
