"""Shared fixtures: a tiny Whisper engine for fast protocol tests, and the dev set location."""

from __future__ import annotations

import json
import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    # no GPU: Triton kernels (engines/gpu/decode_kernels.py) run in Triton's interpreter, set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from engines.engine import Engine
from engines.weights.checkpoints import Checkpoint, default_suppress_ids, default_vocabulary
from engines.whisper.model import ModelDims, Whisper
from engines.whisper.tokenizer import Tokenizer

DEV_DIR = Path(os.environ.get("BREEZE_EVAL_DEV", Path(__file__).resolve().parents[2] / "shared" / "eval" / "dev"))
"""The dev clips of ../shared/eval (outside the repository); tests that need them skip without."""
TINY_DIMS = ModelDims(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=64,
    n_text_head=2,
    n_text_layer=1,
)
TINY_TEXT = "好"
"""What the tiny model says for any audio."""


def tiny_model() -> Whisper:
    """Random weights of a tiny Whisper for the real vocabulary, rigged to answer TINY_TEXT.

    A purely random decoder writes up to the 224-token cap or loops, which makes tests slow and
    their finals depend on the hallucination filter. Here the decoder's final layer norm outputs
    a constant vector v, and only two output embeddings point along v: <|endoftext|> strongly,
    TINY_TEXT's token less. So every decode is TINY_TEXT then <|endoftext|> (<|endoftext|> is
    suppressed first), in two decoder forwards, with a low no-speech probability.
    """
    torch.manual_seed(0)
    model = Whisper(TINY_DIMS)
    vocabulary = default_vocabulary()
    eot = vocabulary.index("<|endoftext|>")
    token = vocabulary.index(
        TINY_TEXT.encode().decode("latin-1")
    )  # its UTF-8 bytes are all printable in GPT-2's byte map
    assert Tokenizer(vocabulary).decode([token]) == TINY_TEXT
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        v = torch.nn.functional.normalize(torch.randn(TINY_DIMS.n_text_state), dim=0)
        model.decoder.ln.weight.zero_()
        model.decoder.ln.bias.copy_(v)
        model.decoder.token_embedding.weight[eot] = 30 * v
        model.decoder.token_embedding.weight[token] = 20 * v
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Checkpoint:
    """tiny_model() as a checkpoint with the embedded model's vocabulary and suppress list."""
    state = {name: tensor.clone() for name, tensor in tiny_model().state_dict().items()}
    return Checkpoint(
        name="tiny-random",
        dims=TINY_DIMS,
        state_dict=state,
        vocabulary=default_vocabulary(),
        suppress_tokens=default_suppress_ids(),
        alignment_heads=None,
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Checkpoint):
    engine = Engine(tiny_checkpoint, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def default_engine():
    """The embedded whisper-base on the CPU (converted once into the user cache)."""
    engine = Engine.load("default", device="cpu")
    yield engine
    engine.close()


async def receive_all(ws: ClientConnection) -> list[dict]:
    """Every JSON event the server sends until it closes the connection."""
    events = []
    try:
        async for message in ws:
            events.append(json.loads(message))
    except ConnectionClosed:
        pass
    return events
