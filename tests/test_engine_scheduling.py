"""The engine's scheduling policy: partials are optional work, finals are never held back."""

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from bench.tiny import TINY_DIMS, TINY_TEXT, tiny_model
from engines.engine import Engine
from engines.scheduling import Admission
from engines.weights.checkpoints import Checkpoint, default_suppress_ids, default_vocabulary
from engines.whisper.audio import N_FRAMES
from engines.whisper.decoding import DecodingOptions

OPTIONS = DecodingOptions(language="zh")


def checkpoint(model) -> Checkpoint:
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return Checkpoint(
        name="tiny",
        dims=TINY_DIMS,
        state_dict=state,
        vocabulary=default_vocabulary(),
        suppress_tokens=default_suppress_ids(),
        alignment_heads=None,
    )


@pytest.fixture(scope="module")
def looping_engine():
    """The rigged tiny model with <|endoftext|> pushed away: it says TINY_TEXT forever (a loop)."""
    model = tiny_model()
    eot = default_vocabulary().index("<|endoftext|>")
    with torch.no_grad():
        model.decoder.token_embedding.weight[eot] *= -1
    engine = Engine(checkpoint(model), device="cpu")
    yield engine
    engine.close()


def audio(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_a_looping_final_is_redone_on_the_full_window(looping_engine):
    t = looping_engine.transcribe(audio(2.0), OPTIONS, window=2.0, final=True)
    assert t.looped and t.window_frames == N_FRAMES
    assert t.text == TINY_TEXT  # the repeated tail is cut


def test_a_looping_partial_keeps_its_short_window(looping_engine):
    t = looping_engine.transcribe(audio(2.0), OPTIONS, window=2.0, final=False, stream=object())
    assert t.looped and t.window_frames < N_FRAMES
    assert t.text == TINY_TEXT


def test_cpu_partials_respect_their_row_cap_and_finals_join_one_a_round(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, device="cpu", max_partials=1, partials_per_round=1)
    seen = []
    admit = engine.batch.admit

    def recording_admit(features, sequences):
        admit(features, sequences)
        active = [s.tag for s in engine.batch.active]
        new_finals = sum(s.tag.final for s in sequences)
        seen.append((sum(not r.final for r in active), sum(r.final for r in active), new_finals, len(sequences)))

    engine.batch.admit = recording_admit
    try:
        futures = [engine.submit(audio(1.5, i), OPTIONS, window=2.0, final=False, stream=i) for i in range(4)]
        futures += [engine.submit(audio(3.0, 9 + i), OPTIONS, final=True) for i in range(3)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.close()
    assert all(r is not None and r.text == TINY_TEXT for r in results)  # every partial served, none dropped
    assert max(partials for partials, _, _, _ in seen) <= 1
    # on the CPU a final starts alone (its encoder call holds up the steps once), then decodes
    # beside finals already running; no partial starts while a final is in the batch
    assert all(new <= 1 for _, _, new, _ in seen)
    assert all(admitted == new for _, finals, new, admitted in seen if finals)


def test_cpu_admission_starts_one_final_a_round_beside_running_finals():
    """Finals that end together: on the CPU each is encoded alone and then decodes beside those
    already running (a step reads the weights once for all rows); partials wait for them all."""

    @dataclass
    class Queued:
        final: bool
        alone: bool = False

    running, queue = [Queued(True)], [Queued(True), Queued(True), Queued(False)]
    cpu = Admission.for_device(False, rows=16)
    assert cpu.take(queue, running, 16) == queue[:1]
    assert cpu.take(queue[2:], running, 16) == []  # no partial beside a final
    assert cpu.take(queue[2:], [], 16) == queue[2:]
    gpu = Admission.for_device(True, rows=16)
    assert gpu.take(queue, running, 16) == queue  # a GPU starts them all, partials beside
    assert cpu.take(queue, [Queued(True)] * 16, 16) == []  # no free row


def test_a_final_supersedes_its_streams_partials(looping_engine):
    """The segment closed: its partial would be thrown away, so the engine answers it None at once."""
    stream = object()
    with looping_engine._cv:  # both queued before the worker looks
        partial = looping_engine.submit(audio(2.0), OPTIONS, window=2.0, final=False, stream=stream)
        final = looping_engine.submit(audio(2.5), OPTIONS, window=2.0, final=True, stream=stream)
    assert partial.result(timeout=60) is None
    assert final.result(timeout=60).text == TINY_TEXT


def test_the_encoder_thread_gives_the_serial_engines_transcripts(tiny_checkpoint):
    """overlap_encoder (on by default on CUDA) moves encoder calls to a thread of their own; the
    decoder's results must not change, whatever the mix of windows, partials and finals."""

    def run(overlap: bool) -> list[str]:
        engine = Engine(tiny_checkpoint, device="cpu", overlap_encoder=overlap)
        try:
            futures = [
                engine.submit(
                    audio(1.0 + i / 2, i),
                    OPTIONS,
                    window=2.0 if i % 2 else None,
                    final=i % 3 == 0,
                    stream=None if i % 3 == 0 else i,
                )
                for i in range(8)
            ]
            results = [f.result(timeout=60) for f in futures]
            assert engine.health()["encoding"] == 0
            return [r.text for r in results]
        finally:
            engine.close()

    serial = run(False)
    assert run(True) == serial
    assert all(text == TINY_TEXT for text in serial)


def test_a_partial_superseded_while_it_is_encoded_is_answered_none(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, device="cpu", overlap_encoder=True)
    entered, release = threading.Event(), threading.Event()
    encoder = engine.encoder

    def held_encoder(mel):
        entered.set()
        assert release.wait(30)
        return encoder(mel)

    engine.encoder = held_encoder
    try:
        stream = object()
        older = engine.submit(audio(1.0), OPTIONS, window=2.0, final=False, stream=stream)
        assert entered.wait(30)  # the older partial is inside the encoder now
        newer = engine.submit(audio(1.5), OPTIONS, window=2.0, final=False, stream=stream)
        release.set()
        assert older.result(timeout=60) is None
        assert newer.result(timeout=60).text == TINY_TEXT
    finally:
        release.set()
        engine.close()


def test_the_encoder_thread_takes_a_final_before_queued_partials(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, device="cpu", overlap_encoder=True)
    engine.admission.partials_beside_finals = True  # as on a GPU: partials start beside finals
    engine.admission.finals_per_round = engine.batch.rows
    entered, release = threading.Event(), threading.Event()
    order = []
    encode = engine._encode

    def recording_encode(group, frames):
        order.append([r.final for r in group])
        entered.set()
        assert release.wait(30)
        return encode(group, frames)

    engine._encode = recording_encode
    try:
        first = engine.submit(audio(1.0), OPTIONS, window=2.0, final=False, stream=0)
        assert entered.wait(30)  # the encoder thread is busy with the first partial
        partials = [engine.submit(audio(2.0 + i), OPTIONS, window=2.0, final=False, stream=1 + i) for i in range(2)]
        deadline = time.monotonic() + 30
        while len(engine._to_encode) < 2 and time.monotonic() < deadline:  # handed over, waiting for the encoder
            time.sleep(0.01)
        final = engine.submit(audio(3.0), OPTIONS, final=True)  # handed over after them
        while engine._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert all(f.result(timeout=60).text == TINY_TEXT for f in [first, *partials, final])
    finally:
        release.set()
        engine.close()
    assert order[0] == [False] and order[1] == [True]  # the final went ahead of the partials queued before it


def test_a_stalled_worker_is_reported_dead_and_recovers(tiny_checkpoint):
    """A hung step (a stuck kernel, a deadlock) must turn /healthz red, not hang silently."""
    engine = Engine(tiny_checkpoint, device="cpu", stall_timeout=0.3)
    release = threading.Event()
    step = engine._step

    def stuck_step():
        assert release.wait(30)
        step()

    engine._step = stuck_step
    try:
        time.sleep(0.5)
        assert engine.health()["alive"]  # idle is not stalled, however long
        future = engine.submit(audio(1.0), OPTIONS, final=True)
        assert engine.health()["alive"]  # work just arrived
        time.sleep(0.6)
        health = engine.health()
        assert not health["alive"] and health["stalled_s"] >= 0.3
        release.set()
        assert future.result(timeout=60).text == TINY_TEXT
        assert engine.health()["alive"]
    finally:
        release.set()
        engine.close()


def test_an_encoder_failure_on_its_thread_fails_only_its_request(tiny_checkpoint):
    # padding_stride 1: the finals' full windows go through engine.encoder, which the test poisons
    engine = Engine(tiny_checkpoint, device="cpu", overlap_encoder=True, padding_stride=1)
    engine.admission.partials_beside_finals = True  # as on a GPU: encoded together
    engine.admission.finals_per_round = engine.batch.rows
    encoder = engine.encoder

    def poisoned_encoder(mel):
        head = mel[:, :, :50]  # the first 0.5 s (past the audio the window is padded)
        if (head.amax(dim=(1, 2)) == head.amin(dim=(1, 2))).any():  # digital silence: a flat log-mel
            raise RuntimeError("bad audio")
        return encoder(mel)

    engine.encoder = poisoned_encoder
    bad = np.zeros(16000, dtype=np.float32)
    try:
        with engine._cv:  # all three handed to the encoder thread together
            futures = [engine.submit(audio(1.0, i), OPTIONS, final=True) for i in range(2)]
            failing = engine.submit(bad, OPTIONS, final=True)
        assert all(f.result(timeout=60).text == TINY_TEXT for f in futures)
        with pytest.raises(RuntimeError, match="bad audio"):
            failing.result(timeout=60)
        assert engine.transcribe(audio(1.0, 7), OPTIONS).text == TINY_TEXT  # still serving
        assert engine.health()["alive"]
    finally:
        engine.close()
