"""engines/gpu/fused.py: the compiled regions compute what the plain model computes.

Inductor only generates code on a GPU here, so the regions are traced and decomposed with the
"aot_eager" backend: that checks the wiring (which weights, which layer norm, the residuals, the
cache writes) exactly, in float32 on the CPU. The GPU speed is in BENCHMARKS.md."""

import os

import pytest
import torch
from decoder_check import run_against_plain
from torch._dynamo.utils import counters

from engines.gpu.fused import FusedDecoder, FusedEncoder
from engines.synthetic import random_model
from engines.whisper.model import ModelDims

DIMS = ModelDims(
    n_mels=80,
    n_audio_ctx=64,
    n_audio_state=64,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=500,
    n_text_ctx=32,
    n_text_state=64,
    n_text_head=4,
    n_text_layer=3,
)


@pytest.fixture(scope="module")
def model():
    m = random_model(DIMS, torch.device("cpu"), torch.float32, seed=3)
    with torch.no_grad():  # layer norms away from the identity, so a wrong one shows
        for name, p in m.named_parameters():
            p.normal_(1.0 if name.endswith("ln.weight") or "_ln.weight" in name else 0.0, 0.1)
    return m


def test_fused_encoder_matches_the_encoder(model):
    mel = torch.randn(2, DIMS.n_mels, 2 * DIMS.n_audio_ctx)
    with torch.inference_mode():
        torch.testing.assert_close(FusedEncoder(model.encoder, backend="aot_eager")(mel), model.encoder(mel))


def test_fused_encoder_compiles_each_shape_past_dynamos_recompile_limit(model):
    """One static compilation per (batch, frames), past the default limit of 8 (the engine's buckets
    and window lengths): none of them falls back to running uncompiled or goes shape-generic."""
    torch._dynamo.reset()
    counters.clear()
    fused = FusedEncoder(model.encoder, backend="eager")
    with torch.inference_mode():
        for batch in range(1, 11):
            mel = torch.randn(batch, DIMS.n_mels, 2 * DIMS.n_audio_ctx)
            torch.testing.assert_close(fused(mel), model.encoder(mel))
    assert counters["stats"]["unique_graphs"] == 10


@pytest.mark.parametrize("batch,width", [(1, 1), (3, 1), (2, 4)])
@pytest.mark.parametrize("attention_kernel", [False, True])
def test_fused_decoder_matches_hidden_and_writes_the_same_cache(model, batch, width, attention_kernel):
    """Compiled regions with PyTorch's self-attention, and with the Triton kernel (its interpreter here)."""
    if attention_kernel and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "this CPU model needs Triton's interpreter (a GPU machine: test_decode_attention runs the kernel there)"
        )
    fused = FusedDecoder(model.decoder, backend="aot_eager", attention_kernel=attention_kernel)
    got, expected, fused_cache, plain_cache = run_against_plain(model, fused.hidden, batch, width)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(fused_cache.k, plain_cache.k)
    torch.testing.assert_close(fused_cache.v, plain_cache.v)


def test_fused_regions_refuse_packed_weights(model):
    from engines.weights.fp16 import available, pack_fp16_weights

    if not available():
        pytest.skip("this PyTorch build has no fbgemm fp16 GEMM")
    packed = random_model(DIMS, torch.device("cpu"), torch.float32)
    pack_fp16_weights(packed)
    with pytest.raises(ValueError, match="plain fused"):
        FusedDecoder(packed.decoder, backend="aot_eager")
