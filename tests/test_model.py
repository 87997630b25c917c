"""The PyTorch Whisper against transformers' implementation on the same tiny random weights."""

import numpy as np
import pytest
import torch

from engines.weights.checkpoints import hf_dims, hf_to_openai
from engines.whisper.audio import clip_mel, pad_mel, waveform_padded_mel
from engines.whisper.model import Whisper, causal_mask

transformers = pytest.importorskip("transformers")


def tiny_hf_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_source_positions=1500,
        max_target_positions=448,
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # layer norms start at 1/0: randomise them so a mapping mix-up shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def ours_from_hf(hf) -> Whisper:
    dims = hf_dims(hf.config.to_dict())
    model = Whisper(dims)
    model.load_state_dict(hf_to_openai(hf.state_dict()))
    return model.eval()


def test_features_match_transformers_on_30s_of_audio():
    audio = np.random.default_rng(1).standard_normal(480000).astype(np.float32) * 0.1
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    theirs = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    ours = waveform_padded_mel(audio).numpy()
    assert ours.shape == (80, 3000)
    assert np.abs(ours - theirs).max() < 1e-4


def test_clip_mel_pads_normalised_domain_with_zeros():
    audio = np.random.default_rng(2).standard_normal(16000 * 3 + 37).astype(np.float32) * 0.1
    mel = clip_mel(audio)
    assert mel.shape == (80, len(audio) // 160)
    padded = pad_mel(mel)
    assert padded.shape == (80, 3000)
    assert torch.equal(padded[:, : mel.shape[1]], mel) and not padded[:, mel.shape[1] :].any()


@torch.inference_mode()
def test_logits_match_transformers_fp32():
    hf = tiny_hf_model()
    ours = ours_from_hf(hf)
    mel = torch.randn(2, 80, 3000)
    tokens = torch.tensor([[50258, 50260, 50359, 50363, 1000, 2000, 3000], [50258, 50259, 50359, 50363, 7, 8, 9]])
    theirs = hf(input_features=mel, decoder_input_ids=tokens).logits

    features = ours.encoder(mel)
    cross = ours.decoder.cross_kv(features)
    cache = ours.new_cache(2)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = ours.decoder.logits(
        ours.decoder.hidden(tokens, positions, cache, None, cross, causal_mask(positions, 448))
    )
    assert (logits - theirs).abs().max() < 1e-4

    # the same logits one token at a time through the static cache
    cache = ours.new_cache(2)
    for t in range(tokens.shape[1]):
        pos = torch.full((2, 1), t)
        step = ours.decoder.logits(
            ours.decoder.hidden(tokens[:, t : t + 1], pos, cache, None, cross, causal_mask(pos, 448))
        )
        assert (step[:, 0] - theirs[:, t]).abs().max() < 1e-4


@torch.inference_mode()
def test_cache_rows_let_sequences_sit_at_different_lengths():
    ours = ours_from_hf(tiny_hf_model(3))
    cross = ours.decoder.cross_kv(ours.encoder(torch.randn(3, 80, 3000)))
    tokens = torch.randint(0, 50000, (3, 6))
    full = ours.decoder.logits(
        ours.decoder.hidden(
            tokens,
            torch.arange(6).expand(3, 6),
            ours.new_cache(3),
            None,
            cross,
            causal_mask(torch.arange(6).expand(3, 6), 448),
        )
    )
    # row 1 alone, written into row 2 of a larger cache, fed in two chunks
    cache = ours.new_cache(4)
    rows = torch.tensor([2])
    sub = [(k[1:2], v[1:2]) for k, v in cross]
    for chunk in (slice(0, 4), slice(4, 6)):
        pos = torch.arange(6)[chunk][None]
        out = ours.decoder.logits(ours.decoder.hidden(tokens[1:2, chunk], pos, cache, rows, sub, causal_mask(pos, 448)))
    assert (out[0] - full[1, 4:6]).abs().max() < 1e-4


@torch.inference_mode()
def test_fused_qkv_keeps_outputs_and_parameter_names():
    ours = ours_from_hf(tiny_hf_model(4))
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258, 50260, 50359, 50363, 11, 12]])
    positions = torch.arange(6)[None]

    def run(model):
        cross = model.decoder.cross_kv(model.encoder(mel))
        return model.decoder.logits(
            model.decoder.hidden(tokens, positions, model.new_cache(1), None, cross, causal_mask(positions, 448))
        )

    names = set(ours.state_dict())
    before = run(ours)
    ours.fuse()
    assert set(ours.state_dict()) == names
    assert (run(ours) - before).abs().max() < 1e-4
