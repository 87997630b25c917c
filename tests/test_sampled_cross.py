"""The decoder's cross-attention over a sampled window's own positions (engines/whisper/sampled.py's
SampledFeatures): one key per padding block with a log(count) bias on its score is attending to
the block's repeated copies, so the batch decodes the same tokens as over the repeated 1500 frames."""

from __future__ import annotations

import numpy as np
import torch
from test_cuda_graphs import parts  # noqa: F401 - the random two-layer model and its tokenizer

from bench.clips import silence, voiced
from bench.tiny import TINY_TEXT
from engines.batching import Batch, Sequence
from engines.engine import Engine
from engines.whisper.audio import clip_mel
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import Whisper
from engines.whisper.sampled import SampledEncoder, SampledFeatures, dense_positions, sampled_mel
from engines.whisper.tokenizer import Tokenizer


def _sampled(model: Whisper, seconds: list[float], stride: int = 4) -> SampledFeatures:
    """Each clip encoded alone with its padding sampled, stacked as the engine stacks them."""
    encoder = SampledEncoder(model.encoder, stride)
    rows = []
    for i, s in enumerate(seconds):
        torch.manual_seed(i)
        mel = clip_mel(np.concatenate([silence(0.2), voiced(s), silence(0.2)]))
        dense = dense_positions(mel.shape[-1])
        rows.append((encoder.compact(sampled_mel(mel, dense)[None])[0], encoder.counts(dense)))
    return SampledFeatures.stack(rows)


@torch.inference_mode()
def test_sampled_features_expand_to_the_repeated_window(parts):  # noqa: F811 - the fixture
    model, _, _ = parts
    sampled = _sampled(model, [1.0, 6.0])
    encoder = SampledEncoder(model.encoder, 4)
    assert sampled.counts.sum(1).tolist() == [1500, 1500]
    lengths = sampled.lengths()
    assert lengths[0] < lengths[1] < 1500 and sampled.features.shape[1] == lengths[1]
    assert torch.isinf(sampled.log_counts()[0, lengths[0] :]).all()  # the shorter row's padding: never attended
    for row, seconds in zip(sampled.expanded(), (1.0, 6.0)):
        mel = clip_mel(np.concatenate([silence(0.2), voiced(seconds), silence(0.2)]))
        repeated = encoder(sampled_mel(mel, dense_positions(mel.shape[-1]))[None])[0]
        torch.testing.assert_close(row, repeated, atol=1e-5, rtol=1e-5)
    assert sampled[[1]].lengths() == [lengths[1]]


def _decode(batch: Batch, tok: Tokenizer, features: torch.Tensor, seqs: list[Sequence]) -> list[list[int]]:
    batch.admit(features, seqs)
    while batch.active:
        batch.step()
    return [s.result(tok).tokens for s in seqs]


@torch.inference_mode()
def test_the_batch_decodes_the_sampled_positions_as_the_repeated_window(parts):  # noqa: F811 - the fixture
    """Rows of different dense counts in one batch, random weights (long, varied decodes): the same
    tokens and nearly the same log-probabilities as the batch over the repeated frames."""
    model, tok, suppress = parts
    options = DecodingOptions(max_new_tokens=30)
    sampled = _sampled(model, [1.0, 4.5, 9.0])
    prompt = tok.prompt("zh")
    repeated = [Sequence(prompt, "zh", options, [], frames=1500) for _ in range(3)]
    reference = _decode(Batch(model, tok, suppress, rows=4), tok, sampled.expanded(), repeated)
    bias = sampled.log_counts()
    compact = [
        Sequence(prompt, "zh", options, [], frames=n, cross_bias=bias[i, :n]) for i, n in enumerate(sampled.lengths())
    ]
    assert _decode(Batch(model, tok, suppress, rows=4), tok, sampled.features, compact) == reference
    assert len({len(t) for t in reference}) > 1 or len(reference[0]) > 5
    for a, b in zip(repeated, compact):
        assert abs(a.logprob_sum - b.logprob_sum) < 1e-3 * max(1.0, abs(a.logprob_sum))
        assert abs(a.no_speech_prob - b.no_speech_prob) < 1e-5


def test_the_cpu_engine_gives_the_batch_sampled_positions_and_the_rest_whole_windows(tiny_checkpoint):
    """The eager (CPU) batch admits the unrepeated positions; word timings and language detection
    get the repeated window."""
    engine = Engine(tiny_checkpoint, device="cpu")
    admitted: list[tuple[int, list[int]]] = []
    admit = engine.batch.admit

    def spy(features: torch.Tensor, seqs: list[Sequence]) -> None:
        admitted.append((features.shape[1], [s.frames for s in seqs]))
        assert all(s.cross_bias is not None and s.cross_bias.shape == (s.frames,) for s in seqs)
        admit(features, seqs)

    engine.batch.admit = spy  # type: ignore[method-assign]
    try:
        audio = np.concatenate([silence(0.2), voiced(2.0), silence(0.2)])
        words = engine.transcribe(audio, words=True)
        auto = engine.transcribe(audio, DecodingOptions(language=None))
        assert len(admitted) == 2 and all(width < 1500 for width, _ in admitted)
        assert words.words and words.words[-1].end <= 2.4
        assert words.text == auto.text == TINY_TEXT
    finally:
        engine.close()
