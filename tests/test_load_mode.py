"""`--model random:SHAPE`: the load-test model mode (engines/synthetic.py) through the real server.

Random weights of a real shape, labelled random everywhere a client or operator looks, and a
realistic amount of decoder work: every segment decodes ceil(tokens_per_second x its seconds)
tokens, then ends, and its final passes the hallucination filter like real Chinese text.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import receive_all
from test_server import http_get
from websockets.asyncio.client import connect

from bench.clips import pcm16, two_phrases
from engines.config import RANDOM_PREFIX, EngineConfig
from engines.synthetic import SHAPES, TOKENS_PER_SECOND, random_engine, synthetic_vocabulary
from engines.whisper.tokenizer import Tokenizer
from streaming.server.app import Server, ServerConfig


def test_synthetic_tokens_decode_to_unique_cjk_pairs():
    vocabulary = synthetic_vocabulary()
    tokenizer = Tokenizer(vocabulary)
    ordinary = vocabulary[: tokenizer.eot]
    assert len(set(ordinary)) == len(ordinary)
    for token in (0, 1, 19999, 20000, tokenizer.eot - 1):
        text = tokenizer.decode([token])
        assert len(text) == 2 and all("\u4e00" <= c <= "\u9fff" for c in text), (token, text)


def test_forced_length_follows_the_audio():
    """Each request decodes ceil(rate x seconds) tokens whatever the window, then stops."""
    engine = random_engine("tiny", "cpu", torch.float32, tokens_per_second=4.0, max_batch=4)
    try:
        for seconds in (0.5, 2.0, 3.3):
            audio = torch.randn(round(seconds * 16000)).numpy() * 0.1
            transcript = engine.transcribe(audio, window=1.0)
            assert len(transcript.tokens) == math.ceil(4.0 * seconds), seconds
            assert transcript.has_speech and not transcript.looped
    finally:
        engine.close()


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="large-v2"):
        random_engine("huge", "cpu")


async def test_server_serves_a_random_model_and_says_so():
    """`serve --model random:tiny`: loads, labels itself random in ready and /healthz, and every
    segment's final carries the forced number of tokens."""
    config = ServerConfig(port=0, engine=EngineConfig(model=f"{RANDOM_PREFIX}tiny", device="cpu"))
    async with Server(config) as server:
        await server.wait_ready()
        status, _, body = await http_get(server.port, "/healthz")
        assert (
            status == 200
            and json.loads(body)["model"].startswith("random:tiny")
            and "random" in json.loads(body)["model"][7:]
        )
        async with connect(f"ws://127.0.0.1:{server.port}/v1/stream") as ws:
            await ws.send(json.dumps({"type": "start"}))
            audio = pcm16(two_phrases())
            for i in range(0, len(audio), 3200):
                await ws.send(audio[i : i + 3200])
            await ws.send(json.dumps({"type": "stop"}))
            events = await receive_all(ws)
    assert events[0]["type"] == "ready" and "random weights" in events[0]["model"]
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 2
    for final in finals:
        seconds = final["end"] - final["start"]
        assert abs(final["stats"]["tokens"] - TOKENS_PER_SECOND * seconds) <= 1.5, final
        assert len(final["text"]) == 2 * final["stats"]["tokens"]


def test_breeze_is_large_v2():
    assert SHAPES["breeze"] == SHAPES["large-v2"] and SHAPES["large-v2"].n_text_layer == 32
