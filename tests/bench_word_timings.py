"""Word timings on the CPU: start error on espeak-ng phrases with known pauses, and the extra cost
per final (the same segments decoded with and without words, alternately, in one engine).

    PYTHONPATH=$PWD python tests/bench_word_timings.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
from test_word_timings import PHRASES, first_word_errors, synthetic_phrases

import engines.whisper.alignment
from engines.engine import Engine
from engines.whisper.decoding import DecodingOptions


def start_errors(engine: Engine, audio: np.ndarray, onsets: list[float]) -> list[float]:
    """|start - onset| of each phrase's first word (words matched by text, in order)."""
    words = engine.transcribe(audio, DecodingOptions(language="en"), words=True).words
    return first_word_errors([{"text": w.text, "start": w.start} for w in words], onsets)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    audio, onsets = synthetic_phrases()
    engine = Engine.load("default", device="cpu")
    errors = start_errors(engine, audio, onsets)
    with mock.patch.object(engines.whisper.alignment, "trim_silence", lambda words, audio: words):
        untrimmed = start_errors(engine, audio, onsets)
    print(
        f"{len(PHRASES)} phrases, {len(audio) / 16000:.1f} s; first-word start error: mean {np.mean(errors):.3f} s, "
        f"max {np.max(errors):.3f} s; without trim_silence (openai/whisper's timings alone): mean "
        f"{np.mean(untrimmed):.3f} s, max {np.max(untrimmed):.3f} s"
    )
    segments = [
        audio[round(a * 16000) : round(b * 16000)]
        for a, b in zip([0.0, *onsets[1:]], [*onsets[1:], len(audio) / 16000])
    ]
    segments.append(audio)
    cost = {False: [], True: []}
    aligned = []
    for _ in range(args.repeats):
        for segment in segments:
            for words in (False, True):
                t0 = time.perf_counter()
                transcript = engine.transcribe(segment, DecodingOptions(language="en"), words=words)
                cost[words].append(time.perf_counter() - t0)
                if words:
                    aligned.append(transcript.alignment_seconds)
    engine.close()
    plain, timed = np.mean(cost[False]), np.mean(cost[True])
    print(
        f"{len(cost[True])} finals each way: {plain * 1000:.0f} ms without words, {timed * 1000:.0f} ms with "
        f"(x{timed / plain:.2f}); the alignment pass itself {np.mean(aligned) * 1000:.0f} ms per final"
    )


if __name__ == "__main__":
    main()
