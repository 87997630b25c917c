"""The CPU's decoder forward over fp16-packed weights (engines/weights/fp16.py), without the modules.

A decoder step at batch 1 on the 2-core CPU is ~10 ms, of which the packed matrix products (bound
by reading 97 MB of fp16 weights) take ~4.5 ms and attention ~2 ms; the rest is dispatch: module
calls, attribute look-ups, no-op dtype conversions, around a hundred small tensor operations per
layer. `PackedDecoder.hidden` is `TextDecoder.hidden` with each layer's tensors and packed
products held in tuples and called directly: the same operations on the same tensors in the same
order, so the same numbers (a test holds it to the modules' output bit for bit)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engines.whisper.model import KVCache, LayerNorm, TextDecoder

_linear = torch.ops.quantized.linear_dynamic_fp16.default  # the overload itself: no packet dispatch checks


def _norm(module: LayerNorm) -> tuple[Any, ...]:
    return (module.normalized_shape, module.weight, module.bias, module.eps)


def _packed(module: object) -> Any:
    packed = getattr(module, "_packed", None)
    assert packed is not None, "PackedDecoder needs every product of the decoder packed (engines/weights/fp16.py)"
    return packed


class PackedDecoder:
    """TextDecoder.hidden for a float32 decoder whose products are all PackedLinear (the CPU)."""

    def __init__(self, decoder: TextDecoder):
        self.n_head = decoder.layers[0].attn.n_head
        self.embedding = decoder.token_embedding.weight
        self.positions = decoder.positional_embedding
        self.ln = _norm(decoder.ln)
        self.layers = []
        for block in decoder.layers:
            cross, cross_ln = block.cross_layers()
            self.layers.append(
                (
                    _norm(block.attn_ln),
                    _packed(block.attn.fused),
                    _packed(block.attn.out),
                    _norm(cross_ln),
                    _packed(cross.query),
                    _packed(cross.out),
                    _norm(block.mlp_ln),
                    _packed(block.mlp[0]),
                    _packed(block.mlp[2]),
                )
            )

    def hidden(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        rows: Tensor | None,
        cross: list[tuple[Tensor, Tensor]],
        mask: Tensor,
        cross_mask: Tensor | None = None,
        slots: Tensor | None = None,
        nodes: Tensor | None = None,
    ) -> Tensor:
        """As TextDecoder.hidden (a callable cross mask, a GPU's, is not taken). With `nodes`, the
        products, norms and MLPs run on those nodes alone (rows of different draft widths: the
        padding of the narrower ones costs nothing) and only attention sees the padded rows."""
        x = (F.embedding(tokens, self.embedding) + self.positions[positions]).to(cache.dtype)
        slots = positions if slots is None else slots
        batch, width, state = x.shape

        def packed(t: Tensor) -> Tensor:  # [B, W, C] -> the nodes' [N, C]
            return t if nodes is None else t.reshape(batch * width, -1)[nodes]

        def padded(t: Tensor) -> Tensor:  # the nodes' [N, C] -> [B, W, C], zeros at the padding
            if nodes is None:
                return t
            out = t.new_zeros(batch * width, t.shape[-1])
            out[nodes] = t
            return out.view(batch, width, -1)

        x = packed(x)
        heads, head_dim = self.n_head, state // self.n_head
        index = (torch.arange(batch) if rows is None else rows)[:, None]
        n_keys = mask.shape[-1]
        sdpa = F.scaled_dot_product_attention
        for layer, (attn_ln, qkv, out, cross_ln, query, cross_out, mlp_ln, fc1, fc2) in enumerate(self.layers):
            q, k, v = padded(_linear(F.layer_norm(x, *attn_ln), qkv)).chunk(3, dim=-1)
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            k_cache[index, :, slots] = k.view(batch, width, heads, head_dim)
            v_cache[index, :, slots] = v.view(batch, width, heads, head_dim)
            if rows is None:
                keys, values = k_cache[:batch, :, :n_keys], v_cache[:batch, :, :n_keys]
            else:
                keys, values = k_cache[rows, :, :n_keys], v_cache[rows, :, :n_keys]
            q = q.view(batch, width, heads, head_dim).transpose(1, 2)
            a = sdpa(q, keys, values, attn_mask=mask).transpose(1, 2).reshape(batch, width, state)
            x = x + _linear(packed(a), out)
            q = padded(_linear(F.layer_norm(x, *cross_ln), query)).view(batch, width, heads, head_dim).transpose(1, 2)
            c = sdpa(q, *cross[layer], attn_mask=cross_mask).transpose(1, 2).reshape(batch, width, state)
            x = x + _linear(packed(c), cross_out)
            x = x + _linear(F.gelu(_linear(F.layer_norm(x, *mlp_ln), fc1)), fc2)
        return F.layer_norm(x, *self.ln)
