"""OpenAI Realtime transcription sessions at /v1/realtime, driven by the unmodified `openai` SDK
(GA `client.realtime` and beta `client.beta.realtime`) and by a raw WebSocket for bad input.

The tiny engine answers "好" for every segment, so these tests check the protocol; the dev-clip
test at the end compares the default model's `.completed` text with the native endpoint's.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import soxr
from conftest import receive_all
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.clips import DEV_DIR, RATE, dev_manifest, pcm16, silence, two_phrases, voiced
from bench.tiny import TINY_TEXT
from engines.whisper.audio import load_audio
from streaming.audio.codecs import encode_alaw, encode_mulaw
from streaming.audio.segmenter import SegmenterConfig
from streaming.protocols.realtime import segmenter_config
from streaming.scoring import score
from streaming.server.app import Server, ServerConfig

AsyncOpenAI = pytest.importorskip("openai", reason="the openai SDK (pyproject test extra) is not installed").AsyncOpenAI
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@pytest.fixture
async def server(tiny_engine):
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:
        yield srv


def sdk(server: Server) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-test", base_url=f"http://127.0.0.1:{server.port}/v1")


def beta_sdk(server: Server) -> AsyncOpenAI:
    """The beta client dials wss:// whatever the base_url's scheme (every SDK version so far), so a
    plain ws:// server is named by websocket_base_url, a documented client option."""
    return AsyncOpenAI(
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{server.port}/v1",
        websocket_base_url=f"ws://127.0.0.1:{server.port}/v1",
    )


def ga_session(fmt: dict, turn_detection: str | None = "server_vad", language: str = "zh") -> dict:
    """A GA session.update body; turn_detection None sends null (no VAD)."""
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": fmt,
                "transcription": {"model": "gpt-4o-transcribe", "language": language},
                "turn_detection": None if turn_detection is None else {"type": turn_detection},
                "noise_reduction": {"type": "near_field"},
            }
        },
    }


async def append_all(conn, data: bytes, chunk: int, pace: float = 0.005) -> None:
    for i in range(0, len(data), chunk):
        await conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + chunk]).decode())
        await asyncio.sleep(pace)


async def events_until(conn, done, timeout: float = 20.0) -> list:
    """SDK events until `done(events)` holds."""
    events = []

    async def read():
        async for event in conn:
            events.append(event)
            if done(events):
                return

    await asyncio.wait_for(read(), timeout)
    return events


def completed(n: int):
    return lambda events: sum(e.type == COMPLETED for e in events) >= n


def check_items(events: list, added: str) -> list[str]:
    """Per-item rules: VAD events and commit before the item event, deltas append-only and adding
    up to a prefix of the completed transcript, one completed per committed item, in commit order."""
    items, deltas, order, done = {}, {}, [], []
    previous = None
    for e in events:
        if e.type == "input_audio_buffer.speech_started":
            items[e.item_id] = ["started"]
        elif e.type == "input_audio_buffer.speech_stopped":
            items[e.item_id].append("stopped")
        elif e.type == "input_audio_buffer.committed":
            assert e.previous_item_id == previous, (e.previous_item_id, previous)
            previous = e.item_id
            items.setdefault(e.item_id, []).append("committed")
            order.append(e.item_id)
        elif e.type == added:
            assert items[e.item.id][-1] == "committed" and e.item.role == "user"
            items[e.item.id].append("added")
        elif e.type == DELTA:
            assert e.content_index == 0
            deltas[e.item_id] = deltas.get(e.item_id, "") + e.delta
        elif e.type == COMPLETED:
            assert items[e.item_id][-1] == "added", items[e.item_id]
            assert e.transcript.startswith(deltas.get(e.item_id, "")), (e.transcript, deltas)
            assert e.usage.type == "duration" and e.usage.seconds > 0
            items[e.item_id].append("completed")
            done.append(e.item_id)
        elif e.type == "error":
            raise AssertionError(f"unexpected error event: {e}")
    assert done == order[: len(done)], "completed out of commit order"
    return done


# --- the SDK, GA and beta ------------------------------------------------------------------------


async def test_ga_server_vad_pcm16(server: Server):
    audio = soxr.resample(two_phrases(), RATE, 24000)
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session=ga_session({"type": "audio/pcm", "rate": 24000}))
        await append_all(conn, pcm16(audio), 4800)  # 100 ms chunks
        events = await events_until(conn, completed(2))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["session.created", "session.updated"]
    created = events[0].session
    assert created.type == "transcription" and created.audio.input.format.rate == 24000
    updated = events[1].session.audio.input
    assert updated.transcription.language == "zh" and updated.turn_detection.type == "server_vad"
    assert updated.turn_detection.silence_duration_ms == 480  # the server's hangover: the effective setting
    done = check_items(events, "conversation.item.added")
    assert len(done) == 2
    transcripts = [e.transcript for e in events if e.type == COMPLETED]
    assert transcripts == [TINY_TEXT, TINY_TEXT]
    started = [e.audio_start_ms for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e.audio_end_ms for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert 0 <= started[0] <= 300 and 2400 <= started[1] <= 2800, started
    assert 1800 <= stopped[0] <= 2200 and 4300 <= stopped[1] <= 4700, stopped
    assert "conversation.item.done" in kinds and "x.transcription.partial" not in kinds
    assert all(
        e.item_id == events[kinds.index("input_audio_buffer.speech_started")].item_id
        for e in events[: kinds.index("input_audio_buffer.committed")]
        if e.type == DELTA
    )


async def test_beta_g711_ulaw(server: Server):
    audio = soxr.resample(two_phrases(), RATE, 8000)
    async with beta_sdk(server).beta.realtime.connect(model="gpt-4o-transcribe") as conn:
        await conn.transcription_session.update(
            session={
                "input_audio_format": "g711_ulaw",
                "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "zh"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 500,
                },
            }
        )
        await append_all(conn, encode_mulaw(audio), 800)
        events = await events_until(conn, completed(2))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["transcription_session.created", "transcription_session.updated"]
    session = events[1].session
    assert session.input_audio_format == "g711_ulaw" and session.turn_detection.silence_duration_ms == 500
    assert len(check_items(events, "conversation.item.created")) == 2
    assert "conversation.item.added" not in kinds and "conversation.item.done" not in kinds


async def test_manual_commit_pcma_and_clear(server: Server):
    """turn_detection null: no VAD events; commit makes the item (all speech since the last commit);
    an empty commit is an error; clear drops what was not committed."""
    phrase = soxr.resample(np.concatenate([voiced(1.0), silence(0.6), voiced(0.8), silence(0.2)]), RATE, 8000)
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session=ga_session({"type": "audio/pcma"}, turn_detection=None))
        await append_all(conn, encode_alaw(phrase), 1600)
        await conn.input_audio_buffer.commit()
        first = await events_until(conn, completed(1))
        await conn.input_audio_buffer.commit()  # nothing appended since
        await append_all(conn, encode_alaw(voiced(1.0, rate=8000)), 1600)
        await conn.input_audio_buffer.clear()
        await conn.input_audio_buffer.commit()  # cleared: empty again
        await append_all(conn, encode_alaw(np.concatenate([silence(0.3, 8000), voiced(0.7, rate=8000)])), 1600)
        await conn.input_audio_buffer.commit()
        second = await events_until(conn, completed(1))
    kinds = [e.type for e in first + second]
    assert not any(k.startswith("input_audio_buffer.speech") for k in kinds)
    assert first[1].session.audio.input.turn_detection is None
    # the first item holds two speech segments: one transcript of both
    assert [e.transcript for e in first + second if e.type == COMPLETED] == [TINY_TEXT * 2, TINY_TEXT]
    committed = [e for e in first if e.type == COMPLETED][0]
    assert committed.usage.seconds == pytest.approx(2.6, abs=0.05)  # the whole buffer, two speech segments
    errors = [e.error for e in second if e.type == "error"]
    assert [e.code for e in errors] == ["input_audio_buffer_commit_empty"] * 2
    assert "100 ms" in errors[0].message
    assert kinds.count("input_audio_buffer.cleared") == 1
    assert kinds.count("input_audio_buffer.committed") == 2


async def test_clear_drops_the_open_turn(server: Server):
    async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription&partials=true") as ws:
        await ws.send(
            json.dumps({"type": "session.update", "session": ga_session({"type": "audio/pcm", "rate": 16000})})
        )
        first = voiced(1.2)
        for i in range(0, len(first), 1600):
            await ws.send(
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(pcm16(first[i : i + 1600])).decode(),
                    }
                )
            )
        events = [json.loads(await ws.recv()) for _ in range(3)]
        assert [e["type"] for e in events] == [
            "session.created",
            "session.updated",
            "input_audio_buffer.speech_started",
        ]
        dropped = events[2]["item_id"]
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        rest = np.concatenate([silence(0.5), voiced(1.5), silence(0.7)])
        for i in range(0, len(rest), 1600):  # 100 ms at a time, so partials have time to run
            await ws.send(
                json.dumps(
                    {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(rest[i : i + 1600])).decode()}
                )
            )
            await asyncio.sleep(0.02)
        while (event := json.loads(await ws.recv()))["type"] != COMPLETED:
            events.append(event)
        events.append(event)
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.cleared" in kinds
    assert not [
        e
        for e in events
        if e.get("item_id") == dropped
        and e["type"] not in (DELTA, "x.transcription.partial")
        and e["type"] != "input_audio_buffer.speech_started"
    ]
    assert event["item_id"] != dropped and event["transcript"] == TINY_TEXT
    partials = [e for e in events if e["type"] == "x.transcription.partial"]
    assert partials and all(p["text"].startswith(p["stable"]) for p in partials)


# --- bad input -----------------------------------------------------------------------------------

SESSION = {"type": "session.update", "session": ga_session({"type": "audio/pcm", "rate": 24000})}
BAD_EVENTS = {
    # case: (frames, error code, param)
    "malformed JSON": (['{"type": "session.update", '], "invalid_json", None),
    "not an object": (["[1, 2]"], "invalid_event", "type"),
    "unknown event type": (['{"type": "input_audio_buffer.flush"}'], "invalid_event_type", "type"),
    "audio before session set-up": (
        ['{"type": "input_audio_buffer.append", "audio": "AAAA"}'],
        "session_not_configured",
        None,
    ),
    "malformed base64": ([SESSION, '{"type": "input_audio_buffer.append", "audio": "***"}'], "invalid_base64", "audio"),
    "audio not a string": ([SESSION, '{"type": "input_audio_buffer.append", "audio": 5}'], "invalid_type", "audio"),
    "conversation session": (
        ['{"type": "session.update", "session": {"type": "realtime"}}'],
        "invalid_value",
        "session.type",
    ),
    "unknown format": (
        [
            '{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": '
            '{"type": "audio/opus"}}}}}'
        ],
        "invalid_value",
        "session.audio.input.format.type",
    ),
    "rate out of range": (
        [
            '{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": '
            '{"type": "audio/pcm", "rate": 96000}}}}}'
        ],
        "invalid_value",
        "session.audio.input.format.rate",
    ),
    "unknown language": (
        ['{"type": "transcription_session.update", "session": {"input_audio_transcription": {"language": "xx"}}}'],
        "invalid_value",
        "session.input_audio_transcription.language",
    ),
    "bad VAD threshold": (
        [
            '{"type": "transcription_session.update", "session": {"turn_detection": '
            '{"type": "server_vad", "threshold": 2}}}'
        ],
        "invalid_value",
        "session.turn_detection.threshold",
    ),
    "beta format unknown": (
        ['{"type": "transcription_session.update", "session": {"input_audio_format": "mp3"}}'],
        "invalid_value",
        "session.input_audio_format",
    ),
    "response.create": (['{"type": "response.create"}'], "unsupported_event", "type"),
    "binary frame": ([b"\x00\x01" * 100], "invalid_message", None),
    "empty commit": ([SESSION, '{"type": "input_audio_buffer.commit"}'], "input_audio_buffer_commit_empty", None),
}


@pytest.mark.parametrize("case", BAD_EVENTS)
async def test_bad_input_gets_an_error_event_and_the_session_goes_on(server: Server, case: str):
    frames, code, param = BAD_EVENTS[case]
    good = asyncio.ensure_future(ga_two_phrases(server))
    async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription") as ws:
        for frame in frames:
            await ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "evt_probe"}))
        events = []
        while (event := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "input_audio_buffer.cleared":
            events.append(event)
        errors = [e["error"] for e in events if e["type"] == "error"]
        assert len(errors) == 1, events
        assert (
            errors[0]["type"] == "invalid_request_error" and errors[0]["code"] == code and errors[0]["param"] == param
        )
        assert len(errors[0]["message"]) > 30  # says what was wrong and how to fix it
        # the session is still usable
        await ws.send(json.dumps(SESSION))
        speech = pcm16(soxr.resample(np.concatenate([voiced(1.0), silence(0.8)]), RATE, 24000))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()}))
        while (event := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != COMPLETED:
            assert event["type"] != "error", event
        assert event["transcript"] == TINY_TEXT
    assert await good == [TINY_TEXT, TINY_TEXT]


async def ga_two_phrases(server: Server) -> list[str]:
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session=ga_session({"type": "audio/pcm", "rate": 24000}))
        await append_all(conn, pcm16(soxr.resample(two_phrases(), RATE, 24000)), 9600)
        events = await events_until(conn, completed(2))
    return [e.transcript for e in events if e.type == COMPLETED]


async def test_error_event_echoes_the_client_event_id(server: Server):
    async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
        await ws.send(json.dumps({"type": "nope", "event_id": "evt_42"}))
        await ws.recv()  # session.created
        error = json.loads(await ws.recv())
    assert error["type"] == "error" and error["error"]["event_id"] == "evt_42" and error["event_id"] != "evt_42"
    assert 'breeze_errors_total{code="bad_request"} 1.0' in server.metrics.render().decode()


# --- failure and shutdown ------------------------------------------------------------------------


class FailingFinals:
    """The tiny engine, except that final decodes fail."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.name, self.device = engine.name, engine.device

    async def transcribe_async(self, audio, options, **kwargs):
        if kwargs.get("final"):
            raise RuntimeError("engine exploded")
        return await self._engine.transcribe_async(audio, options, **kwargs)


async def test_engine_failure_fails_the_items(tiny_engine):
    async with Server(ServerConfig(port=0), engine=FailingFinals(tiny_engine)) as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
            await ws.send(json.dumps(SESSION))
            speech = pcm16(soxr.resample(np.concatenate([voiced(1.0), silence(0.8)]), RATE, 24000))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()}))
            events = []
            try:
                async for message in ws:
                    events.append(json.loads(message))
            except ConnectionClosed:
                pass
        assert ws.close_code == 1011
    failed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(failed) == 1 and failed[0]["item_id"] == committed[0]["item_id"]
    assert failed[0]["error"]["type"] == "server_error" and events[-1]["type"] == "error"
    assert not [e for e in events if e["type"] == COMPLETED]


async def test_shutdown_commits_the_open_turn(tiny_engine):
    srv = Server(ServerConfig(port=0), engine=tiny_engine)
    await srv.start()
    async with connect(f"ws://127.0.0.1:{srv.port}/v1/realtime") as ws:
        await ws.send(json.dumps(SESSION))
        speech = pcm16(soxr.resample(voiced(1.5), RATE, 24000))  # no trailing silence: the turn is open
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()}))
        while json.loads(await ws.recv())["type"] != "input_audio_buffer.speech_started":
            pass
        while srv.metrics.registry.get_sample_value("breeze_audio_seconds_total") < 1.4:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(srv.close())
        events = await receive_all(ws)
        await closing
    assert ws.close_code == 1001
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.committed" in kinds and kinds.index("input_audio_buffer.committed") < kinds.index(
        COMPLETED
    )
    assert [e["transcript"] for e in events if e["type"] == COMPLETED] == [TINY_TEXT]


def test_turn_detection_maps_to_the_segmenter():
    base = SegmenterConfig()
    vad = segmenter_config(
        {"type": "server_vad", "threshold": 0.9, "prefix_padding_ms": 100, "silence_duration_ms": 150}, base
    )
    assert (vad.aggressiveness, vad.pre_roll_ms, vad.hangover_ms, vad.end_padding_ms) == (3, 100, 150, 150)
    assert segmenter_config({"type": "semantic_vad", "eagerness": "low"}, base).hangover_ms == 1200
    assert segmenter_config(None, base) == base


# --- the embedded default model on a dev clip ----------------------------------------------------

needs_dev = pytest.mark.skipif(
    not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (the ../shared checkout)"
)


@pytest.mark.dev
@needs_dev
async def test_dev_clip_matches_the_native_endpoint(default_engine):
    """The SDK's .completed text of a dev clip (pcm16 24 kHz, server VAD) against the reference, and
    against the native endpoint's finals for the same clip at 16 kHz."""
    clip = "hhchen-f05-read-0056.wav"
    entry = dev_manifest()[clip]
    audio = np.concatenate([silence(0.5), load_audio(DEV_DIR / clip), silence(1.0)])
    async with Server(ServerConfig(port=0), engine=default_engine) as srv:
        async with sdk(srv).realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(session=ga_session({"type": "audio/pcm", "rate": 24000}))
            await append_all(conn, pcm16(soxr.resample(audio, RATE, 24000)), 4800, pace=0.025)
            await conn.input_audio_buffer.commit()  # manual commit under server VAD closes the last turn
            events = await events_until(
                conn,
                lambda ev: (
                    ev[-1].type == COMPLETED
                    and not any(
                        e.type == "input_audio_buffer.committed"
                        and e.item_id not in {c.item_id for c in ev if c.type == COMPLETED}
                        for e in ev
                    )
                ),
                timeout=60,
            )
        async with connect(f"ws://127.0.0.1:{srv.port}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start"}))
            data = pcm16(audio)
            for i in range(0, len(data), 3200):
                await ws.send(data[i : i + 3200])
            await ws.send(json.dumps({"type": "stop"}))
            native = [json.loads(m) async for m in ws]
    realtime_text = "".join(e.transcript for e in events if e.type == COMPLETED)
    native_text = "".join(e["text"] for e in native if e["type"] == "final")
    realtime_cer = score(entry["text"], realtime_text, entry["lang"]).rate
    native_cer = score(entry["text"], native_text, entry["lang"]).rate
    assert realtime_text, events
    assert realtime_cer <= native_cer + 0.02 and realtime_cer < 0.3, (realtime_text, native_text, entry["text"])
