"""The bucketed step of engines/gpu/cuda_graphs.py: the same tokens as the plain batch.

On the CPU the StepRunner runs its static-buffer step eagerly (padding rows, width, frame and
context buckets, prompts folded into the next step, the fused cross-attention projection): that
is everything a CUDA graph replays, so these tests check the graphed path's arithmetic and
bookkeeping. Graph capture itself needs a GPU; that test skips without one.
"""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.tiny import TINY_DIMS
from engines.batching import Batch, Decoder, Sequence
from engines.draft_tree import Tree
from engines.gpu.cuda_graphs import GraphOptions, bucket
from engines.gpu.encoder_graphs import GraphedEncoder
from engines.gpu.step_inputs import step_inputs, tree_visibility
from engines.speculative.drafts import HypothesisDrafter
from engines.synthetic import WHISPER_SUPPRESS, synthetic_vocabulary
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import Whisper
from engines.whisper.sampled import SampledEncoder, dense_positions, sampled_mel
from engines.whisper.tokenizer import Tokenizer

DIMS = replace(TINY_DIMS, n_text_layer=2)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = Whisper(DIMS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    # the synthetic vocabulary (special ids as the real one's, tests/test_bench_engine.py) runs where
    # the embedded model's package is absent too (a GPU box)
    return model.eval(), Tokenizer(synthetic_vocabulary()), WHISPER_SUPPRESS


def encode(model, batch, mel_frames, seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.encoder(torch.randn(batch, 80, mel_frames))


def test_bucket():
    assert bucket(1, (1, 2, 4)) == 1
    assert bucket(3, (1, 2, 4)) == 4
    assert bucket(5, (1, 2, 4)) == 5  # past the largest: a shape of its own


def test_step_inputs_mask_matches_tree_ancestry():
    trees = [Tree.build(7, None), Tree([1, 2, 3, 4], [-1, 0, 0, 1], [0, 1, 1, 2], "medusa")]
    tokens, positions, slots, mask = step_inputs(trees, [5, 446], 4, 448, 99)
    assert tokens.tolist() == [[7, 99, 99, 99], [1, 2, 3, 4]]
    assert slots.tolist() == [[5, 6, 7, 8], [446, 447, 447, 447]]  # clamped padding/tree slots
    assert positions[0].tolist() == [5, 6, 7, 8] and positions[1].tolist() == [446, 447, 447, 447]
    assert mask[0, 0, :5].all() and mask[0, 0, 5] and not mask[0, 0, 6:].any()
    assert mask[0, 2, 7] and not mask[0, 2, 5] and not mask[0, 2, 6]  # padding sees itself only
    sees = tree_visibility((-1, 0, 0, 1), 4)
    assert sees.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]


@torch.inference_mode()
def test_fused_cross_kv_matches_per_layer(parts):
    model, tok, suppress = parts
    feats = encode(model, 3, 300, 1)
    fused = Batch(model, tok, suppress, rows=4, graphs=GraphOptions(mode="eager"))
    plain = Batch(model, tok, suppress, rows=4, graphs=GraphOptions(mode="eager", fused_cross_kv=False))
    fused.runner.store_cross(feats, 1)
    plain.runner.store_cross(feats, 1)
    assert torch.allclose(fused.cross_k, plain.cross_k, atol=1e-5) and torch.allclose(
        fused.cross_v, plain.cross_v, atol=1e-5
    )
    assert fused.cross_k[:, 1:4, :, :150].abs().sum() > 0 and not fused.cross_k[:, 0].any()


def run_schedule(batch: Batch, tok: Tokenizer, groups, options, drafts=None):
    """Admits groups of (features, n) at the given steps; returns each sequence's result."""
    seqs_all, step, pending = [], 0, list(groups)
    while pending or batch.active:
        while pending and pending[0][0] <= step:
            _, feats = pending.pop(0)
            seqs = [
                Sequence(
                    tok.prompt("zh"),
                    "zh",
                    options,
                    [HypothesisDrafter(drafts[len(seqs_all) + i])] if drafts else [],
                    frames=feats.shape[1],
                )
                for i in range(feats.shape[0])
            ]
            seqs_all += seqs
            batch.admit(feats, seqs)
        batch.step()
        step += 1
    return [s.result(tok) for s in seqs_all]


@pytest.mark.parametrize("speculative", [False, True])
def test_bucketed_step_gives_the_plain_tokens(parts, speculative):
    """Staggered admission, mixed window lengths (masked cross frames), padding rows and widths."""
    model, tok, suppress = parts
    options = DecodingOptions(max_new_tokens=40)
    groups = [(0, encode(model, 2, 400, 2)), (3, encode(model, 3, 300, 3)), (5, encode(model, 1, 600, 4))]
    reference = [r for _, f in groups for r in Decoder(model, tok, suppress).decode(f, options)]
    drafts = None
    if speculative:  # the old hypothesis, with a wrong token in the middle: accepted, rejected, resynchronised
        drafts = [r.tokens[:5] + [11] + r.tokens[6:] for r in reference]
    plain = run_schedule(Batch(model, tok, suppress, rows=8), tok, groups, options, drafts)
    bucketed = run_schedule(
        Batch(model, tok, suppress, rows=8, graphs=GraphOptions(mode="eager")), tok, groups, options, drafts
    )
    assert [r.tokens for r in plain] == [r.tokens for r in reference]
    assert [r.tokens for r in bucketed] == [r.tokens for r in reference]
    assert [r.forwards for r in bucketed] == [r.forwards for r in plain]
    assert np.allclose([r.no_speech_prob for r in bucketed], [r.no_speech_prob for r in plain], atol=1e-5)
    assert np.allclose([r.avg_logprob for r in bucketed], [r.avg_logprob for r in plain], atol=1e-4)
    if speculative:
        assert sum(r.draft_accepted["hypothesis"] for r in bucketed) > 0
        assert [r.draft_accepted for r in bucketed] == [r.draft_accepted for r in plain]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU form of the row kernels needs Triton's interpreter (conftest sets it where there is no GPU)",
)
@pytest.mark.parametrize("beyond", ["plain", "attention kernel"])
def test_row_kernel_steps_give_the_plain_tokens(parts, beyond):
    """Buckets of at most 16 rows through the Triton row kernels (engines/gpu/decode_kernels.py; Triton's
    interpreter on the CPU), larger ones through the plain step or through the plain projections with
    the self-attention kernel (engines/gpu/decode_attention.py) and a padded vocabulary projection, as the
    GPU runs them: the same tokens and draft acceptance."""
    model, tok, suppress = parts
    fused = Whisper(DIMS).eval()
    fused.load_state_dict(model.state_dict())
    fused.fuse()
    options = DecodingOptions(max_new_tokens=30)
    groups = [(0, encode(model, 1, 400, 2)), (4, encode(model, 2, 300, 3))]
    reference = [r for _, f in groups for r in Decoder(model, tok, suppress).decode(f, options)]
    drafts = [r.tokens[:5] + [11] + r.tokens[6:] for r in reference]
    extra = {"attention_kernel": True, "vocab_multiple": 64} if beyond == "attention kernel" else {}
    batch = Batch(fused, tok, suppress, rows=4, graphs=GraphOptions(mode="eager", row_kernels=True, **extra))
    kernels = run_schedule(batch, tok, groups, options, drafts)
    plain = run_schedule(Batch(model, tok, suppress, rows=4), tok, groups, options, drafts)
    assert [r.tokens for r in kernels] == [r.tokens for r in reference]
    assert [r.draft_accepted for r in kernels] == [r.draft_accepted for r in plain]
    assert np.allclose([r.avg_logprob for r in kernels], [r.avg_logprob for r in plain], atol=1e-4)
    keys = batch.runner.stats.keys
    assert any(b * w <= 16 for b, w, *_ in keys) and any(b * w > 16 for b, w, *_ in keys)  # both paths ran
    assert (batch.runner.fused is not None) == bool(extra) and batch.runner.vocab_rows % (64 if extra else 1) == 0


@torch.inference_mode()
def test_runner_pads_to_buckets(parts):
    model, tok, suppress = parts
    batch = Batch(model, tok, suppress, rows=8, graphs=GraphOptions(mode="eager"))
    batch.admit(
        encode(model, 3, 200, 5),
        [Sequence(tok.prompt("zh"), "zh", DecodingOptions(max_new_tokens=5), [], frames=100) for _ in range(3)],
    )
    batch.step()
    assert batch.runner.stats.keys == {(4, 4, 256, 64, True)}  # 3 rows -> 4, prompt width 4, 100 frames of 256
    batch.step()
    assert (4, 1, 256, 64, True) in batch.runner.stats.keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@torch.inference_mode()
def test_graph_replay_equals_eager_step_on_gpu(parts):
    model, tok, suppress = parts
    model = Whisper(DIMS).cuda().half().eval()
    model.load_state_dict(parts[0].state_dict())
    model.fuse()
    results, runners = {}, {}
    # each graphed path against the same kernels run directly: the row kernels and cuBLAS round fp16
    # differently, so across paths a near-tie of a random model may pick another token (the paths'
    # agreement is checked in float32: test_row_kernel_steps_give_the_plain_tokens, test_decode_kernels.py)
    kernels = {"row_kernels": True}  # steps of up to 16 rows through them, the prompt step (8 x 4 rows) plain
    variants = {
        "plain eager": GraphOptions(mode="eager", row_kernels=False),
        "plain graph": GraphOptions(record_in_background=False, row_kernels=False),
        "kernels eager": GraphOptions(mode="eager", **kernels),
        "kernels graph": GraphOptions(record_in_background=False, **kernels),
        "background": GraphOptions(**kernels),
    }
    for name, options in variants.items():
        batch = Batch(model, tok, suppress, rows=8, graphs=options)
        feats = encode(parts[0], 5, 400, 6).cuda().half()
        results[name] = run_schedule(batch, tok, [(0, feats)], DecodingOptions(max_new_tokens=30))
        runners[name] = batch.runner
    tokens = {name: [r.tokens for r in rs] for name, rs in results.items()}
    assert tokens["plain graph"] == tokens["plain eager"]
    assert tokens["kernels graph"] == tokens["kernels eager"]
    assert tokens["background"] == tokens["kernels eager"]  # stand-in buckets and eager steps while recording
    assert runners["kernels graph"].stats.replays > 0 and runners["kernels graph"].kernels is not None
    runners["background"]._recorder.shutdown(wait=True)  # its recordings ran beside the steps
    stats = runners["background"].stats
    assert stats.captures > 0 and stats.eager + stats.stand_ins > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@torch.inference_mode()
def test_sampled_windows_replay_as_graphs_on_gpu(parts):
    """Finals' full windows with the padding sampled (engines/whisper/sampled.py) recorded once per
    (batch, dense count) and replayed: the eager call's features, for clips of several lengths."""
    model = Whisper(DIMS).cuda().half().eval()
    model.load_state_dict(parts[0].state_dict())
    sampled = SampledEncoder(model.encoder, 4)
    graphed = GraphedEncoder(sampled)
    torch.manual_seed(1)
    for clip_frames, rows in [(180, 1), (420, 3), (190, 2), (2990, 1)]:
        dense = dense_positions(clip_frames, bucket=50)
        mels = torch.randn(rows, DIMS.n_mels, clip_frames, device="cuda", dtype=torch.half)
        batch = torch.stack([sampled_mel(m, dense) for m in mels])
        torch.testing.assert_close(graphed(batch), sampled(batch), atol=2e-3, rtol=2e-3)
    assert graphed.stats.captures == 4 and graphed.stats.replays == 4
    again = torch.stack([sampled_mel(m, 150) for m in torch.randn(1, DIMS.n_mels, 150, device="cuda").half()])
    torch.testing.assert_close(graphed(again), sampled(again), atol=2e-3, rtol=2e-3)
    assert graphed.stats.captures == 4 and graphed.stats.replays == 5
