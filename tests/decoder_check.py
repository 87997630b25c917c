"""The check shared by tests/test_fused.py and tests/test_decode_kernels.py: a replacement for
TextDecoder.hidden run against the plain one on the same inputs and the same earlier cache."""

from __future__ import annotations

import torch

from engines.whisper.model import Whisper, causal_mask


def run_against_plain(model: Whisper, hidden, batch: int, width: int):
    """(got, expected, its cache, the plain cache) of one step of `width` tokens per row at
    positions 5.., rows attending to different numbers of audio frames."""
    dims = model.dims
    with torch.inference_mode():
        features = model.encoder(torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx))
        cross = model.decoder.cross_kv(features)
        plain_cache, cache = model.new_cache(batch), model.new_cache(batch)
        for c in (plain_cache, cache):  # the same earlier keys/values
            torch.manual_seed(1)
            c.k.normal_()
            c.v.normal_()
        tokens = torch.randint(0, dims.n_vocab, (batch, width))
        positions = torch.arange(width)[None].repeat(batch, 1) + 5
        mask = causal_mask(positions, dims.n_text_ctx)
        cross_mask = torch.arange(dims.n_audio_ctx)[None, None, None, :] < 40 + torch.arange(batch)[:, None, None, None]
        expected = model.decoder.hidden(tokens, positions, plain_cache, None, cross, mask, cross_mask)
        got = hidden(tokens, positions, cache, cross, mask, cross_mask, positions)
    return got, expected, cache, plain_cache
