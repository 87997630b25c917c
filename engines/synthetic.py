"""Random-weight Whisper models of real shapes: what capacity planning and benchmarks run on.

Breeze-ASR-25's weights cannot be fetched everywhere, but its cost can: speed does not depend on
the weights' values, only on the shape (Breeze-ASR-25 is Whisper large-v2's) and on how many
tokens each segment decodes. `random_engine` builds an Engine of a shape with random weights on
the device and the decoder rigged so that it behaves like a model that transcribes:

- Random weights never stop at a real end of speech, so `<|endoftext|>` is suppressed and every
  request decodes `ceil(tokens_per_second x seconds of audio)` tokens (`Engine.tokens_per_second`;
  5.43 tokens/s is the rate of the dev references, `bench.capacity --measure-rate`).
- The decoder's output depends on the position and the previous tokens only (cross-attention
  output projection scaled by 1e-4, the position embedding scaled up so that the argmax changes
  from one position to the next and never loops): a partial's tokens are then a prefix of the next
  decode's, as a real model's mostly are, so previous-hypothesis drafts are accepted.
- The vocabulary is synthetic: Whisper's special tokens at their ids, ordinary tokens that decode
  to two CJK characters each, so transcripts pass the hallucination filter like real Chinese text.

`breeze-stream serve --model random:large-v2` serves such an engine (labelled random everywhere),
`bench.capacity` and `bench.engine` time it. Nothing here is ever the default model.
"""

from __future__ import annotations

import torch

from engines.config import RANDOM_PREFIX
from engines.whisper.model import ModelDims, Whisper
from engines.whisper.tokenizer import LANGUAGES, byte_encoder

from .options import (
    TOKENS_PER_SECOND,  # Whisper tokens per second of speech, dev references (bench.capacity --measure-rate)
)

SHAPES = {
    # Breeze-ASR-25 is Whisper large-v2's shape
    "large-v2": ModelDims(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=1280,
        n_audio_head=20,
        n_audio_layer=32,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=1280,
        n_text_head=20,
        n_text_layer=32,
    ),
    "base": ModelDims(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=512,
        n_audio_head=8,
        n_audio_layer=6,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=512,
        n_text_head=8,
        n_text_layer=6,
    ),
    "tiny": ModelDims(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=384,
        n_audio_head=6,
        n_audio_layer=4,
        n_vocab=51865,
        n_text_ctx=448,
        n_text_state=384,
        n_text_head=6,
        n_text_layer=4,
    ),
}
SHAPES["breeze"] = SHAPES["large-v2"]
"""`--model random:SHAPE` names a random-weight model of SHAPE (a load test, never a transcriber)."""

# Whisper's multilingual suppress_tokens (the embedded model's config.json suppress_ids; a test
# checks them against it): the GPU box lacks the package that ships them.
WHISPER_SUPPRESS = [
    1,
    2,
    7,
    8,
    9,
    10,
    14,
    25,
    26,
    27,
    28,
    29,
    31,
    58,
    59,
    60,
    61,
    62,
    63,
    90,
    91,
    92,
    93,
    359,
    503,
    522,
    542,
    873,
    893,
    902,
    918,
    922,
    931,
    1350,
    1853,
    1982,
    2460,
    2627,
    3246,
    3253,
    3268,
    3536,
    3846,
    3961,
    4183,
    4667,
    6585,
    6647,
    7273,
    9061,
    9383,
    10428,
    10929,
    11938,
    12033,
    12331,
    12562,
    13793,
    14157,
    14635,
    15265,
    15618,
    16553,
    16604,
    18362,
    18956,
    20075,
    21675,
    22520,
    26130,
    26161,
    26435,
    28279,
    29464,
    31650,
    32302,
    32470,
    36865,
    42863,
    47425,
    49870,
    50254,
    50258,
    50358,
    50359,
    50360,
    50361,
    50362,
]
_CJK = 0x4E00  # first CJK unified ideograph; 20,000 of them from here are all assigned


def random_model(dims: ModelDims, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Whisper:
    """Whisper of `dims` with random weights, built on `device` (no host copy of 1.5 G parameters)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Whisper(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2]
            if module.endswith("_ln") or module in ("ln", "ln_post"):  # layer norms: identity
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02)
    return model.to(dtype).eval().fuse()  # as the engine runs it (fused self-attention projections)


def synthetic_vocabulary(n_vocab: int = 51865) -> list[str]:
    """A token list with Whisper's special tokens at their ids (multilingual 51865 vocabulary) and
    ordinary tokens of two CJK characters each, unique, in GPT-2's byte-level spelling. The GPU box
    lacks the package that ships the real vocabulary; tests check the special ids against it."""
    eot = 50257 if n_vocab >= 51865 else 50256
    specials = ["<|endoftext|>", "<|startoftranscript|>"] + [
        f"<|{lang}|>" for lang in LANGUAGES[: 99 if n_vocab == 51865 else 100]
    ]
    specials += [
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    spell = byte_encoder()
    vocab = ["".join(spell[b] for b in (chr(_CJK + i % 20000) + chr(_CJK + i // 20000)).encode()) for i in range(eot)]
    vocab += specials
    begin = len(vocab)
    vocab += ["<|%.2f|>" % ((i - begin) * 0.02) for i in range(begin, n_vocab)]
    return vocab[:n_vocab]


def rig_decoder(model: Whisper) -> None:
    """Makes the decoder's output depend on positions and previous tokens only (see module doc)."""
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 1.0)  # dominant: a different argmax at every position, no loops
        for block in model.decoder.layers:
            cross_attn, _ = block.cross_layers()
            cross_attn.out.weight.mul_(1e-4)
            cross_attn.out.bias.mul_(1e-4)


def random_checkpoint(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Checkpoint of random weights of `shape` (a key of SHAPES), rigged as the module doc says,
    its tensors on `device`: what `random_engine` serves and `train-medusa --model random:SHAPE`
    trains heads on (to time them, not to use them)."""
    from engines.weights.checkpoints import Checkpoint

    if shape not in SHAPES:
        raise ValueError(
            f"unknown model shape {shape!r} for {RANDOM_PREFIX}SHAPE; use one of {', '.join(sorted(SHAPES))}"
        )
    dims = SHAPES[shape]
    model = random_model(dims, device, dtype, seed)
    rig_decoder(model)
    vocabulary = synthetic_vocabulary(dims.n_vocab)
    eot = vocabulary.index("<|endoftext|>")
    return Checkpoint(
        name=f"{RANDOM_PREFIX}{shape} (random weights, load test)",
        dims=dims,
        state_dict=model.state_dict(),
        vocabulary=vocabulary,
        suppress_tokens=sorted(set(WHISPER_SUPPRESS) | {eot}),
        alignment_heads=None,
    )


def random_engine(
    shape: str,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tokens_per_second: float | None = TOKENS_PER_SECOND,
    **engine_options,
):
    """An Engine on random weights of `shape` (a key of SHAPES), rigged as the module doc says,
    decoding `tokens_per_second` tokens per second of audio (None: requests set their own
    `max_new_tokens`). `engine_options` go to Engine (max_batch, speculative, cuda_graphs, ...)."""
    from engines.engine import Engine, resolve_device

    dev = resolve_device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    checkpoint = random_checkpoint(shape, dev, dtype, seed)
    engine_options.setdefault("script", "as-is")
    with torch.device(dev):  # build the engine's copy on the device, not 1.5 G parameters on the host
        engine = Engine(checkpoint, device=str(dev), dtype=dtype, tokens_per_second=tokens_per_second, **engine_options)
    del checkpoint
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return engine
