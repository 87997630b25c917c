"""The parameters of openai's Whisper for given dimensions: what every loaded checkpoint is checked against."""

from __future__ import annotations

import torch

from engines.whisper.model import ModelDims


def expected_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every parameter of openai's Whisper(dims), with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def add(prefix: str, n: int, out: int | None = None, bias: bool = True) -> None:
        shapes[prefix + ".weight"] = (out or n, n)
        if bias:
            shapes[prefix + ".bias"] = (out or n,)

    def ln(prefix: str, n: int) -> None:
        shapes[prefix + ".weight"] = shapes[prefix + ".bias"] = (n,)

    def block(prefix: str, n: int, cross: bool) -> None:
        for attn in ("attn", "cross_attn") if cross else ("attn",):
            add(f"{prefix}.{attn}.query", n)
            add(f"{prefix}.{attn}.key", n, bias=False)
            add(f"{prefix}.{attn}.value", n)
            add(f"{prefix}.{attn}.out", n)
            ln(f"{prefix}.{attn}_ln", n)
        shapes[f"{prefix}.mlp.0.weight"], shapes[f"{prefix}.mlp.0.bias"] = (4 * n, n), (4 * n,)
        shapes[f"{prefix}.mlp.2.weight"], shapes[f"{prefix}.mlp.2.bias"] = (n, 4 * n), (n,)
        ln(f"{prefix}.mlp_ln", n)

    a, t = dims.n_audio_state, dims.n_text_state
    shapes["encoder.conv1.weight"], shapes["encoder.conv1.bias"] = (a, dims.n_mels, 3), (a,)
    shapes["encoder.conv2.weight"], shapes["encoder.conv2.bias"] = (a, a, 3), (a,)
    shapes["encoder.positional_embedding"] = (dims.n_audio_ctx, a)
    for i in range(dims.n_audio_layer):
        block(f"encoder.blocks.{i}", a, cross=False)
    ln("encoder.ln_post", a)
    shapes["decoder.token_embedding.weight"] = (dims.n_vocab, t)
    shapes["decoder.positional_embedding"] = (dims.n_text_ctx, t)
    for i in range(dims.n_text_layer):
        block(f"decoder.blocks.{i}", t, cross=True)
    ln("decoder.ln", t)
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], dims: ModelDims, source: str) -> None:
    """Fail at load time, naming the file, rather than deep inside load_state_dict or a forward."""
    shapes = expected_shapes(dims)
    missing = sorted(shapes.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - shapes.keys())
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {shapes[k]}"
        for k in shapes.keys() & state_dict.keys()
        if tuple(state_dict[k].shape) != shapes[k]
    ]
    if missing or unexpected or wrong:
        problems = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"wrong shapes {wrong[:5]}" if wrong else "",
        ]
        raise ValueError(f"{source}: weights do not match Whisper {dims}: " + "; ".join(p for p in problems if p))
