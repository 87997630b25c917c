"""Shared fixtures: the tiny Whisper engine (bench/tiny.py) for fast protocol tests, the embedded default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

if not Path("/dev/nvidiactl").exists():
    # no GPU: Triton kernels (engines/gpu/row_kernels.py) run in Triton's interpreter, set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.tiny import TINY_DIMS, tiny_model
from engines.engine import Engine
from engines.weights.checkpoints import Checkpoint, default_suppress_ids, default_vocabulary


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
