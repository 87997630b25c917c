"""The CPU's compute thread and heap trims (engines/compute.py)."""

from __future__ import annotations

import numpy as np

from engines import compute


def test_trims_are_spaced_by_their_interval():
    assert compute.release_free_memory()  # no interval: always
    assert not compute.release_free_memory(every=3600.0)
    assert compute.release_free_memory(every=0.0)


def test_the_cpu_worker_trims_the_heap_after_encoder_calls(tiny_engine, monkeypatch):
    """glibc keeps what an encoder call's activations freed: the CPU worker hands it back, at most
    once per TRIM_INTERVAL (each trim costs milliseconds on the compute thread)."""
    calls: list[float] = []
    monkeypatch.setattr(compute, "release_free_memory", lambda every=0.0: calls.append(every) or True)
    tiny_engine.transcribe(np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32))
    assert calls and set(calls) == {compute.TRIM_INTERVAL}
