"""Prompts over every protocol (real server, real sockets) and the eval command: each one reaches the engine.

The engine is the real tiny engine; `RecordingEngine` only notes the decoding options of each
request before handing it on, which is what shows that a protocol passed its prompt through
(the tiny model answers the same whatever the prompt; tests/test_prompts.py checks what a prompt
does to decoding).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest
import soxr
from conftest import receive_all
from test_realtime import COMPLETED, append_all, beta_sdk, completed, events_until, ga_session, sdk
from test_server import serve_args
from test_twilio import CALL, STREAM, media_messages, mulaw8k, play, start_message, subscribe, transcript
from test_whisperlive import OPTIONS, check_segments, float32, session
from websockets.asyncio.client import connect

from bench.clips import RATE, pcm16, silence, two_phrases, voiced
from bench.tiny import TINY_TEXT
from engines.engine import Engine
from engines.whisper.decoding import DecodingOptions
from streaming.audio.hypothesis_text import MAX_PROMPT_CHARS
from streaming.protocols.base import SessionConfig
from streaming.protocols.whisperlive import WhisperLiveConfig
from streaming.server.app import Server, ServerConfig
from streaming.server.serve import config_from_args

PROMPT = "聯發科 Breeze 台積電"


class RecordingEngine(Engine):
    """The tiny engine, noting (final, options) of every request it is given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[bool, DecodingOptions]] = []

    def submit(self, audio, options=DecodingOptions(), **kwargs):
        self.requests.append((kwargs.get("final", True), options))
        return super().submit(audio, options, **kwargs)

    def finals(self) -> list[DecodingOptions]:
        return [options for final, options in self.requests if final]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = RecordingEngine(tiny_checkpoint, device="cpu")
    yield engine
    engine.close()


@pytest.fixture
async def server(engine):
    engine.requests.clear()
    config = ServerConfig(port=0, whisperlive=WhisperLiveConfig(port=0), session=SessionConfig(prompt="server default"))
    async with Server(config, engine=engine) as srv:
        yield srv


async def native(server: Server, messages: list) -> tuple[list[dict], int]:
    """Sends the messages (dicts as JSON text frames, bytes as audio in 100 ms frames), then stop."""
    async with connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws:
        reader = asyncio.ensure_future(receive_all(ws))
        for message in messages + [{"type": "stop"}]:
            if isinstance(message, dict):
                await ws.send(json.dumps(message))
                continue
            for i in range(0, len(message), 3200):
                await ws.send(message[i : i + 3200])
                await asyncio.sleep(0.005)
        events = await asyncio.wait_for(reader, 30)
    return events, ws.close_code


# --- native --------------------------------------------------------------------------------------


async def test_native_start_prompt_reaches_every_decode(server: Server, engine: RecordingEngine):
    events, code = await native(server, [{"type": "start", "prompt": PROMPT}, pcm16(two_phrases())])
    assert code == 1000 and [e["text"] for e in events if e["type"] == "final"] == [TINY_TEXT, TINY_TEXT]
    assert len(engine.finals()) == 2 and any(not final for final, _ in engine.requests)
    assert {options.prompt for _, options in engine.requests} == {PROMPT}
    assert {options.previous_text for _, options in engine.requests} == {""}  # condition_on_previous is off
    # the first final's text still reaches the second segment's decodes, for prompt-lookup drafts only
    assert [final.draft_text for final in engine.finals()] == ["", TINY_TEXT]


async def test_native_default_prompt_and_condition_on_previous(server: Server, engine: RecordingEngine):
    """No prompt in start: the server's --prompt; condition_on_previous: the second segment's
    decodes carry the first final's text."""
    events, code = await native(server, [{"type": "start", "condition_on_previous": True}, pcm16(two_phrases())])
    assert code == 1000
    first, second = engine.finals()
    assert (first.prompt, first.previous_text) == ("server default", "")
    assert (second.prompt, second.previous_text) == ("server default", TINY_TEXT)
    assert second.draft_text == ""  # the model reads it in the prompt: lookup finds it there


async def test_native_update_applies_from_the_next_segment(server: Server, engine: RecordingEngine):
    """An update while segment 0 is open: its partials and final keep the start prompt, segment 1
    gets the new one; the server says from which segment on."""
    phrase1 = pcm16(np.concatenate([silence(0.3), voiced(1.5)]))
    rest = pcm16(np.concatenate([silence(1.0), voiced(1.5), silence(1.0)]))
    events, code = await native(
        server, [{"type": "start", "prompt": PROMPT}, phrase1, {"type": "update", "prompt": "新的提示"}, rest]
    )
    assert code == 1000
    assert {"type": "updated", "prompt": "新的提示", "segment": 1} in events
    assert [options.prompt for options in engine.finals()] == [PROMPT, "新的提示"]
    prompts = [options.prompt for _, options in engine.requests]
    assert prompts == sorted(prompts, key=lambda p: p == "新的提示")  # never back to the old one


@pytest.mark.parametrize(
    "update",
    [
        {"type": "update", "prompt": 42},
        {"type": "update", "prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        {"type": "update"},
        {"type": "update", "prompt": "ok", "language": "en"},
    ],
)
async def test_a_bad_update_is_refused_and_the_session_goes_on(server: Server, engine: RecordingEngine, update: dict):
    events, code = await native(
        server,
        [
            {"type": "start", "prompt": PROMPT},
            pcm16(voiced(0.5)),
            update,
            pcm16(np.concatenate([voiced(1.0), silence(1.0)])),
        ],
    )
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "bad_request" and "prompt" in errors[0]["message"]
    assert code == 1000 and events[-1] == {"type": "end"} and [e["type"] for e in events].count("final") == 1
    assert {options.prompt for _, options in engine.requests} == {PROMPT}


@pytest.mark.parametrize(
    "start",
    [
        {"type": "start", "prompt": ["a"]},
        {"type": "start", "prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        {"type": "start", "condition_on_previous": "yes"},
    ],
)
async def test_a_bad_start_prompt_ends_the_session(server: Server, start: dict):
    events, code = await native(server, [start])
    assert code == 1008 and len(events) == 1 and events[0]["type"] == "error" and events[0]["code"] == "bad_request"


# --- OpenAI Realtime (the openai SDK) ------------------------------------------------------------


async def test_realtime_ga_prompt_is_applied(server: Server, engine: RecordingEngine):
    audio = soxr.resample(two_phrases(), RATE, 24000)
    session = ga_session({"type": "audio/pcm", "rate": 24000})
    session["audio"]["input"]["transcription"]["prompt"] = PROMPT
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session=session)
        await append_all(conn, pcm16(audio), 4800)
        events = await events_until(conn, completed(2))
    assert events[1].session.audio.input.transcription.prompt == PROMPT
    assert [e.transcript for e in events if e.type == COMPLETED] == [TINY_TEXT, TINY_TEXT]
    assert engine.requests and {options.prompt for _, options in engine.requests} == {PROMPT}


async def test_realtime_beta_prompt_and_its_update(server: Server, engine: RecordingEngine):
    """Beta input_audio_transcription.prompt; a later transcription_session.update changes it for
    the next turns; no prompt at all gives the server's default."""
    audio = soxr.resample(two_phrases(), RATE, 24000)
    async with beta_sdk(server).beta.realtime.connect(model="gpt-4o-transcribe") as conn:
        await conn.transcription_session.update(session={"input_audio_format": "pcm16"})
        await append_all(conn, pcm16(audio), 4800)
        await events_until(conn, completed(2))
        await conn.transcription_session.update(session={"input_audio_transcription": {"prompt": PROMPT}})
        await append_all(conn, pcm16(audio), 4800)
        await events_until(conn, completed(2))
    assert [options.prompt for options in engine.finals()] == ["server default"] * 2 + [PROMPT] * 2


async def test_realtime_refuses_a_prompt_too_long(server: Server):
    async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription") as ws:
        await ws.recv()  # session.created
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}}},
                    },
                }
            )
        )
        error = json.loads(await ws.recv())
    assert error["type"] == "error" and error["error"]["code"] == "invalid_value"
    assert error["error"]["param"] == "session.audio.input.transcription.prompt"


# --- WhisperLive ---------------------------------------------------------------------------------


async def test_whisperlive_initial_prompt(server: Server, engine: RecordingEngine):
    messages, code = await session(server, float32(two_phrases()), {**OPTIONS, "initial_prompt": PROMPT})
    assert code == 1000 and [s["text"] for s in check_segments(messages)] == [TINY_TEXT, TINY_TEXT]
    assert engine.requests and {options.prompt for _, options in engine.requests} == {PROMPT}


async def test_whisperlive_refuses_a_bad_initial_prompt(server: Server):
    messages, code = await session(server, b"", {**OPTIONS, "initial_prompt": 7}, end=None)
    assert code == 1008 and messages[-1]["status"] == "ERROR" and "initial_prompt" in messages[-1]["message"]


# --- Twilio --------------------------------------------------------------------------------------


async def test_twilio_prompt_parameter_per_call(server: Server, engine: RecordingEngine):
    caller = mulaw8k(two_phrases())
    start = start_message(tracks=("inbound",), params={"prompt": PROMPT})
    media = media_messages({"inbound": caller})
    stop = {"event": "stop", "sequenceNumber": str(len(media) + 2), "streamSid": STREAM, "stop": {"callSid": CALL}}
    subscriber = await subscribe(server)
    await play(server, [{"event": "connected", "protocol": "Call", "version": "1.0.0"}, start, *media, stop])
    events = await transcript(subscriber)
    assert [e["text"] for e in events if e["type"] == "final"] == [TINY_TEXT, TINY_TEXT]
    assert engine.requests and {options.prompt for _, options in engine.requests} == {PROMPT}


async def test_twilio_bad_prompt_parameter_falls_back_to_the_server_default(server: Server, engine: RecordingEngine):
    start = start_message(tracks=("inbound",), params={"prompt": "x" * (MAX_PROMPT_CHARS + 1)})
    media = media_messages({"inbound": mulaw8k(two_phrases())})
    stop = {"event": "stop", "sequenceNumber": str(len(media) + 2), "streamSid": STREAM, "stop": {"callSid": CALL}}
    subscriber = await subscribe(server)
    await play(server, [start, *media, stop])
    await transcript(subscriber)
    assert engine.requests and {options.prompt for _, options in engine.requests} == {"server default"}


# --- serve options -------------------------------------------------------------------------------


def test_serve_prompt_options():
    config = config_from_args(serve_args("--prompt", PROMPT, "--condition-on-previous"))
    assert config.session.prompt == PROMPT and config.session.transcriber.condition_on_previous
    config = config_from_args(serve_args())
    assert config.session.prompt == "" and not config.session.transcriber.condition_on_previous
    with pytest.raises(ValueError, match="--prompt"):
        config_from_args(serve_args("--prompt", "x" * (MAX_PROMPT_CHARS + 1)))


# --- transcribe / eval ----------------------------------------------------------------------------


def test_eval_manifest_prompt_replaces_the_command_prompt(engine: RecordingEngine, tmp_path):
    """`eval --prompt` for every clip, a manifest line's "prompt" for its own clip; the report says which."""
    import soundfile

    from bench.evaluate import run_eval
    from streaming.cli import decoding_options
    from streaming.manifest import read_clips
    from streaming.options import add_decoding_arguments

    engine.requests.clear()
    soundfile.write(tmp_path / "a.wav", np.concatenate([voiced(1.0), silence(0.5)]), RATE)
    lines = [{"audio": "a.wav", "text": TINY_TEXT}, {"audio": "a.wav", "text": TINY_TEXT, "prompt": "燕之屋"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    options = decoding_options(parser.parse_args(["--prompt", PROMPT]))
    report = run_eval(engine, read_clips(tmp_path / "manifest.jsonl"), options)
    assert [options.prompt for options in engine.finals()] == [PROMPT, "燕之屋"]
    assert [clip["prompt"] for clip in report["clips"]] == [PROMPT, "燕之屋"] and report["cer"] == 0.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "x", "prompt": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: 'prompt' must be a string"):
        read_clips(tmp_path / "bad.jsonl")
