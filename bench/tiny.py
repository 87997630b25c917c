"""The tiny rigged Whisper that tests and benchmarks serve: one layer each side, width 64, the real
vocabulary, and whatever the audio it answers TINY_TEXT in two decoder forwards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from engines.weights.checkpoints import default_vocabulary
from engines.whisper.model import ModelDims, Whisper
from engines.whisper.tokenizer import Tokenizer

TINY_DIMS = ModelDims(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=64,
    n_text_head=2,
    n_text_layer=1,
)
TINY_TEXT = "好"
"""What the tiny model says for any audio."""


def tiny_model() -> Whisper:
    """Random weights of a tiny Whisper for the real vocabulary, rigged to answer TINY_TEXT.

    A purely random decoder writes up to the 224-token cap or loops, which makes tests slow and
    their finals depend on the hallucination filter. Here the decoder's final layer norm outputs
    a constant vector v, and only two output embeddings point along v: <|endoftext|> strongly,
    TINY_TEXT's token less. So every decode is TINY_TEXT then <|endoftext|> (<|endoftext|> is
    suppressed first), in two decoder forwards, with a low no-speech probability.
    """
    torch.manual_seed(0)
    model = Whisper(TINY_DIMS)
    vocabulary = default_vocabulary()
    eot = vocabulary.index("<|endoftext|>")
    token = vocabulary.index(TINY_TEXT.encode().decode("latin-1"))  # its UTF-8 bytes are all printable in GPT-2's map
    assert Tokenizer(vocabulary).decode([token]) == TINY_TEXT
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        v = torch.nn.functional.normalize(torch.randn(TINY_DIMS.n_text_state), dim=0)
        model.decoder.ln.weight.zero_()
        model.decoder.ln.bias.copy_(v)
        model.decoder.token_embedding.weight[eot] = 30 * v
        model.decoder.token_embedding.weight[token] = 20 * v
    return model


def save_tiny_model(path: Path) -> Path:
    """tiny_model() as an OpenAI-format .pt, which `breeze-stream serve --model PATH` loads."""
    state = {name: tensor.clone() for name, tensor in tiny_model().state_dict().items()}
    torch.save({"dims": asdict(TINY_DIMS), "model_state_dict": state}, path)
    return path
