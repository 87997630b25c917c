"""The TensorRT-LLM backends' start-up self-test: one short generated clip through the encoder
(compared with the PyTorch encoder on the same weights, `trtllm-encoder`) and through the whole
pipeline."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import torch

from engines.whisper.audio import FRAMES_PER_SECOND, N_FRAMES, SAMPLE_RATE, clip_mel, pad_mel
from engines.whisper.decoding import DecodingOptions

log = logging.getLogger(__name__)

SELF_TEST_TIMEOUT = 120.0  # seconds for the pipeline self-test (first calls warm kernels up)
ENCODER_AGREEMENT = {None: 0.99, "int8": 0.97, "int4": 0.95}
"""Least mean cosine similarity between TensorRT-LLM's and PyTorch's encoder outputs on the
self-test clip, by weight-only precision. A guess from fp16 rounding, never measured on a GPU here."""


class SelfTestFailed(RuntimeError):
    """The backend loaded but gave wrong or no results on the start-up clip."""


def self_test_clip(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A short, deterministic, speech-like signal: a voiced harmonic series with a gliding pitch and
    syllable-rate amplitude, plus a little noise. It exercises the whole front end; what the model
    makes of it does not matter (nothing here knows the right transcript)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * np.minimum(1, np.minimum(t, seconds - t) / 0.1)
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * voice * envelope / np.abs(voice).max() + noise).astype(np.float32)


def encoder_agreement(reference: Callable, candidate: Callable, mel: torch.Tensor) -> float:
    """Mean cosine similarity over frames of two encoders' outputs on the same mel [B, n_mels, T]."""
    with torch.inference_mode():
        a, b = reference(mel), candidate(mel)
    if a.shape != b.shape:
        raise SelfTestFailed(f"encoder output shape {tuple(b.shape)} != PyTorch's {tuple(a.shape)}")
    if not torch.isfinite(b).all():
        raise SelfTestFailed("encoder output holds NaN or infinity")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def self_test_encoder(engine, encoder: Callable, weight_only: str | None = None) -> list[float]:
    """TensorRT-LLM's encoder against the PyTorch encoder of the same weights on the self-test clip:
    the full 30 s window and a shortened one (the engine runs both)."""
    dims = engine.model.dims
    mel = clip_mel(self_test_clip(), dims.n_mels)
    threshold = ENCODER_AGREEMENT.get(weight_only, 0.95)
    scores = []
    for frames in (N_FRAMES, 2 * math.ceil((mel.shape[-1] + 2 * FRAMES_PER_SECOND) / 2)):
        batch = pad_mel(mel, frames)[None].to(engine.device, engine.dtype)
        score = encoder_agreement(engine.model.encoder, encoder, batch)
        scores.append(score)
        if score < threshold:
            raise SelfTestFailed(
                f"TensorRT-LLM's encoder disagrees with PyTorch's on the self-test clip ({frames} mel "
                f"frames): mean cosine similarity {score:.4f} < {threshold}"
            )
    return scores


def self_test_pipeline(engine, timeout: float = SELF_TEST_TIMEOUT):
    """One decode of the self-test clip end to end: it must finish, in time, with valid tokens."""
    started = time.perf_counter()
    future = engine.submit(self_test_clip(), DecodingOptions(language="zh", max_new_tokens=32))
    try:
        transcript = future.result(timeout=timeout)
    except FutureTimeout:
        raise SelfTestFailed(f"the self-test clip was not decoded within {timeout:g} s") from None
    except Exception as exc:
        raise SelfTestFailed(f"decoding the self-test clip failed: {type(exc).__name__}: {exc}") from exc
    n_vocab = len(engine.tokenizer.vocabulary)
    if transcript is None or any(not 0 <= t < n_vocab for t in transcript.tokens):
        raise SelfTestFailed(f"the self-test decode returned {transcript!r}")
    log.info(
        "self-test passed: %d tokens in %.2f s (%r)",
        len(transcript.tokens),
        time.perf_counter() - started,
        transcript.text[:40],
    )
    return transcript
