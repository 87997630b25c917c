"""The CPU's offline defaults: the full encoder window with its silence padding sampled
(engines/whisper/sampled.py), and no drafts for segments without a previous hypothesis."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from bench.clips import silence, voiced
from bench.tiny import tiny_model
from engines.engine import Engine
from engines.whisper.audio import clip_mel, pad_mel
from engines.whisper.sampled import (
    MARGIN_POSITIONS,
    SampledEncoder,
    dense_positions,
    encode_sampled,
    padding_blocks,
    sampled_mel,
)
from streaming.options import stride_argument


@pytest.mark.parametrize("clip_frames", [0, 1, 199, 200, 1000, 2899, 2900, 2999, 3000, 3600])
@pytest.mark.parametrize("stride", [1, 3, 4, 8])
def test_blocks_cover_the_window_after_the_clip_and_its_margin(clip_frames: int, stride: int):
    dense = dense_positions(clip_frames)
    blocks = padding_blocks(dense, stride)
    assert dense == min(1500, (clip_frames + 1) // 2 + MARGIN_POSITIONS)
    assert dense + sum(blocks) == 1500
    assert all(1 <= size <= stride for size in blocks)
    assert all(size == stride for size in blocks[:-1])


def _speech(seconds: float) -> np.ndarray:
    return np.concatenate([silence(0.2), voiced(seconds - 0.4), silence(0.2)])


@torch.inference_mode()
def test_stride_one_is_the_full_window():
    encoder = tiny_model().encoder
    for seconds in (0.7, 3.0, 12.5):
        mel = clip_mel(_speech(seconds))
        full = encoder(pad_mel(mel)[None])
        torch.testing.assert_close(encode_sampled(encoder, mel, 1), full, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_clip_that_fills_the_window_is_encoded_in_full():
    encoder = tiny_model().encoder
    mel = clip_mel(voiced(30.0))
    torch.testing.assert_close(encode_sampled(encoder, mel, 4), encoder(pad_mel(mel)[None]), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_sampled_padding_stays_closer_to_the_full_window_than_a_short_one(default_engine: Engine):
    """The claim behind the CPU default: the speech frames' features with the padding sampled every
    4 positions differ from the full window's far less than those of the clip plus 2 s alone."""
    encoder = default_engine.model.encoder
    for seconds in (2.0, 6.0):
        mel = clip_mel(_speech(seconds))
        speech = mel.shape[-1] // 2
        full = encoder(pad_mel(mel)[None])[0, :speech]
        sampled = encode_sampled(encoder, mel, 4)[0, :speech]
        short = encoder(pad_mel(mel, mel.shape[-1] + 200)[None])[0, :speech]
        sampled_error = ((sampled - full).norm() / full.norm()).item()
        short_error = ((short - full).norm() / full.norm()).item()
        assert sampled_error < short_error / 2, (seconds, sampled_error, short_error)


def test_the_cpu_engine_samples_full_windows_and_only_those(tiny_checkpoint):
    engine = Engine(tiny_checkpoint, device="cpu", padding_stride=3)
    calls: list[tuple[int, int]] = []
    sampled = engine.sampled_encoder
    assert isinstance(sampled, SampledEncoder) and sampled.stride == 3 and engine.dense_bucket == 1

    def spy(mel: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(mel.shape[::2]))
        return sampled(mel)

    engine.sampled_encoder = spy
    try:
        audio = _speech(2.0)
        full = engine.transcribe(audio)
        assert calls == [(1, 2 * dense_positions(clip_mel(audio).shape[-1]))] and full.window_frames == 3000
        short = engine.transcribe(audio, window=1.0)
        assert len(calls) == 1 and short.window_frames < 3000
    finally:
        engine.close()
    default = Engine(tiny_checkpoint, device="cpu")
    assert default.padding_stride == 4
    default.close()
    exact = Engine(tiny_checkpoint, device="cpu", padding_stride=1)
    assert exact.sampled_encoder is None
    exact.close()
    with pytest.raises(ValueError):
        Engine(tiny_checkpoint, device="cpu", padding_stride=-1)


@torch.inference_mode()
def test_clips_of_one_dense_count_encode_together_as_each_alone():
    """The engine encodes the finals of one dense count in one call (on a GPU, one graph): each
    row must be what that clip gives alone, whatever its length within the count."""
    encoder = tiny_model().encoder
    mels = [clip_mel(_speech(seconds)) for seconds in (2.1, 2.6, 2.9)]
    dense = max(dense_positions(m.shape[-1], bucket=50) for m in mels)
    assert all(dense == dense_positions(m.shape[-1], bucket=50) for m in mels)
    together = SampledEncoder(encoder, 4)(torch.stack([sampled_mel(m, dense) for m in mels]))
    assert together.shape[:2] == (3, 1500)
    for m, row in zip(mels, together):
        alone = SampledEncoder(encoder, 4)(sampled_mel(m, dense)[None])[0]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)
    # more dense positions than the clip needs: still the full window at stride 1
    full = encoder(pad_mel(mels[0])[None])
    torch.testing.assert_close(
        SampledEncoder(encoder, 1)(sampled_mel(mels[0], dense)[None]), full, atol=1e-4, rtol=1e-4
    )


def test_dense_positions_round_up_to_their_bucket_and_stop_at_the_window():
    assert dense_positions(199) == 150 and dense_positions(199, bucket=50) == 150
    assert dense_positions(201, bucket=50) == 200 and dense_positions(2999, bucket=50) == 1500
    assert dense_positions(2999, bucket=7) == 1500


def test_padding_stride_option_takes_whole_numbers_from_one():
    assert stride_argument("1") == 1 and stride_argument("4") == 4
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            stride_argument(bad)


@pytest.mark.parametrize("given, expected", [([], "off"), (["--speculative", "both"], "both")])
def test_offline_commands_draft_nothing_on_the_cpu_unless_asked(tmp_path, given: list[str], expected: str):
    """eval and transcribe: offline segments have no previous hypothesis, and on the CPU the other
    drafts cost more than they save, so the CPU default is no drafts; an explicit choice stands."""
    from bench.tiny import save_tiny_model
    from breeze_stream.cli import build_parser
    from streaming.cli import engine_from_arguments

    model = save_tiny_model(tmp_path / "tiny.pt")
    args = build_parser().parse_args(["eval", "clips.jsonl", "--model", str(model), "--device", "cpu", *given])
    engine = engine_from_arguments(args)
    try:
        assert engine.speculative == expected
    finally:
        engine.close()


@torch.inference_mode()
def test_a_bounded_encoder_keeps_the_latest_layouts_and_encodes_the_same():
    """The CPU keeps a few dense counts' layouts (each clip length has its own count there): one
    made again after it went gives the same features."""
    encoder = tiny_model().encoder
    bounded, unbounded = SampledEncoder(encoder, 4, layouts=2), SampledEncoder(encoder, 4)
    mels = [sampled_mel(m, dense_positions(m.shape[-1])) for m in (clip_mel(_speech(s)) for s in (1.0, 1.5, 2.0, 1.0))]
    for mel in mels:
        assert torch.equal(bounded(mel[None]), unbounded(mel[None]))
    assert [dense for dense, _, _ in bounded._layouts] == [m.shape[-1] // 2 for m in mels[2:]]  # the last two
    assert len(unbounded._layouts) == 3
