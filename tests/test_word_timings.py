"""Word timings: the alignment pieces against their definitions, the embedded whisper-base on
synthetic speech with pauses of known length, and the native protocol over a real socket."""

from __future__ import annotations

import base64
import gzip
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from test_server import RATE, check_contract, pcm16, silence, stream, voiced

from bench.clips import DEV_DIR
from bench.tiny import TINY_TEXT
from engines.weights.checkpoints import default_vocabulary, load_checkpoint
from engines.whisper.alignment import default_heads, dtw, median_filter, split_words
from engines.whisper.audio import load_audio
from engines.whisper.decoding import DecodingOptions
from engines.whisper.tokenizer import _BYTES, Tokenizer
from streaming.server.app import Server, ServerConfig

# openai/whisper, whisper/__init__.py: _ALIGNMENT_HEADS["base"], a base85 gzipped boolean array [layers, heads]
OPENAI_BASE_HEADS = b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m"


def reference_dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai/whisper's dtw_cpu and backtrace, cell by cell."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = (i - 1, j - 1) if trace[i, j] == 0 else (i - 1, j) if trace[i, j] == 1 else (i, j - 1)
    path = np.array(path[::-1]).T
    return path[0], path[1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (5, 40), (23, 60)])
def test_dtw_is_whispers_recurrence(shape: tuple[int, int]):
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    x[:, ::7] = 0.5  # ties: the tie-breaking must match too
    tokens, frames = dtw(x)
    expected_tokens, expected_frames = reference_dtw(x)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(frames, expected_frames)


def test_median_filter_is_a_sliding_median():
    x = torch.randn(3, 4, 30, generator=torch.Generator().manual_seed(0))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
    expected = np.stack([np.median(padded[..., i : i + 7], axis=-1) for i in range(30)], axis=-1)
    np.testing.assert_allclose(median_filter(x, 7).numpy(), expected, rtol=0, atol=0)


def test_the_embedded_model_has_openais_alignment_heads():
    mask = np.frombuffer(gzip.decompress(base64.b85decode(OPENAI_BASE_HEADS)), dtype=bool).reshape(6, 8)
    heads = [tuple(h) for h in np.argwhere(mask).tolist()]
    assert load_checkpoint("default", progress=None).alignment_heads == heads


def test_unknown_heads_fall_back_to_the_last_half_of_the_layers():
    assert default_heads(4, 2) == [(2, 0), (2, 1), (3, 0), (3, 1)]


def byte_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte (every byte is a token of Whisper's byte-level BPE)."""
    inverse = {b: c for c, b in _BYTES.items()}
    return [tokenizer.ids[inverse[b]] for b in text.encode()]


def test_chinese_splits_into_whole_characters():
    """A character cut between tokens (partial UTF-8) is one word with all its tokens."""
    tokenizer = Tokenizer(default_vocabulary())
    tokens = byte_tokens(tokenizer, "我們說龘,OK")
    words = split_words(tokenizer, tokens, "zh")
    assert [text for text, _ in words] == ["我", "們", "說", "龘", ",", "O", "K"]
    assert [len(group) for _, group in words] == [3, 3, 3, 3, 1, 1, 1]
    assert sum((group for _, group in words), []) == tokens


def test_english_splits_at_spaces_and_punctuation():
    tokenizer = Tokenizer(default_vocabulary())
    tokens = byte_tokens(tokenizer, " Good morning, everyone")
    assert [text for text, _ in split_words(tokenizer, tokens, "en")] == [" Good", " morning", ",", " everyone"]


# --- whisper-base on synthetic speech -------------------------------------------------------------

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
# phrases whose first words whisper-base gets right from espeak-ng's English voice, and the
# silences after them (espeak-ng's Mandarin voice is not intelligible to whisper-base: it writes
# "V4V4V3F5112" for 谢谢你的帮忙, so the speech here is English)
PHRASES = [
    ("good morning everyone", 0.8),
    ("the meeting starts at ten", 1.2),
    ("please send me the report", 0.6),
    ("thank you very much", 1.0),
    ("call me back tomorrow", 0.9),
]
LEAD = 0.5


def speak(text: str) -> np.ndarray:
    """espeak-ng's voice at 16 kHz, trimmed to where its samples are audible."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", f.name, text], check=True)
        audio, rate = sf.read(f.name, dtype="float32")
    audio = soxr.resample(audio, rate, RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1]


def synthetic_phrases() -> tuple[np.ndarray, list[float]]:
    """The phrases after LEAD seconds of silence, each followed by its silence, over a faint noise
    floor (-50 dBFS: no digital silence); and where each starts."""
    parts, onsets, t = [silence(LEAD)], [], LEAD
    for text, pause in PHRASES:
        audio = speak(text)
        onsets.append(t)
        parts += [audio, silence(pause)]
        t += len(audio) / RATE + pause
    audio = np.concatenate(parts)
    return audio + np.random.default_rng(0).normal(0, 10 ** (-50 / 20), len(audio)).astype(np.float32), onsets


@pytest.fixture(scope="module")
def phrases() -> tuple[np.ndarray, list[float]]:
    return synthetic_phrases()


def first_word_errors(words: list[dict], onsets: list[float]) -> list[float]:
    """|start - onset| of each phrase's first word, found in order among the timed words."""
    said = [w["text"].strip(" ,.!?").lower() for w in words]
    errors, at = [], 0
    for (text, _), onset in zip(PHRASES, onsets):
        at = said.index(text.split()[0], at)
        errors.append(abs(words[at]["start"] - onset))
        at += 1
    return errors


def check_words(words: list[dict], start: float, end: float) -> None:
    """Times in order, each word inside [start, end], a probability for each."""
    assert words
    times = [t for w in words for t in (w["start"], w["end"])]
    assert times == sorted(times), words
    assert start - 1e-6 <= times[0] and times[-1] <= end + 1e-6, (start, end, words)
    assert all(0.0 <= w["probability"] <= 1.0 for w in words)


@needs_espeak
def test_word_starts_land_where_the_phrases_were_placed(default_engine, phrases):
    audio, onsets = phrases
    transcript = default_engine.transcribe(audio, DecodingOptions(language="en"), words=True)
    words = [{"text": w.text, "start": w.start, "end": w.end, "probability": w.probability} for w in transcript.words]
    check_words(words, 0.0, len(audio) / RATE)
    assert "".join(w["text"] for w in words).strip() == transcript.text
    errors = first_word_errors(words, onsets)
    print(f"first-word start errors {np.round(errors, 3).tolist()}, mean {np.mean(errors):.3f} s")
    assert max(errors) <= 0.3, errors


@needs_espeak
def test_partials_never_carry_words(default_engine, phrases):
    audio, _ = phrases
    partial = default_engine.transcribe(audio[: 3 * RATE], DecodingOptions(language="en"), final=False, words=True)
    assert partial.words is None and partial.alignment_seconds == 0.0


@needs_espeak
async def test_native_protocol_words_on_the_stream_clock(default_engine, phrases):
    """Each phrase is a VAD segment of its own; its final's words are in stream seconds."""
    audio, onsets = phrases
    async with Server(ServerConfig(port=0), engine=default_engine) as server:
        events, code = await stream(
            server, pcm16(audio), start={"type": "start", "language": "en", "words": True}, pace=0.005
        )
    assert code == 1000 and events[0]["words"] is True
    finals = check_contract(events, len(audio) / RATE)
    for final in finals.values():
        check_words(final["words"], final["start"], final["end"])
    # recognition differs a little per segment ("Godmourning"): each final's first word is compared
    # with the phrase onset nearest to the segment's start (VAD opens a segment just before an onset)
    errors = [abs(f["words"][0]["start"] - min(onsets, key=lambda t: abs(t - f["start"]))) for f in finals.values()]
    assert len(finals) >= 3 and max(errors) <= 0.3, (errors, finals)


# --- the protocol with the tiny engine (no model of the heads: the fallback) ---------------------


@pytest.fixture
async def tiny_server(tiny_engine):
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:
        yield srv


SPEECH = np.concatenate([silence(0.3), voiced(1.5), silence(1.0)])


@pytest.mark.parametrize("asked", [None, False, True])
async def test_words_only_when_asked(tiny_server, asked: bool | None):
    start = {"type": "start"} if asked is None else {"type": "start", "words": asked}
    events, code = await stream(tiny_server, pcm16(SPEECH), start=start)
    assert code == 1000
    finals = list(check_contract(events, len(SPEECH) / RATE).values())
    assert finals and all(f["text"] == TINY_TEXT for f in finals)
    assert all(("words" in e) == bool(asked) for e in events if e["type"] == "final")
    assert not any("words" in e for e in events if e["type"] == "partial")
    if asked:
        for final in finals:
            check_words(final["words"], final["start"], final["end"])
            assert "".join(w["text"] for w in final["words"]) == final["text"]
            assert final["stats"]["alignment_seconds"] > 0


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
async def test_words_must_be_a_boolean(tiny_server, value):
    events, code = await stream(tiny_server, b"", start={"type": "start", "words": value}, stop=False)
    assert code == 1008
    assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_request"
    assert "words must be true" in events[-1]["message"] and repr(value) in events[-1]["message"]


# --- Mandarin: real speech from the dev set, joined with a known pause --------------------------

needs_dev = pytest.mark.skipif(
    not DEV_DIR.is_dir(), reason=f"dev clips not found at {DEV_DIR} (the ../shared checkout)"
)


def speech_onset(audio: np.ndarray) -> float:
    """Seconds to the first 20 ms step within 30 dB of the clip's loudest."""
    steps = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    level = 10 * np.log10(np.square(steps).mean(axis=1) + 1e-12)
    return float(np.flatnonzero(level > level.max() - 30)[0]) * 0.02


@pytest.mark.dev
@needs_dev
async def test_mandarin_words_over_the_native_protocol(default_engine):
    """Two read sentences 1.5 s apart, one VAD segment each: words are whole characters (or a
    token of a few) in order inside their final, and each final's first character starts where
    its sentence's speech does."""
    clips = [load_audio(DEV_DIR / clip) for clip in ("hhchen-f05-read-0056.wav", "hhchen-f05-read-0089.wav")]
    audio = np.concatenate([silence(0.5), clips[0], silence(1.5), clips[1], silence(1.0)])
    onsets = [0.5 + speech_onset(clips[0]), 0.5 + len(clips[0]) / RATE + 1.5 + speech_onset(clips[1])]
    async with Server(ServerConfig(port=0), engine=default_engine) as server:
        events, code = await stream(server, pcm16(audio), start={"type": "start", "words": True}, pace=0.005)
    assert code == 1000
    finals = list(check_contract(events, len(audio) / RATE).values())
    assert len(finals) == 2, finals
    for final, onset in zip(finals, onsets):
        words = final["words"]
        check_words(words, final["start"], final["end"])
        assert "".join(w["text"] for w in words) == final["text"]
        assert all(len(w["text"].rstrip("，。？！：；、")) <= 4 for w in words), (
            words
        )  # characters, or a token of a few
        print(f"first word {words[0]} vs speech onset {onset:.2f} s")
        assert abs(words[0]["start"] - onset) <= 0.3
