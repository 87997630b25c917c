"""Audio and helpers shared by the protocol adapter tests (test_realtime, test_whisperlive, test_twilio)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import DEV_DIR

RATE = 16000


def voiced(seconds: float, f0: float = 140.0, rate: int = RATE) -> np.ndarray:
    """A harmonic-rich, syllable-modulated buzz: steady speech to webrtcvad (every frame voiced)."""
    t = np.arange(round(seconds * rate)) / rate
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / rate
    x = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30) if h * f0 < rate / 2)
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def two_phrases(rate: int = RATE) -> np.ndarray:
    """Speech 0.3-1.8 s and 2.8-4.3 s, 5.3 s in all."""
    return np.concatenate(
        [silence(0.3, rate), voiced(1.5, rate=rate), silence(1.0, rate), voiced(1.5, rate=rate), silence(1.0, rate)]
    )


def dev_manifest() -> dict[str, dict]:
    """The dev clips' manifest entries by file name (empty without ../shared)."""
    path = Path(DEV_DIR) / "manifest.jsonl"
    if not path.is_file():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry["audio"]: entry for entry in entries}
