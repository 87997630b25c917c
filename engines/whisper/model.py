"""A lean Whisper in PyTorch: encoder, and a decoder with a static self-attention KV cache.

Parameter names are openai/whisper's, so an OpenAI-format checkpoint loads as it is and every
other format is mapped onto these names (engines/weights/checkpoints.py). The decoder never grows
tensors: each sequence owns fixed cache rows of `n_text_ctx` positions, new keys/values are
scattered in at their positions, and the caller's mask says which positions a query may see.
That one mechanism serves plain greedy steps, beam search (rows reordered), speculative
verification of a draft chain or tree (several positions at once, rejected ones simply
overwritten later) and batching of sequences at different lengths.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


class LayerNorm(nn.LayerNorm):
    """Normalises in float32 whatever the model's dtype: fp16 statistics lose too much."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype and (x.dtype == torch.float32 or x.is_cuda):
            # one kernel: CUDA's layer norm keeps fp16/bf16 statistics in float32 itself
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).type(
            x.dtype
        )


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv1d(nn.Conv1d):
    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out: Tensor = super()._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return out


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed encoder position table (checkpoints store it too; this fills a fresh model)."""
    log_timescale_increment = torch.log(torch.tensor(max_timescale)) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


Mask = Tensor | Callable[[Tensor, Tensor, Tensor], Tensor] | None
"""What a query may see: None (everything), a mask for SDPA, or an attention that masks itself."""


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
    """SDPA over [B, H, T, D] heads. `mask`: None, a mask for SDPA, or a callable attention
    (q, k, v) -> out that applies its own masking (engines/gpu/cross_attention.py KeyLengths: per-row key counts)."""
    if mask is not None and not isinstance(mask, Tensor):
        return mask(q, k, v)
    out: Tensor = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)
        self.fused: tuple[Tensor, Tensor] | nn.Module | None = None  # engines/weights/fp16.py makes it a module

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Query, key and value in one matrix product (the key's missing bias is zeros): one
        larger product instead of three small ones, which a decoder step at batch 1 feels. The
        three weights become views into the fused matrix, so memory and parameter names stay."""
        n = self.query.weight.shape[0]
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, torch.zeros_like(self.query.bias), self.value.bias])
        for i, linear in enumerate((self.query, self.key, self.value)):
            linear.weight = nn.Parameter(weight[i * n : (i + 1) * n], requires_grad=False)
        self.query.bias = nn.Parameter(bias[:n], requires_grad=False)
        self.value.bias = nn.Parameter(bias[2 * n :], requires_grad=False)
        self.fused = (weight, bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value of `x`, split into heads."""
        if self.fused is None:
            return self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        if isinstance(self.fused, nn.Module):
            qkv: Tensor = self.fused(x)
        else:
            weight, bias = self.fused
            qkv = F.linear(x, weight.to(x.dtype), bias.to(x.dtype))
        q, k, v = qkv.chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, -1).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask) -> Tensor:
        heads = attention(q, k, v, mask)
        b, h, t, d = heads.shape
        out: Tensor = self.out(heads.transpose(1, 2).reshape(b, t, h * d))
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Full self-attention without a cache (the encoder); `mask`: an additive bias on the
        scores (engines/whisper/sampled.py weights sampled keys with it)."""
        return self.attend(*self.qkv(x), mask)

    def cross_kv(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.key(xa)), self.split_heads(self.value(xa))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_ln(x), mask)
        out: Tensor = x + self.mlp(self.mlp_ln(x))
        return out

    def cross_layers(self) -> tuple[MultiHeadAttention, LayerNorm]:
        """The cross-attention and its layer norm (decoder blocks only)."""
        assert self.cross_attn is not None and self.cross_attn_ln is not None, "an encoder block has no cross-attention"
        return self.cross_attn, self.cross_attn_ln

    def decode(
        self,
        x: Tensor,
        cache: tuple[Tensor, Tensor],
        rows: Tensor | None,
        cross: tuple[Tensor, Tensor],
        slots: Tensor,
        mask: Tensor,
        cross_mask: Mask,
        index: Tensor,
    ) -> Tensor:
        """One decoder layer over new tokens: their keys/values go into cache slots `slots` [B, T]
        of the cache rows `rows` (None: rows 0..B-1) of `cache` ([rows, H, n_ctx, D] each), and each
        query attends to what `mask` [B, 1, T, K] allows among the first K slots (K <= n_ctx; a
        graphed step passes K < n_ctx when no sequence reaches further, to read fewer keys). `index`
        [B, 1] is the rows as a tensor, made once per step rather than in every layer."""
        attn = self.attn
        q, k, v = attn.qkv(self.attn_ln(x))
        k_cache, v_cache = cache
        batch = x.shape[0]
        k_cache[index, :, slots] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[index, :, slots] = v.transpose(1, 2).to(v_cache.dtype)
        n_keys = mask.shape[-1]  # the cache slots a query may see: a mask narrower than n_ctx reads fewer keys
        if rows is None:
            keys, values = k_cache[:batch, :, :n_keys], v_cache[:batch, :, :n_keys]
        else:
            keys, values = k_cache[rows, :, :n_keys], v_cache[rows, :, :n_keys]
        x = x + attn.attend(q, keys.to(q.dtype), values.to(q.dtype), mask)
        cross_attn, cross_ln = self.cross_layers()
        x = x + cross_attn.attend(cross_attn.split_heads(cross_attn.query(cross_ln(x))), *cross, cross_mask)
        out: Tensor = x + self.mlp(self.mlp_ln(x))
        return out


class AudioEncoder(nn.Module):
    positional_embedding: Tensor  # a buffer

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = LayerNorm(n_state)

    @property
    def layers(self) -> list[ResidualAttentionBlock]:
        """The blocks, typed (a ModuleList yields plain Modules)."""
        return cast(list[ResidualAttentionBlock], list(self.blocks))

    def forward(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, 2 * n] -> features [B, n, n_state]; n may be shorter than n_ctx
        (a shortened window), the positions used are the first n."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.ln_post(x)
        return out


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)
        )
        self.ln = LayerNorm(n_state)
        self.output: nn.Module | None = None  # the vocabulary projection, when packed (engines/weights/fp16.py)
        # `hidden` without the modules, when every product is packed (engines/weights/packed_step.py)
        self.packed_hidden: Callable[..., Tensor] | None = None

    @property
    def layers(self) -> list[ResidualAttentionBlock]:
        """The blocks, typed (a ModuleList yields plain Modules)."""
        return cast(list[ResidualAttentionBlock], list(self.blocks))

    def cross_kv(self, features: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every layer: computed once per segment."""
        return [block.cross_layers()[0].cross_kv(features) for block in self.layers]

    def embed(self, tokens: Tensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """Token plus positional embeddings [B, T, n_state] in the cache's dtype."""
        embedded: Tensor = self.token_embedding(tokens)
        return (embedded + self.positional_embedding[positions]).to(dtype)

    def hidden(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        rows: Tensor | None,
        cross: list[tuple[Tensor, Tensor]],
        mask: Tensor,
        cross_mask: Mask = None,
        slots: Tensor | None = None,
        nodes: Tensor | None = None,
    ) -> Tensor:
        """Last hidden states [B, T, n_state] of `tokens` [B, T] at `positions` [B, T]; with
        `nodes` (indices into the B * T tokens: rows padded to the widest), those nodes' [N, n_state].

        `rows` picks the cache rows of these sequences (None: rows 0..B-1). Keys/values go to
        cache slot = position unless `slots` says otherwise: the nodes of a draft tree share
        positions but each needs a slot of its own."""
        if self.packed_hidden is not None and not callable(cross_mask):
            return self.packed_hidden(tokens, positions, cache, rows, cross, mask, cross_mask, slots, nodes)
        x = self.embed(tokens, positions, cache.dtype)
        slots = positions if slots is None else slots
        index = (torch.arange(x.shape[0], device=x.device) if rows is None else rows)[:, None]
        for layer, block in enumerate(self.layers):
            x = block.decode(x, (cache.k[layer], cache.v[layer]), rows, cross[layer], slots, mask, cross_mask, index)
        out: Tensor = self.ln(x)
        return out if nodes is None else out.flatten(0, 1)[nodes]

    def logits(self, hidden: Tensor) -> Tensor:
        if self.output is not None:
            projected: Tensor = self.output(hidden)
            return projected.float()
        return (hidden @ self.token_embedding.weight.to(hidden.dtype).T).float()


class KVCache:
    """Preallocated self-attention keys/values: [layers, rows, heads, n_ctx, head_dim] (a list of
    each layer's [rows, heads, n_ctx, head_dim] where the running batch grows them, engines/batching.py).

    Rows are sequences (segments or beams). Nothing is ever appended: a step scatters its keys and
    values at its positions, so rolling back a rejected draft is free (the mask hides it until
    it is overwritten)."""

    def __init__(
        self, dims: ModelDims, rows: int, dtype: torch.dtype, device: torch.device | str, slots: int | None = None
    ):
        """`slots`: positions per row (None: the decoder's context; fewer where the pools grow, engines/batching.py)."""
        slots = dims.n_text_ctx if slots is None else slots
        shape = (dims.n_text_layer, rows, dims.n_text_head, slots, dims.n_text_state // dims.n_text_head)
        self.k: Tensor | list[Tensor] = torch.zeros(shape, dtype=dtype, device=device)
        self.v: Tensor | list[Tensor] = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype = dtype

    def move(self, row: int, source_slots: list[int], target_slots: list[int]) -> None:
        """Copies keys/values between slots of one row (an accepted tree path to its positions)."""
        device = self.k[0].device
        src, dst = torch.tensor(source_slots, device=device), torch.tensor(target_slots, device=device)
        for layer in (*self.k, *self.v):
            layer[row, :, dst] = layer[row, :, src]

    def reorder(self, source_rows: Tensor) -> None:
        """Beam search: row i takes the contents of row source_rows[i]."""
        for layer in (*self.k, *self.v):
            layer[: len(source_rows)] = layer[source_rows]


def grown(pool: Tensor, rows: int, width: int, step: int, cap: int) -> Tensor:
    """One layer's `pool` [rows, heads, width, head_dim] with at least `rows` rows and `width`
    positions: itself where it holds them, else a copy in a larger pool (its width rounded up to
    `step`, at most `cap`; zeros beyond the copy)."""
    have_rows, heads, have_width, head_dim = pool.shape
    if rows <= have_rows and width <= have_width:
        return pool
    width = max(have_width, min(cap, -(-width // step) * step))
    out = _zeros(pool, (max(rows, have_rows), heads, width, head_dim))
    out[:have_rows, :, :have_width] = pool
    return out


def _zeros(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zeros like `like` in `shape`; on the CPU in pages of their own (an anonymous memory map),
    which go back to the system when the tensor goes: from glibc's heap, a pool outgrown or
    released left a hole that the next activations filled, and the process kept growing."""
    count = math.prod(shape)
    if like.device.type != "cpu" or count == 0:  # (a map cannot be empty)
        return like.new_zeros(shape)
    pages = mmap.mmap(-1, count * like.element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shared
    return torch.frombuffer(pages, dtype=like.dtype, count=count).view(shape)


def grow_layers(pools: list[Tensor], rows: int, width: int, step: int, cap: int) -> None:
    """`grown` for every layer of `pools`, in place and one layer at a time: each old layer goes
    before the next is copied, so a growth holds one layer twice rather than the whole pool (ten
    streams' pools reach ~450 MiB on the CPU; BENCHMARKS.md, issue 25)."""
    for layer in range(len(pools)):
        pools[layer] = grown(pools[layer], rows, width, step, cap)


def causal_mask(positions: Tensor, n_ctx: int) -> Tensor:
    """Boolean mask [B, 1, T, n_ctx]: a token at position p sees cache positions 0..p."""
    keys = torch.arange(n_ctx, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


class Whisper(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the token embedding may be kept in fp16 apart: engines/weights/fp16.py)."""
        return self.decoder.positional_embedding.dtype

    def fuse(self) -> Whisper:
        """Fuses the self-attention projections (after loading and moving the weights)."""
        for block in [*self.encoder.layers, *self.decoder.layers]:
            cast(ResidualAttentionBlock, block).attn.fuse_qkv()
        return self

    def new_cache(self, rows: int, slots: int | None = None) -> KVCache:
        return KVCache(self.dims, rows, self.dtype, self.device, slots)
