"""Offline transcription of whole files: one window for short clips, VAD segments for long ones.

A clip that fits Whisper's 30 s window is decoded as it is (like faster-whisper without VAD,
so results compare clip for clip). A longer file is cut by the same webrtcvad segmenter the
server uses (segments never reach 30 s) and all its segments go to the engine at once, so
they are batched. With `words`, each segment carries word timings in seconds of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.backend import Backend
from engines.transcript import Transcript
from engines.whisper.alignment import Word
from engines.whisper.audio import N_SAMPLES, SAMPLE_RATE
from engines.whisper.decoding import DecodingOptions

from .hypothesis_text import shift
from .segmenter import SegmentClosed, Segmenter


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str
    transcript: Transcript
    words: list[Word] | None = None


def speech_spans(audio: np.ndarray) -> list[tuple[int, int]]:
    """Sample spans of the speech segments webrtcvad finds (each shorter than 30 s)."""
    segmenter = Segmenter()
    events = segmenter.feed(audio) + segmenter.flush()
    return [(e.start, e.end) for e in events if isinstance(e, SegmentClosed)]


def transcribe_audio(
    engine: Backend, audio: np.ndarray, options: DecodingOptions, window: float | None = None, words: bool = False
) -> list[Segment]:
    """Segments with text; segments the model finds no speech in are left out. `window`: the
    encoder sees each segment plus this many seconds of silence (None: the full 30 s window).
    `words`: segments carry word timings."""
    spans = [(0, len(audio))] if len(audio) <= N_SAMPLES else speech_spans(audio)
    futures = [engine.submit(audio[a:b], options, window=window, words=words) for a, b in spans]
    segments = [
        Segment(a / SAMPLE_RATE, b / SAMPLE_RATE, f.result().text, f.result(), shift(f.result().words, a / SAMPLE_RATE))
        for (a, b), f in zip(spans, futures)
    ]
    return [s for s in segments if s.transcript.has_speech]
