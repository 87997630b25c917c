"""Voice activity segmentation: cuts a 16 kHz stream into speech segments with webrtcvad.

A segment *opens* when a short run of voiced frames appears (its audio starts a pre-roll
earlier, so soft onsets are kept), *grows* while speech goes on, and *closes* once the silence
hangover elapses; its audio ends at the last voiced frame plus an end padding, not at the moment
the hangover ran out. A segment about to reach `max_segment_ms` is cut at its quietest point
and the rest goes on as a new segment, so no segment ever needs more than Whisper's 30 s window.

A segment is only announced (`SegmentStarted`, with its index) once it holds `min_speech_ms` of
voiced frames. One that closes before that, a click or a cough the VAD took for a voice, is
reported as `SegmentDiscarded` rather than transcribed: it never goes to the model, but the
caller sees it (for logs and metrics). The default threshold is below the voiced length of a
one-syllable word such as "對" or "yes", so short answers still reach the model; the model's
own no-speech probability is the filter for anything subtler. Pieces after a max-length cut are
continuations of speech and are announced at their first voiced frame.

Positions are samples of the stream's own 16 kHz audio, counted from the first sample fed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import webrtcvad

SAMPLE_RATE = 16000

CloseReason = Literal["silence", "max_length", "flush"]


@dataclass(frozen=True)
class SegmenterConfig:
    """Segmentation settings; all durations in milliseconds.

    The defaults aim at low final latency without splitting sentences at ordinary pauses.
    """

    aggressiveness: int = 2
    """webrtcvad mode 0-3; 2 drops quiet background noise that 0-1 let through and keeps soft
    speech. No mode rejects loud stationary noise (white noise at -30 dBFS and above reads as
    voiced in all four): such audio is bounded by `max_segment_ms` and left to the model's
    no-speech probability, since a stricter gate would also drop speech in noise."""
    frame_ms: int = 30
    """VAD frame (webrtcvad takes 10, 20 or 30 ms); 30 ms gives the VAD the most context."""
    start_voiced_frames: int = 3
    """Voiced frames needed among the last `start_window_frames` to open a segment."""
    start_window_frames: int = 5
    """Window of the start trigger (5 x 30 ms = 150 ms): an isolated voiced frame opens nothing."""
    hangover_ms: int = 480
    """Silence after the last voiced frame that closes a segment. It adds directly to final
    latency, while much shorter values split sentences at breathing pauses and take context
    from the model. 480 ms is a whole number of 20 and 30 ms frames."""
    pre_roll_ms: int = 300
    """Audio kept before the first voiced frame: onsets (fricatives, plosives) the VAD misses."""
    end_padding_ms: int = 200
    """Audio kept after the last voiced frame: word-final decays the VAD misses."""
    min_speech_ms: int = 150
    """Voiced audio a segment needs before it is announced; less is discarded as a blip. A fast
    one-syllable word ("是", "yes" at 280 words/min) still has about 240 ms of voiced frames."""
    max_segment_ms: int = 28000
    """Longest segment; leaves 2 s of Whisper's 30 s window free."""
    cut_search_ms: int = 5000
    """How far back from the max length the cut looks for its quiet point."""
    cut_smooth_ms: int = 150
    """Energy is averaged over this span when looking for the quiet point, so the cut lands in a
    pause, not in the closure of a single plosive."""

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0-3, got {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30 (webrtcvad frame sizes), got {self.frame_ms}")
        if not 1 <= self.start_voiced_frames <= self.start_window_frames:
            raise ValueError("need 1 <= start_voiced_frames <= start_window_frames")
        if min(self.hangover_ms, self.pre_roll_ms, self.end_padding_ms, self.min_speech_ms) < 0:
            raise ValueError("durations must not be negative")
        if self.end_padding_ms > self.hangover_ms:
            raise ValueError("end_padding_ms must not exceed hangover_ms (padding comes out of the hangover)")
        if not 0 < self.cut_search_ms < self.max_segment_ms:
            raise ValueError("need 0 < cut_search_ms < max_segment_ms")
        if self.hangover_ms < self.frame_ms or self.cut_smooth_ms < self.frame_ms:
            raise ValueError("hangover_ms and cut_smooth_ms must be at least one frame")


@dataclass(frozen=True)
class SegmentStarted:
    """A segment holds speech and has its index; its audio begins at `start`."""

    index: int
    start: int


@dataclass(frozen=True)
class SegmentGrew:
    """The announced open segment now spans [start, end); sent at most once per `feed`.

    `audio` is a read-only view of that span, safe to keep: the segmenter never writes to it again.
    """

    index: int
    start: int
    end: int
    audio: np.ndarray


@dataclass(frozen=True)
class SegmentClosed:
    """The segment's final audio, [start, end); `end` is where its speech ends (plus padding)."""

    index: int
    start: int
    end: int
    audio: np.ndarray
    reason: CloseReason


@dataclass(frozen=True)
class SegmentEnding:
    """The open segment's speech may be over: `end_padding_ms` of silence followed its last voiced
    frame. `audio` ([start, end)) is what `SegmentClosed` will carry if the silence lasts the
    hangover, so a caller can start the final's work now instead of after it; `SegmentResumed`
    says the silence did not last."""

    index: int
    start: int
    end: int
    audio: np.ndarray


@dataclass(frozen=True)
class SegmentResumed:
    """Speech came back before the hangover ran out: the segment's last `SegmentEnding` is void."""

    index: int


@dataclass(frozen=True)
class SegmentDiscarded:
    """An opened segment closed with too little voiced audio to be speech; it gets no index."""

    start: int
    end: int
    voiced_ms: int


SegmentEvent = SegmentStarted | SegmentGrew | SegmentEnding | SegmentResumed | SegmentClosed | SegmentDiscarded


class _Tape:
    """Recent stream audio addressed by stream sample index.

    Filled samples are never overwritten (growth reallocates, trimming copies), so views handed
    out stay valid snapshots without copying.
    """

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE, np.float32)
        self.start = 0
        self._length = 0

    @property
    def end(self) -> int:
        return self.start + self._length

    def append(self, samples: np.ndarray) -> None:
        needed = self._length + samples.size
        if needed > self._data.size:
            grown = np.empty(max(needed, 2 * self._data.size), np.float32)
            grown[: self._length] = self._data[: self._length]
            self._data = grown
        self._data[self._length : needed] = samples
        self._length = needed

    def view(self, start: int, end: int) -> np.ndarray:
        out = self._data[start - self.start : end - self.start]
        out.flags.writeable = False
        return out

    def forget_before(self, position: int) -> None:
        """Let go of audio before `position`; copies only when that frees at least half the tape."""
        drop = position - self.start
        if drop <= 0 or drop < self._length // 2:
            return
        kept = self._data[drop : self._length].copy()
        self._data = np.empty(max(kept.size * 2, SAMPLE_RATE), np.float32)
        self._data[: kept.size] = kept
        self.start = position
        self._length = kept.size


@dataclass
class _Frame:
    start: int
    voiced: bool
    energy: float


class _Open:
    """The open segment: its frames (from the first voiced one, or from a cut) and running counts."""

    def __init__(self, start: int, needed_voiced: int, frame: int, index: int | None = None) -> None:
        self.start = start
        self.needed_voiced = needed_voiced
        self.index = index
        self.reported_end = start
        self.frames: list[_Frame] = []
        self.voiced = 0
        self.silent_run = 0
        self.last_voiced_end: int | None = None
        self.ending = False  # a SegmentEnding was sent for the current silence
        self._frame = frame

    def add(self, frame: _Frame) -> None:
        self.frames.append(frame)
        if frame.voiced:
            self.voiced += 1
            self.silent_run = 0
            self.last_voiced_end = frame.start + self._frame
        else:
            self.silent_run += 1


class Segmenter:
    """Feed 16 kHz float32 audio of any chunk size; get segment events back.

    Decisions are made per VAD frame, so the segments do not depend on how the audio was
    chunked (only `SegmentGrew`, one per `feed`, does).
    """

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        c = self.config
        self._vad = webrtcvad.Vad(c.aggressiveness)
        self._frame = c.frame_ms * SAMPLE_RATE // 1000
        ms = SAMPLE_RATE // 1000
        self._pre_roll = c.pre_roll_ms * ms
        self._end_padding = c.end_padding_ms * ms
        self._max_length = c.max_segment_ms * ms
        self._cut_search = c.cut_search_ms * ms
        self._hangover_frames = math.ceil(c.hangover_ms / c.frame_ms)
        self._ending_frames = max(1, math.ceil(c.end_padding_ms / c.frame_ms))  # silence that holds the padding
        self._min_voiced_frames = max(1, math.ceil(c.min_speech_ms / c.frame_ms))
        self._smooth_frames = max(1, round(c.cut_smooth_ms / c.frame_ms))
        self._tape = _Tape()
        self._unframed = np.zeros(0, np.float32)
        self._window: deque[_Frame] = deque(maxlen=c.start_window_frames)
        self._open: _Open | None = None
        self._floor = 0  # a new segment's pre-roll never reaches back into the previous segment
        self._next_index = 0

    @property
    def position(self) -> int:
        """Samples of the stream consumed so far (fed samples short of a whole frame wait)."""
        return self._tape.end

    def feed(self, audio: np.ndarray) -> list[SegmentEvent]:
        """Add audio (mono float32, [-1, 1], 16 kHz) and return the events it caused, in order."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        pending = np.concatenate((self._unframed, audio)) if self._unframed.size else audio
        count = pending.size // self._frame
        self._unframed = pending[count * self._frame :].copy()
        events: list[SegmentEvent] = []
        if count == 0:
            return events
        frames = pending[: count * self._frame].reshape(count, self._frame)
        pcm = (np.clip(frames, -1.0, 1.0) * 32767.0).astype("<i2")
        energies = np.mean(np.square(frames, dtype=np.float64), axis=1)
        for i in range(count):
            start = self._tape.end
            self._tape.append(frames[i])
            voiced = self._vad.is_speech(pcm[i].tobytes(), SAMPLE_RATE)
            self._step(_Frame(start, voiced, float(energies[i])), events)
        segment = self._open
        if segment is not None and segment.index is not None and segment.reported_end < self._tape.end:
            segment.reported_end = self._tape.end
            audio_so_far = self._tape.view(segment.start, self._tape.end)
            events.append(SegmentGrew(segment.index, segment.start, self._tape.end, audio_so_far))
        self._trim()
        return events

    def flush(self) -> list[SegmentEvent]:
        """End of stream: close (or discard) the open segment. The segmenter stays usable."""
        if self._unframed.size:
            self._tape.append(self._unframed)
            self._unframed = np.zeros(0, np.float32)
        events: list[SegmentEvent] = []
        if self._open is not None:
            self._close(self._open, self._speech_end(self._open, self._tape.end), "flush", events)
        self._window.clear()
        self._trim()
        return events

    # --- per-frame state machine --------------------------------------------------------------

    def _step(self, frame: _Frame, events: list[SegmentEvent]) -> None:
        segment = self._open
        if segment is None:
            self._window.append(frame)
            if sum(f.voiced for f in self._window) >= self.config.start_voiced_frames:
                self._begin(events)
            return
        segment.add(frame)
        self._confirm(segment, events)
        now = frame.start + self._frame
        self._announce_ending(segment, frame, now, events)
        if segment.silent_run >= self._hangover_frames:
            self._close(segment, self._speech_end(segment, now), "silence", events)
        elif now - segment.start >= self._max_length:
            self._cut(segment, events)

    def _begin(self, events: list[SegmentEvent]) -> None:
        frames = list(self._window)
        first = next(i for i, f in enumerate(frames) if f.voiced)
        start = max(frames[first].start - self._pre_roll, self._floor, self._tape.start)
        self._window.clear()
        self._open = self._opened(start, self._min_voiced_frames, frames[first:])
        self._confirm(self._open, events)

    def _opened(self, start: int, needed_voiced: int, frames: list[_Frame], index: int | None = None) -> _Open:
        segment = _Open(start, needed_voiced, self._frame, index)
        for frame in frames:
            segment.add(frame)
        return segment

    def _confirm(self, segment: _Open, events: list[SegmentEvent]) -> None:
        if segment.index is None and segment.voiced >= segment.needed_voiced:
            segment.index = self._next_index
            self._next_index += 1
            events.append(SegmentStarted(segment.index, segment.start))

    def _announce_ending(self, segment: _Open, frame: _Frame, now: int, events: list[SegmentEvent]) -> None:
        """SegmentEnding once the silence after the last voiced frame holds the end padding (the
        segment's audio is then what closing it would give), SegmentResumed if speech comes back."""
        if segment.index is None:
            return
        if frame.voiced and segment.ending:
            segment.ending = False
            events.append(SegmentResumed(segment.index))
        elif segment.silent_run == self._ending_frames < self._hangover_frames and segment.last_voiced_end is not None:
            segment.ending = True
            end = self._speech_end(segment, now)
            events.append(SegmentEnding(segment.index, segment.start, end, self._tape.view(segment.start, end)))

    def _speech_end(self, segment: _Open, limit: int) -> int:
        """Last voiced frame plus padding, within `limit`; the segment start when nothing was voiced."""
        last = segment.last_voiced_end
        return segment.start if last is None else min(last + self._end_padding, limit)

    def _close(self, segment: _Open, end: int, reason: CloseReason, events: list[SegmentEvent]) -> None:
        if segment.index is not None:
            audio = self._tape.view(segment.start, end)
            events.append(SegmentClosed(segment.index, segment.start, end, audio, reason))
            self._floor = end  # so the next pre-roll never re-sends transcribed audio
        else:
            events.append(SegmentDiscarded(segment.start, end, segment.voiced * self.config.frame_ms))
        self._open = None

    def _cut(self, segment: _Open, events: list[SegmentEvent]) -> None:
        """Split at the quietest point of the last `cut_search_ms`; the rest opens a continuation."""
        frames = segment.frames
        energy = np.array([f.energy for f in frames], np.float64)
        kernel = np.ones(self._smooth_frames)
        # Mean over the frames actually present, so the edges don't look quiet for lack of neighbours.
        counts = np.convolve(np.ones_like(energy), kernel, mode="same")
        smoothed = np.convolve(energy, kernel, mode="same") / counts
        earliest = self._tape.end - self._cut_search
        candidates = [i for i, f in enumerate(frames) if f.start >= earliest and f.start > segment.start]
        cut_at = min(candidates, key=lambda i: smoothed[i])
        cut = frames[cut_at].start
        head = self._opened(segment.start, segment.needed_voiced, frames[:cut_at], segment.index)
        self._close(head, self._speech_end(head, cut), "max_length", events)
        self._floor = cut
        # The rest of announced speech needs one voiced frame to be announced in turn.
        needed = 1 if segment.index is not None else segment.needed_voiced
        self._open = self._opened(cut, needed, frames[cut_at:])
        self._confirm(self._open, events)

    def _trim(self) -> None:
        """Keep only what a future segment (or the open one) can still need."""
        keep_from = self._tape.end - self._pre_roll - self._frame * self.config.start_window_frames
        if self._open is not None:
            keep_from = min(keep_from, self._open.start)
        self._tape.forget_before(max(keep_from, self._tape.start))
