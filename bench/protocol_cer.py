"""Dev-set CER of each protocol adapter against the native endpoint (the issue's figures).

    .venv/bin/python -m bench.protocol_cer [--speed 8] [--concurrency 4] [--phone-variants]

Every dev clip (0.5 s of silence before, 1 s after) goes, on one default-model engine, through:
native /v1/stream (16 kHz pcm16), /v1/realtime with the openai SDK (GA, pcm16 24 kHz, server VAD;
the `.completed` transcripts), and /v1/twilio as an 8 kHz mu-law call in 20 ms media messages
(the finals on /v1/calls/{callSid}), and with --whisperlive the WhisperLive listener (float32).
Scores follow eval/README.md (corpus CER over the zh and mix clips, WER over en).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from dataclasses import replace

import numpy as np
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from bench.clips import DEV_DIR, RATE, dev_manifest, pcm16, silence
from engines.engine import Engine
from engines.whisper.audio import load_audio
from streaming.audio.codecs import encode_mulaw
from streaming.protocols.calls import CallConfig
from streaming.protocols.whisperlive import WhisperLiveConfig
from streaming.scoring import corpus_score, score
from streaming.server.app import Server, ServerConfig


async def native(port: int, audio: np.ndarray, speed: float) -> str:
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "partials": True}))
        data = pcm16(audio)
        for i in range(0, len(data), 3200):
            await ws.send(data[i : i + 3200])
            await asyncio.sleep(0.1 / speed)
        await ws.send(json.dumps({"type": "stop"}))
        events = [json.loads(m) async for m in ws]
    return "".join(e["text"] for e in events if e["type"] == "final")


async def realtime(port: int, audio: np.ndarray, speed: float) -> str:
    client = AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1")
    texts, committed = {}, []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "whisper-1", "language": "zh"},
                        "turn_detection": {"type": "server_vad"},
                    }
                },
            }
        )
        data = pcm16(soxr.resample(audio, RATE, 24000))
        for i in range(0, len(data), 4800):
            await conn.input_audio_buffer.append(audio=base64.b64encode(data[i : i + 4800]).decode())
            await asyncio.sleep(0.1 / speed)
        await conn.input_audio_buffer.commit()
        async for event in conn:
            if event.type == "input_audio_buffer.committed":
                committed.append(event.item_id)
            elif event.type == "conversation.item.input_audio_transcription.completed":
                texts[event.item_id] = event.transcript
                if len(texts) == len(committed):
                    break
            elif event.type == "error" and event.error.code != "input_audio_buffer_commit_empty":
                raise RuntimeError(event.error.message)
    return "".join(texts[i] for i in committed)


async def twilio(port: int, audio: np.ndarray, speed: float, call: str) -> str:
    data = encode_mulaw(soxr.resample(audio, RATE, 8000))
    async with connect(f"ws://127.0.0.1:{port}/v1/calls/{call}") as sub:
        await sub.recv()
        async with connect(f"ws://127.0.0.1:{port}/v1/twilio") as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(
                json.dumps(
                    {
                        "event": "start",
                        "start": {
                            "callSid": call,
                            "streamSid": "MZ" + call,
                            "tracks": ["inbound"],
                            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                        },
                    }
                )
            )
            for n, i in enumerate(range(0, len(data), 160)):
                await ws.send(
                    json.dumps(
                        {
                            "event": "media",
                            "media": {"track": "inbound", "payload": base64.b64encode(data[i : i + 160]).decode()},
                        }
                    )
                )
                if n % 5 == 4:
                    await asyncio.sleep(0.1 / speed)
            await ws.send(json.dumps({"event": "stop", "stop": {"callSid": call}}))
            events = [json.loads(m) async for m in sub]
    return "".join(e["text"] for e in events if e["type"] == "final")


async def whisperlive(port: int, audio: np.ndarray, speed: float) -> str:
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(json.dumps({"uid": "m", "language": "zh", "task": "transcribe"}))
        data = audio.astype("<f4").tobytes()
        for i in range(0, len(data), 16384):
            await ws.send(data[i : i + 16384])
            await asyncio.sleep(0.256 / speed)
        await ws.send(b"END_OF_AUDIO")
        done = {}
        async for message in ws:
            for seg in json.loads(message).get("segments", []):
                if seg.get("completed"):
                    done[seg["start"]] = seg["text"]
    return "".join(done[k] for k in sorted(done, key=float))


def corpus(entries: list[dict], texts: list[str]) -> dict[str, float]:
    groups: dict[str, list] = {}
    for entry, text in zip(entries, texts):
        group = "en" if entry["lang"] == "en" else "zh"
        groups.setdefault(group, []).append(score(entry["text"], text, entry["lang"]))
    return {group: round(100 * corpus_score(scores).rate, 2) for group, scores in groups.items()}


async def run_all(name, entries, audios, fn, concurrency) -> list[str]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i):
        async with semaphore:
            return await fn(audios[i], i)

    started = time.monotonic()
    texts = await asyncio.gather(*(one(i) for i in range(len(entries))))
    print(f"{name:28s} {corpus(entries, texts)}  ({time.monotonic() - started:.0f} s)", flush=True)
    return texts


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speed", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--phone-variants", action="store_true", help="also score other phone segmenter settings")
    parser.add_argument("--whisperlive", action="store_true")
    parser.add_argument("--only-phone-variants", action="store_true")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    manifest = dev_manifest()
    entries = list(manifest.values())[: args.limit]
    audios = [np.concatenate([silence(0.5), load_audio(DEV_DIR / e["audio"]), silence(1.0)]) for e in entries]
    engine = Engine.load("default", device="cpu")
    speed, c = args.speed, args.concurrency
    try:
        async with Server(
            ServerConfig(port=0, whisperlive=WhisperLiveConfig(port=0, max_clients=64)), engine=engine
        ) as srv:
            if args.only_phone_variants:
                base = phone = []
            else:
                base = await run_all("native 16 kHz", entries, audios, lambda a, i: native(srv.port, a, speed), c)
            if not args.only_phone_variants:
                await run_all(
                    "realtime SDK pcm16 24 kHz", entries, audios, lambda a, i: realtime(srv.port, a, speed), c
                )
                phone = await run_all(
                    "twilio mu-law 8 kHz", entries, audios, lambda a, i: twilio(srv.port, a, speed, f"CA{i}"), c
                )
            if args.whisperlive:
                await run_all(
                    "whisperlive float32", entries, audios, lambda a, i: whisperlive(srv.whisperlive.port, a, speed), c
                )
        if args.phone_variants:
            native_segmenter = ServerConfig().session.transcriber.segmenter
            variants = {
                "native segmenter": native_segmenter,
                "aggressiveness 1": replace(native_segmenter, aggressiveness=1),
                "pre-roll 450, padding 300": replace(native_segmenter, pre_roll_ms=450, end_padding_ms=300),
                "+ aggressiveness 1": replace(native_segmenter, pre_roll_ms=450, end_padding_ms=300, aggressiveness=1),
                "+ hangover 600": replace(native_segmenter, pre_roll_ms=450, end_padding_ms=300, hangover_ms=600),
            }
            for name, segmenter in variants.items():
                config = ServerConfig(port=0, calls=CallConfig(segmenter=segmenter))
                async with Server(config, engine=engine) as srv:
                    await run_all(
                        f"twilio: {name}", entries, audios, lambda a, i: twilio(srv.port, a, speed, f"CA{i}"), c
                    )
        for entry, b, p in zip(entries, base, phone):
            if b != p:
                print(f"  {entry['audio']}: native {b!r} / phone {p!r}")
    finally:
        engine.close()


if __name__ == "__main__":
    asyncio.run(main())
