"""Decoder layers and encoder blocks with their pointwise work fused by Inductor, region by region.

A graphed Breeze decoder step at batch 1 is bound by its number of kernels (about 25 per layer,
each a few microseconds), not by the bytes it reads. Compiling the whole step does not work:
Inductor functionalises the scatter into the KV-cache pools and copies the pools at every step
(BENCHMARKS.md, call F: 20x slower). So only what lies between the attention calls is compiled:
layer norms, projections, biases, GELU and residual adds, as three functions that every layer
shares (the weights are arguments, so one compiled graph serves all 32 layers; the rows are
flattened to [N, D], so after the first recompilation one graph serves every batch and width).
The KV-cache scatter and the attention kernels run as they are, and the CUDA graph of a step
(engines/gpu/cuda_graphs.py) records both kinds. The encoder block, which has no cache, is compiled
whole (its attention becomes Inductor's call to the same SDPA kernel).

`backend` is torch.compile's: "inductor" on a GPU; tests run the same regions on the CPU with
"aot_eager" (traced and decomposed, not code-generated), which checks the wiring in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engines.gpu import decode_attention
from engines.gpu.decode_attention import MAX_WIDTH
from engines.whisper.model import AudioEncoder, KVCache, LayerNorm, ResidualAttentionBlock, TextDecoder, attention


def _norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def norm_linear(x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, w: Tensor, b: Tensor) -> Tensor:
    """linear(LN(x)): the first layer's query/key/value projection."""
    return F.linear(_norm(x, ln_w, ln_b, eps), w, b)


def out_norm_linear(
    x: Tensor, a: Tensor, o_w: Tensor, o_b: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, w: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """x + out(a), then the next attention's projection of its layer norm."""
    x = x + F.linear(a, o_w, o_b)
    return x, F.linear(_norm(x, ln_w, ln_b, eps), w, b)


def out_mlp_norm(
    x: Tensor,
    a: Tensor,
    o_w: Tensor,
    o_b: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    eps: float,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
    next_ln_w: Tensor,
    next_ln_b: Tensor,
    next_eps: float,
    next_w: Tensor | None,
    next_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x + out(a), the MLP and its residual, then the next layer's projection of its layer norm
    (after the last layer: the decoder's final layer norm alone)."""
    x = x + F.linear(a, o_w, o_b)
    x = x + F.linear(F.gelu(F.linear(_norm(x, ln_w, ln_b, eps), fc1_w, fc1_b)), fc2_w, fc2_b)
    h = _norm(x, next_ln_w, next_ln_b, next_eps)
    return x, h if next_w is None else F.linear(h, next_w, next_b)


def encoder_block(
    x: Tensor,
    n_head: int,
    ln1_w: Tensor,
    ln1_b: Tensor,
    eps1: float,
    qkv_w: Tensor,
    qkv_b: Tensor,
    o_w: Tensor,
    o_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    eps2: float,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
) -> Tensor:
    """One encoder block (ResidualAttentionBlock.forward) as a single compiled region.

    fc1's bias and GELU run in the matrix product's epilogue (cuBLASLt), which saves a pass over
    its [B, T, 4D] output: about 5% of a batch-32 window on an H100. On CUDA that epilogue computes
    GELU's tanh form, at most 4.7e-4 from the exact one (whisper-base's dev transcripts with it: 23
    of 24 identical, CER 13.9% against 14.0%; BENCHMARKS.md, seventh session)."""
    batch, frames, width = x.shape
    qkv = F.linear(_norm(x, ln1_w, ln1_b, eps1), qkv_w, qkv_b).view(batch, frames, 3, n_head, -1).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + F.linear(a.transpose(1, 2).reshape(batch, frames, width), o_w, o_b)
    g = torch._addmm_activation(fc1_b, _norm(x, ln2_w, ln2_b, eps2).flatten(0, 1), fc1_w.t(), use_gelu=True)
    return x + F.linear(g, fc2_w, fc2_b).view_as(x)


def _ln(ln: LayerNorm) -> tuple[Tensor, Tensor, float]:
    return ln.weight, ln.bias, ln.eps


def _weights(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    assert isinstance(linear, nn.Linear), f"expected a linear layer, got {linear}"
    return linear.weight, linear.bias


def _qkv(block: ResidualAttentionBlock) -> tuple[Tensor, Tensor]:
    fused = block.attn.fused
    if not isinstance(fused, tuple):
        raise ValueError(
            "fused regions need the model's plain fused query/key/value weights (Whisper.fuse(), no packed CPU weights)"
        )
    return fused


def _compile(fn, backend: str | None, **options):
    return fn if backend is None else torch.compile(fn, backend=backend, fullgraph=True, **options)


class FusedDecoder:
    """TextDecoder.hidden with the regions between attention calls compiled (see the module doc);
    backend None runs them as they are, which the graphed step uses for the attention kernel alone.

    Same arguments and result as TextDecoder.hidden for rows 0..B-1 (rows=None)."""

    def __init__(self, decoder: TextDecoder, backend: str | None = "inductor", attention_kernel: bool = False):
        self.decoder = decoder
        self.attention_kernel = (
            attention_kernel  # self-attention and its cache writes in one Triton kernel (decode_attention.py)
        )
        self.norm_linear = _compile(norm_linear, backend)
        self.out_norm_linear = _compile(out_norm_linear, backend)
        self.out_mlp_norm = _compile(out_mlp_norm, backend)
        blocks = decoder.layers
        self.first = (*_ln(blocks[0].attn_ln), *_qkv(blocks[0]))
        cross = [b.cross_layers() for b in blocks]  # (attention, its layer norm)
        self.middle = [(*_weights(b.attn.out), *_ln(ln), *_weights(attn.query)) for b, (attn, ln) in zip(blocks, cross)]
        self.tail = []
        for b, (attn, _), after in zip(blocks, cross, [*blocks[1:], None]):
            following = (*_ln(after.attn_ln), *_qkv(after)) if after is not None else (*_ln(decoder.ln), None, None)
            self.tail.append(
                (*_weights(attn.out), *_ln(b.mlp_ln), *_weights(b.mlp[0]), *_weights(b.mlp[2]), *following)
            )

    def hidden(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        cross: list[tuple[Tensor, Tensor]],
        mask: Tensor,
        cross_mask,
        slots: Tensor,
    ) -> Tensor:
        decoder = self.decoder
        batch, width = tokens.shape
        x = decoder.embed(tokens, positions, cache.dtype)
        dim = x.shape[-1]
        x = x.reshape(batch * width, dim)
        h = self.norm_linear(x, *self.first)
        attend_self = (
            decode_attention.self_attention if self.attention_kernel and width <= MAX_WIDTH else sdpa_self_attention
        )
        for layer, block in enumerate(decoder.layers):
            a = attend_self(h, cache.k[layer], cache.v[layer], slots, mask)
            x, h = self.out_norm_linear(x, a, *self.middle[layer])
            heads = block.attn.n_head
            a = attention(h.view(batch, width, heads, -1).transpose(1, 2), *cross[layer], cross_mask)
            x, h = self.out_mlp_norm(x, a.transpose(1, 2).reshape(batch * width, dim), *self.tail[layer])
        return h.view(batch, width, dim)


def sdpa_self_attention(h: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
    """PyTorch's form of decode_attention.self_attention: the rows' keys and values scattered into
    the cache, then SDPA over its first n_keys slots; rows [B*W, D] out."""
    batch, width = slots.shape
    heads = k_cache.shape[1]
    q, k, v = h.view(batch, width, 3, heads, -1).unbind(2)  # each [B, W, H, Dh]
    rows = torch.arange(batch, device=h.device)[:, None]
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
    n_keys = mask.shape[-1]
    a = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:batch, :, :n_keys], v_cache[:batch, :, :n_keys], attn_mask=mask
    )
    return a.transpose(1, 2).reshape(batch * width, heads * k.shape[-1])


class FusedEncoder(nn.Module):
    """AudioEncoder.forward with every block one compiled region (the same graph for all blocks).

    static: one compilation per input shape (batch, frames), as GraphedEncoder records one graph per
    shape anyway. Left to itself, torch.compile turns to shape-generic kernels at the second shape
    it sees, which cost 3-4% of a batch-32 window on an H100 (BENCHMARKS.md, eighth session)."""

    def __init__(self, encoder: AudioEncoder, backend: str = "inductor", static: bool = True):
        super().__init__()
        self.encoder = encoder
        self.block = _compile(encoder_block, backend, **({"dynamic": False} if static else {}))
        self.weights = [
            (
                b.attn.n_head,
                *_ln(b.attn_ln),
                *_qkv(b),
                *_weights(b.attn.out),
                *_ln(b.mlp_ln),
                *_weights(b.mlp[0]),
                *_weights(b.mlp[2]),
            )
            for b in encoder.layers
        ]

    def forward(self, mel: Tensor) -> Tensor:
        e = self.encoder
        x = F.gelu(e.conv1(mel))
        x = F.gelu(e.conv2(x)).permute(0, 2, 1)
        x = (x + e.positional_embedding[: x.shape[1]]).to(x.dtype)
        # a compilation per shape: GraphedEncoder keeps up to 64 (batch buckets x window lengths)
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            for weights in self.weights:
                x = self.block(x, *weights)
        return e.ln_post(x)
