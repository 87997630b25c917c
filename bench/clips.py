"""Audio that tests and benchmarks stream: speech-like buzz webrtcvad takes for voice, silence,
16-bit PCM, and where the dev set (../shared/eval/dev, outside the repository) lives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

RATE = 16000
DEV_DIR = Path(os.environ.get("BREEZE_EVAL_DEV", Path(__file__).resolve().parents[2] / "shared" / "eval" / "dev"))
"""The dev clips of ../shared/eval; what needs them skips (tests) or refuses (benchmarks) without."""


def voiced(seconds: float, f0: float = 140.0, peak: float = 0.3, rate: int = RATE) -> np.ndarray:
    """A harmonic-rich, syllable-modulated buzz: steady speech to webrtcvad (every frame voiced)."""
    t = np.arange(round(seconds * rate)) / rate
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / rate
    x = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30) if h * f0 < rate / 2)
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (peak * x / np.abs(x).max()).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def phrases(n: int, speech: float = 1.2, pause: float = 0.8) -> np.ndarray:
    """n phrases of voiced buzz between pauses: n segments, so n finals from the tiny model."""
    parts = [silence(0.3)]
    for i in range(n):
        parts += [voiced(speech, f0=120.0 + 10 * (i % 5)), silence(pause)]
    return np.concatenate(parts)


def two_phrases(rate: int = RATE) -> np.ndarray:
    """Speech 0.3-1.8 s and 2.8-4.3 s, 5.3 s in all."""
    return np.concatenate(
        [silence(0.3, rate), voiced(1.5, rate=rate), silence(1.0, rate), voiced(1.5, rate=rate), silence(1.0, rate)]
    )


def dev_manifest() -> dict[str, dict]:
    """The dev clips' manifest entries by file name (empty without ../shared)."""
    path = DEV_DIR / "manifest.jsonl"
    if not path.is_file():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry["audio"]: entry for entry in entries}
