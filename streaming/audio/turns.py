"""A segmenter a session can steer: OpenAI Realtime turns (streaming.protocols.realtime) clear the open
segment and swap the VAD settings mid-stream."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from .segmenter import (
    SegmentClosed,
    SegmentEnding,
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    SegmentGrew,
    SegmentResumed,
    SegmentStarted,
)


class TurnSegmenter:
    """A `Segmenter` the session can steer: `clear` drops the open segment, `reconfigure` swaps the
    VAD settings at the next point where no segment is open. Segment indices and positions stay
    those of the whole stream across swaps; `observe` sees every event before the transcriber."""

    def __init__(self, config: SegmenterConfig, observe: Callable[[SegmentEvent], None]) -> None:
        self._config = config
        self._inner = Segmenter(config)
        self._observe = observe
        self._pending: SegmenterConfig | None = None
        self._offset = 0  # stream sample where the inner segmenter began
        self._fed = 0  # samples fed so far
        self._next_index = 0
        self._indices: dict[int, int] = {}  # inner index -> stream index
        self.open: int | None = None  # stream index of the announced open segment

    def feed(self, audio: np.ndarray) -> list[SegmentEvent]:
        self._fed += audio.size
        return self._translate(self._inner.feed(audio))

    def flush(self) -> list[SegmentEvent]:
        return self._translate(self._inner.flush())

    def clear(self) -> int | None:
        """Forgets the open segment and the audio not yet in a segment; the index it dropped, if any."""
        dropped, self.open = self.open, None
        self._restart(self._pending or self._config)
        return dropped

    def reconfigure(self, config: SegmenterConfig) -> None:
        if config == (self._pending or self._config):
            return
        self._pending = config
        if self.open is None:
            self._restart(config)

    def _restart(self, config: SegmenterConfig) -> None:
        self._config, self._pending = config, None
        self._inner = Segmenter(config)
        self._offset = self._fed
        self._indices.clear()

    def _translate(self, events: list[SegmentEvent]) -> list[SegmentEvent]:
        out: list[SegmentEvent] = []
        for event in events:
            if isinstance(event, SegmentResumed):
                event = replace(event, index=self._indices[event.index])
            elif isinstance(event, (SegmentStarted, SegmentGrew, SegmentEnding, SegmentClosed)):
                if isinstance(event, SegmentStarted):
                    self._indices[event.index] = self._next_index
                    self._next_index += 1
                index = self._indices[event.index]
                if isinstance(event, SegmentStarted):
                    event = replace(event, index=index, start=event.start + self._offset)
                else:
                    event = replace(event, index=index, start=event.start + self._offset, end=event.end + self._offset)
                self.open = None if isinstance(event, SegmentClosed) else index
            else:
                event = replace(event, start=event.start + self._offset, end=event.end + self._offset)
            self._observe(event)
            out.append(event)
        if self.open is None and self._pending is not None:
            self._restart(self._pending)
        return out
