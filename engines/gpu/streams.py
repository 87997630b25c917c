"""CUDA streams of the engine's threads."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def own_stream(device: torch.device, high_priority: bool = False) -> Any:
    """On CUDA, a stream of the calling thread's own (the worker's, the encoder thread's): work on
    the legacy default stream would break a graph the other thread is recording, since that
    stream synchronises with every other blocking stream. The worker's stream may take the higher
    priority, so that where its decoder steps and the encoder's kernels are both ready the GPU
    schedules the steps' blocks first (no gain measured yet: BENCHMARKS.md, fourth session)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device, priority=-1 if high_priority else 0))  # lower is higher


def sync(device: torch.device) -> None:
    """Waits for the calling thread's CUDA stream (each engine thread has its own)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
