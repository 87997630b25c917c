"""Admission: which queued segments start now, and which of them no longer need answering.

Partials are optional work and finals never wait for them: between two decoder steps finals
start first; partials take at most `max_partials` rows of the batch and at most
`partials_per_round` start per round, so that their encoder calls and rows never stall the finals.
A partial that a newer request of its stream (a partial, or the segment's final) superseded is
answered None, queued or running. Shortened encoder windows are rounded up to buckets so that
segments of similar length share one encoder call. The torch engine (engines/engine.py) and
TensorRT-LLM's executor backend (engines/trtllm/executor.py) both schedule by these rules.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from engines.whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES
from engines.whisper.decoding import DecodingOptions


class Queued(Protocol):
    """What admission reads of a queued segment."""

    final: bool  # finals go before partials and are never dropped
    stream: object | None  # partials of one stream supersede each other
    seq: int  # submission order


@dataclass(eq=False)  # requests are compared by identity (they hold arrays)
class Request:
    """One segment submitted to the torch engine, with what it has cost so far."""

    audio: np.ndarray  # float32 mono 16 kHz
    options: DecodingOptions
    window: float | None  # seconds of silence margin after the clip; None = the full 30 s window
    previous: list[int] | None  # the segment's previous hypothesis: a draft
    speculative: str  # off | hypothesis | medusa | both
    final: bool
    stream: object | None
    future: Future[Any]
    seq: int = 0
    encoder_seconds: float = 0.0
    decoder_seconds: float = 0.0
    forwards: int = 0  # spent on an earlier attempt (a short window that looped)
    alone: bool = False  # its batch failed: it is retried by itself, so that only a bad request fails
    words: bool = False  # a final that wants word timings
    features: torch.Tensor | None = None  # its encoder output, kept for the word timings until it is answered


def window_frames(samples: int, window: float | None, bucket: float) -> int:
    """Mel frames of a segment's encoder input: the full 30 s window, or (with a `window` margin)
    the clip plus the margin, rounded up to a multiple of `bucket` seconds so that segments batch."""
    if window is None:
        return N_FRAMES
    frames = samples // HOP_LENGTH + int(window * FRAMES_PER_SECOND)
    step = 2 * max(1, round(bucket * FRAMES_PER_SECOND / 2))
    return min(N_FRAMES, math.ceil(frames / step) * step)


@dataclass
class Admission:
    """How many of the batch's rows partials may take, and how fast finals join it."""

    max_partials: int  # rows partials may hold at most
    partials_per_round: int  # partials that may start between two decoder steps
    finals_per_round: int  # finals that may start between two decoder steps (they share the batch)
    partials_beside_finals: bool  # partials start while a final is queued or running

    @classmethod
    def for_device(
        cls, cuda: bool, rows: int, max_partials: int | None = None, partials_per_round: int | None = None
    ) -> Admission:
        """The defaults of a device. On a GPU, a sixteenth of the rows (at least 4) and 2 a round:
        8 of 128 rows cut the p95 by 2/3 at 200 streams in the engine-only capacity runs, and 4 of
        16 served 300-400 streams through the sockets (BENCHMARKS.md). On the CPU an encoder call
        for 3 windows costs what 3 calls cost, but a decoder step reads the same weights for 1 row
        or 4: finals start one a round (each encoded, then decoding beside those already running,
        so the last of several that end together does not wait for the others' decoding), no
        partial starts beside a final, and partials hold at most 4 rows (each row's cross-attention
        keys cost ~25 KB a frame: ten streams' partials at once held 240 MiB of them; BENCHMARKS.md,
        issue 25)."""
        return cls(
            max_partials=max_partials if max_partials is not None else (max(4, rows // 16) if cuda else min(4, rows)),
            partials_per_round=partials_per_round or (2 if cuda else rows),
            finals_per_round=rows if cuda else 1,
            partials_beside_finals=cuda,
        )

    def take(self, queue: list[Request], started: list[Request], rows: int) -> list[Request]:
        """The requests of `queue` (in order: finals first) that start now, beside `started`, the
        requests holding or reserving rows of a batch of `rows`."""
        alone = [r for r in queue if r.alone]
        if alone:  # retried after a failed batch: one at a time, in an empty batch
            return [] if started else alone[:1]
        finals = [r for r in queue if r.final]
        free = rows - len(started)
        final_active = any(r.final for r in started)
        taken = finals[: min(free, self.finals_per_round)]
        running = sum(not r.final for r in started)
        room = min(free - len(taken), self.max_partials - running, self.partials_per_round)
        if not self.partials_beside_finals and (finals or final_active):
            room = 0
        return taken + [r for r in queue if not r.final][: max(0, room)]


def newest(requests: list[Any]) -> dict[object, int]:
    """Each stream's newest request (its sequence number) among `requests`."""
    out: dict[object, int] = {}
    for r in requests:
        if r.stream is not None:
            out[r.stream] = max(out.get(r.stream, -1), r.seq)
    return out


def superseded(request: Queued, newest: dict[object, int]) -> bool:
    """A partial whose stream has a newer request (a partial, or the segment's final) in `newest`."""
    return not request.final and request.stream is not None and request.seq < newest.get(request.stream, -1)


def fail(future: Future[Any], error: BaseException) -> None:
    """Sets an exception unless the future is settled (or its caller cancelled it) meanwhile."""
    try:
        if not future.done():
            future.set_exception(error)
    except InvalidStateError:
        pass


def resolve(future: Future[Any], value: object) -> None:
    """Sets a result unless the caller cancelled the future meanwhile (a client that left)."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def without_stale(item: tuple[Any, ...], newest: dict[object, int]) -> tuple[Any, ...]:
    """An encoded group (requests, frames, features, error) without its superseded partials,
    which are answered None."""
    group, frames, features, error = item
    keep = [i for i, r in enumerate(group) if not superseded(r, newest)]
    for i in set(range(len(group))) - set(keep):
        resolve(group[i].future, None)
    if len(keep) == len(group):
        return item
    return [group[i] for i in keep], frames, None if features is None else features[keep], error
