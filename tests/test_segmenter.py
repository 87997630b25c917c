"""Segmenter on speech-like audio: espeak-ng speech and the real clips of eval/dev.

Tones and noise bursts are not reliably speech to webrtcvad, so speech comes from espeak-ng
(skipped when it is not installed) and from the dev clips (skipped when the folder is absent).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from engines.whisper.audio import load_audio
from streaming.audio.segmenter import (
    SAMPLE_RATE,
    SegmentClosed,
    SegmentDiscarded,
    SegmentEnding,
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    SegmentGrew,
    SegmentResumed,
    SegmentStarted,
)

DEV_DIR = Path(os.environ.get("BREEZE_EVAL_DEV", Path(__file__).resolve().parents[2] / "shared/eval/dev"))

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install espeak-ng): these tests need speech-like audio",
)
needs_dev = pytest.mark.skipif(not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (set BREEZE_EVAL_DEV)")


def seconds(s: float) -> np.ndarray:
    return np.zeros(round(s * SAMPLE_RATE), np.float32)


def white_noise(s: float, rms: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(s * SAMPLE_RATE)) * rms).astype(np.float32)


_speech_cache: dict[tuple[str, str, int], np.ndarray] = {}


def say(text: str, voice: str = "en", words_per_minute: int = 175) -> np.ndarray:
    """espeak-ng speech at 16 kHz (cached: synthesis is the slow part)."""
    key = (text, voice, words_per_minute)
    if key not in _speech_cache:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "speech.wav"
            command = ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(path), text]
            subprocess.run(command, check=True, capture_output=True)
            _speech_cache[key] = load_audio(path)
    return _speech_cache[key]


def run(audio: np.ndarray, chunk: int = 1600, config: SegmenterConfig | None = None) -> list[SegmentEvent]:
    """All events of one stream fed in chunks of `chunk` samples, flush included."""
    segmenter = Segmenter(config)
    events: list[SegmentEvent] = []
    for i in range(0, audio.size, chunk):
        events += segmenter.feed(audio[i : i + chunk])
    return events + segmenter.flush()


def closed(events: list[SegmentEvent]) -> list[SegmentClosed]:
    return [e for e in events if isinstance(e, SegmentClosed)]


def speech_span(audio: np.ndarray, offset: int) -> tuple[int, int]:
    """First and last non-silent sample of an espeak clip placed at `offset`."""
    loud = np.nonzero(np.abs(audio) > 1e-3)[0]
    return offset + int(loud[0]), offset + int(loud[-1]) + 1


def summary(events: list[SegmentEvent]) -> list[tuple]:
    """Events without the per-feed growth notices, audio compared by content."""
    out: list[tuple] = []
    for e in events:
        if isinstance(e, SegmentClosed):
            out.append(("closed", e.index, e.start, e.end, e.reason, e.audio.tobytes()))
        elif isinstance(e, SegmentEnding):
            out.append(("ending", e.index, e.start, e.end, e.audio.tobytes()))
        elif not isinstance(e, SegmentGrew):
            out.append((type(e).__name__, *vars(e).values()))
    return out


@pytest.fixture(scope="module")
def two_utterances() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """1 s silence, English sentence, 1.5 s silence, Mandarin sentence, 2 s silence; and the speech spans."""
    first = say("Hello there, how are you today?")
    second = say("我們明天早上九點在車站見面。", voice="cmn")
    parts = [seconds(1), first, seconds(1.5), second, seconds(2)]
    audio = np.concatenate(parts)
    spans = [speech_span(first, parts[0].size), speech_span(second, audio.size - parts[4].size - second.size)]
    return audio, spans


@needs_espeak
def test_one_segment_per_utterance(two_utterances):
    audio, spans = two_utterances
    events = run(audio)
    segments = closed(events)
    assert [s.index for s in segments] == [0, 1]
    assert all(s.reason == "silence" for s in segments)
    for segment, (onset, offset) in zip(segments, spans):
        assert segment.start <= onset - 0.2 * SAMPLE_RATE  # pre-roll before the first sound
        assert segment.end >= offset  # the word-final decay is kept
        assert segment.end - offset < 0.5 * SAMPLE_RATE
        assert np.array_equal(segment.audio, audio[segment.start : segment.end])
    assert segments[1].start >= segments[0].end
    kinds = [type(e) for e in events]
    assert kinds.index(SegmentStarted) < kinds.index(SegmentGrew) < kinds.index(SegmentClosed)


@needs_espeak
def test_close_reports_speech_end_not_hangover_end(two_utterances):
    audio, _ = two_utterances
    config = SegmenterConfig()
    segmenter = Segmenter(config)
    closed_at = []
    for i in range(0, audio.size, 160):
        for event in segmenter.feed(audio[i : i + 160]):
            if isinstance(event, SegmentClosed):
                closed_at.append((segmenter.position, event.end))
    assert len(closed_at) == 2
    for position, end in closed_at:
        assert position - end == (config.hangover_ms - config.end_padding_ms) * SAMPLE_RATE // 1000


@needs_espeak
def test_ending_announces_the_closing_audio_a_hangover_early(two_utterances):
    audio, _ = two_utterances
    config = SegmenterConfig()
    segmenter = Segmenter(config)
    endings: dict[int, tuple[int, SegmentEnding]] = {}
    closes: list[tuple[int, SegmentClosed]] = []
    for i in range(0, audio.size, 160):
        for event in segmenter.feed(audio[i : i + 160]):
            if isinstance(event, SegmentEnding):
                endings[event.index] = (segmenter.position, event)
            elif isinstance(event, SegmentResumed):
                del endings[event.index]
            elif isinstance(event, SegmentClosed):
                closes.append((segmenter.position, event))
    assert len(closes) == 2
    frame = config.frame_ms * SAMPLE_RATE // 1000
    hangover, padding = -(-config.hangover_ms // config.frame_ms), -(-config.end_padding_ms // config.frame_ms)
    for position, close in closes:
        announced_at, ending = endings[close.index]
        # the audio a final needs, known before the hangover runs out: what the close then carries
        assert (ending.start, ending.end) == (close.start, close.end)
        assert ending.audio.tobytes() == close.audio.tobytes()
        assert position - announced_at == (hangover - padding) * frame


@needs_espeak
def test_a_pause_shorter_than_the_hangover_voids_the_ending():
    word = say("Seven.")
    first, last = speech_span(word, 0)
    word = word[first:last]
    audio = np.concatenate([seconds(0.5), word, seconds(0.36), word, seconds(1)])
    events = [e for e in run(audio, chunk=160) if not isinstance(e, SegmentGrew)]
    kinds = [type(e).__name__ for e in events]
    # one segment: its speech seemed over in the pause, came back, then ended for good
    assert kinds == ["SegmentStarted", "SegmentEnding", "SegmentResumed", "SegmentEnding", "SegmentClosed"]
    assert events[1].end < events[3].end == events[4].end


@needs_espeak
def test_pre_roll_never_overlaps_the_previous_segment():
    word = say("Seven.")
    audio = np.concatenate([seconds(0.5), word, seconds(0.55), word, seconds(1)])
    segments = closed(run(audio))
    assert len(segments) == 2
    assert segments[1].start >= segments[0].end


def test_silence_gives_no_events():
    assert run(seconds(30)) == []
    assert run(white_noise(30, rms=1e-4)) == []  # dither-level noise


def test_moderate_white_noise_gives_no_speech_long_segment():
    # -34 dBFS. Louder stationary noise (about -30 dBFS and up) is voiced by webrtcvad in every
    # mode; that case is bounded by the max-length cut (next test) and left to the model's
    # no-speech probability.
    for seed in range(3):
        segments = closed(run(white_noise(30, rms=0.02, seed=seed)))
        assert all(s.end - s.start < SAMPLE_RATE for s in segments)


def test_max_length_cut_keeps_segments_under_the_window():
    audio = white_noise(70, rms=0.3)  # voiced throughout, as far as webrtcvad can tell
    segments = closed(run(audio))
    assert len(segments) >= 3
    limit = SegmenterConfig().max_segment_ms * SAMPLE_RATE // 1000
    assert all(0 < s.end - s.start <= limit for s in segments)
    assert [s.reason for s in segments] == ["max_length"] * (len(segments) - 1) + ["flush"]
    assert [s.index for s in segments] == list(range(len(segments)))
    for head, tail in zip(segments, segments[1:]):
        assert tail.start == head.end  # nothing lost or repeated at a cut
    assert segments[-1].end == audio.size


@needs_espeak
def test_max_length_cut_lands_in_a_quiet_spot():
    text = (
        "The committee met on Tuesday to discuss the budget, and after a long debate they agreed to fund "
        "the new library, the park renovation, the bus routes and the music school, while postponing "
        "the decision on the bridge until next spring"
    )
    speech = say(text, words_per_minute=190)
    audio = np.concatenate([seconds(0.5), speech, seconds(1)])
    config = SegmenterConfig(max_segment_ms=4000, cut_search_ms=1500)
    segments = closed(run(audio, config=config))
    assert len(segments) >= 3
    assert all(s.end - s.start <= 4 * SAMPLE_RATE for s in segments)
    frame_rms = np.sqrt(np.mean(speech[: speech.size // 480 * 480].reshape(-1, 480) ** 2, axis=1))
    for head, tail in zip(segments, segments[1:]):
        assert head.reason == "max_length"
        around = audio[tail.start - 1200 : tail.start + 1200]
        assert np.sqrt(np.mean(around**2)) < np.median(frame_rms)


@needs_dev
def test_max_length_cut_on_real_continuous_speech():
    # 21 s and 16 s of speech without a pause long enough to close a segment.
    clips = ("mossttsd-single_reference.wav", "mossttsd-pod_f_enhanced.wav")
    audio = np.concatenate([load_audio(DEV_DIR / name) for name in clips])
    segments = closed(run(audio))
    assert len(segments) >= 2
    assert segments[0].reason == "max_length"
    assert all(s.end - s.start < 28 * SAMPLE_RATE for s in segments)


@needs_espeak
def test_segments_do_not_depend_on_chunk_size(two_utterances):
    audio, _ = two_utterances
    audio = np.concatenate([audio, white_noise(3, rms=0.3), audio, white_noise(1, rms=0.01)])
    expected = summary(run(audio, chunk=160))
    assert len([e for e in expected if e[0] == "closed"]) >= 4
    assert summary(run(audio, chunk=1600)) == expected
    rng = np.random.default_rng(5)
    segmenter = Segmenter()
    events: list[SegmentEvent] = []
    position = 0
    while position < audio.size:
        step = int(rng.integers(0, 5000))
        events += segmenter.feed(audio[position : position + step])
        position += step
    assert summary(events + segmenter.flush()) == expected


@needs_espeak
def test_flush_closes_the_open_segment_and_the_stream_goes_on(two_utterances):
    audio, _ = two_utterances
    speech = say("Testing, one, two, three, four.")
    segmenter = Segmenter()
    events = segmenter.feed(np.concatenate([seconds(0.5), speech[: speech.size * 3 // 4]]))
    assert any(isinstance(e, SegmentStarted) for e in events)
    assert not closed(events)
    flushed = segmenter.flush()
    assert len(flushed) == 1 and isinstance(flushed[0], SegmentClosed)
    assert flushed[0].reason == "flush" and flushed[0].end <= segmenter.position
    assert segmenter.flush() == []
    later = closed(segmenter.feed(audio) + segmenter.flush())
    assert [s.index for s in later] == [1, 2]
    assert later[0].start >= flushed[0].end


@needs_espeak
def test_growth_events_carry_stable_snapshots(two_utterances):
    audio, _ = two_utterances
    segmenter = Segmenter()
    grew: list[tuple[SegmentGrew, bytes]] = []
    for i in range(0, audio.size, 800):
        for event in segmenter.feed(audio[i : i + 800]):
            if isinstance(event, SegmentGrew):
                assert not event.audio.flags.writeable
                assert event.audio.size == event.end - event.start
                grew.append((event, event.audio.tobytes()))
    assert len(grew) > 10
    for (a, _), (b, _) in zip(grew, grew[1:]):
        assert (b.index, b.end) > (a.index, a.end)
    assert all(event.audio.tobytes() == snapshot for event, snapshot in grew)  # never overwritten


@needs_espeak
def test_blips_below_min_speech_are_reported_not_announced():
    audio = np.concatenate([seconds(0.5), say("yes"), seconds(1)])
    events = run(audio, config=SegmenterConfig(min_speech_ms=3000))
    assert [type(e) for e in events] == [SegmentDiscarded]
    assert 0 < events[0].voiced_ms < 3000
    assert [type(e) for e in run(audio) if not isinstance(e, SegmentGrew)] == [
        SegmentStarted,
        SegmentEnding,
        SegmentClosed,
    ]


@needs_espeak
def test_fast_single_syllables_are_kept():
    for text, voice in (("yes", "en"), ("是", "cmn"), ("對", "cmn")):
        audio = np.concatenate([seconds(0.5), say(text, voice, words_per_minute=280), seconds(1)])
        assert len(closed(run(audio))) == 1, text


def test_bad_config_is_rejected():
    bad_configs = (
        {"frame_ms": 25},
        {"aggressiveness": 4},
        {"start_voiced_frames": 9},
        {"end_padding_ms": 900},
        {"cut_search_ms": 30000},
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            SegmenterConfig(**bad)
    with pytest.raises(ValueError, match="mono"):
        Segmenter().feed(np.zeros((2, 160), np.float32))


@needs_dev
def test_dev_clips_are_covered_by_segments():
    """Every clip's loud frames (within 20 dB of its peak) fall inside segments; none reach 30 s."""
    clips = sorted(DEV_DIR.glob("*.wav"))
    assert clips
    inside_total = loud_total = 0
    for path in clips:
        audio = np.concatenate([seconds(1), load_audio(path), seconds(1)])
        segments = closed(run(audio))
        assert segments, path.name
        frames = audio[: audio.size // 480 * 480].reshape(-1, 480).astype(np.float64)
        level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
        loud = level > level.max() - 20
        inside = np.zeros(loud.size, bool)
        for s in segments:
            assert s.end - s.start < 28 * SAMPLE_RATE
            inside[s.start // 480 : -(-s.end // 480)] = True
        assert (loud & inside).sum() >= 0.9 * loud.sum(), path.name
        inside_total += (loud & inside).sum()
        loud_total += loud.sum()
    assert inside_total >= 0.97 * loud_total
