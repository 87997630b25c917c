"""A decoder step's self-attention over the KV cache as one Triton kernel, cache writes included.

In a graphed step of 64 rows PyTorch spends three kernels per layer on self-attention: two
index_put scatters of the new keys and values into the cache (4 us each on an H100) and cuDNN's
attention (29 us for 64 rows over 128 cache slots, twice the time its 42 MB take to read;
BENCHMARKS.md, seventh session). Here one program per (sequence, head) writes that head's new
keys and values to their slots, then attends over the first `n_keys` slots with an online
softmax, all the sequence's rows (draft nodes) at once as one tile. Its keys and values are read
once, and a program reads what it wrote itself (a barrier between), so no other program waits.

The mask is the step's own ([B, 1, W, n_keys], additive or boolean), so draft trees, padding rows
and shorter sequences work as with SDPA. On the CPU the kernel runs in Triton's interpreter (the
tests), in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the callers keep PyTorch's attention
    triton = None

MAX_WIDTH = 16  # rows (draft nodes) per sequence in one program's tile


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _self_attention(qkv_ptr, stride_row, k_ptr, v_ptr, stride_cb, stride_ch, stride_cs, slot_ptr,
                        mask_ptr, stride_mb, stride_mw, stride_mc, out_ptr, width, n_keys, scale, D,
                        HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                        STORE: tl.constexpr, BOOL_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """Program (b, h): rows b*width .. b*width + width - 1, head h."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        rw = tl.arange(0, BLOCK_W)
        rd = tl.arange(0, HEAD_DIM)
        rc = tl.arange(0, BLOCK_C)
        w_ok = rw < width
        rows = b * width + rw
        keys = k_ptr + b * stride_cb + h * stride_ch
        values = v_ptr + b * stride_cb + h * stride_ch
        row_at = qkv_ptr + rows[:, None] * stride_row + h * HEAD_DIM + rd[None, :]
        if STORE:  # this step's keys and values (columns [D, 2D) and [2D, 3D) of the rows) to their slots
            slot = tl.load(slot_ptr + rows, mask=w_ok, other=0)
            place = slot[:, None] * stride_cs + rd[None, :]
            tl.store(keys + place, tl.load(row_at + D, mask=w_ok[:, None]), mask=w_ok[:, None])
            tl.store(values + place, tl.load(row_at + 2 * D, mask=w_ok[:, None]), mask=w_ok[:, None])
            tl.debug_barrier()  # the program's own writes, visible to its loads below
        q = tl.load(row_at, mask=w_ok[:, None], other=0.0)
        best = tl.full([BLOCK_W], -1.0e30, tl.float32)  # finite: a block every key of which is masked stays NaN-free
        total = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc = tl.zeros([BLOCK_W, HEAD_DIM], dtype=tl.float32)
        for c0 in range(0, n_keys, BLOCK_C):
            cc = c0 + rc
            c_ok = cc < n_keys
            k = tl.load(keys + cc[:, None] * stride_cs + rd[None, :], mask=c_ok[:, None], other=0.0)
            v = tl.load(values + cc[:, None] * stride_cs + rd[None, :], mask=c_ok[:, None], other=0.0)
            m_at = mask_ptr + b * stride_mb + rw[:, None] * stride_mw + cc[None, :] * stride_mc
            seen = w_ok[:, None] & c_ok[None, :]
            if BOOL_MASK:
                s_mask = tl.where(tl.load(m_at, mask=seen, other=0) != 0, 0.0, float("-inf"))
            else:
                s_mask = tl.load(m_at, mask=seen, other=float("-inf")).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + s_mask
            new_best = tl.maximum(best, tl.max(s, 1))
            p = tl.exp(s - new_best[:, None])
            fade = tl.exp(best - new_best)
            total = total * fade + tl.sum(p, 1)
            acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # rows past `width` saw nothing
        tl.store(out_ptr + rows[:, None] * D + h * HEAD_DIM + rd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=w_ok[:, None])


def self_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, mask: Tensor, *,
                   store: bool = True) -> Tensor:
    """Attention of a step's rows over the cache: rows [B*W, D] (heads side by side).

    qkv: [B*W, 3D] (query, key, value of each row; rows contiguous in D) or, with store=False,
    the queries [B*W, D] alone (the keys and values already in the cache). k_cache, v_cache:
    one layer's [rows, H, n_ctx, Dh], sequence b on row b. slots [B, W]: where the rows' keys and
    values go. mask [B, 1, W, n_keys]: which of the first n_keys slots each row sees (additive
    float, or boolean True = seen)."""
    batch, width = slots.shape
    heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    d = heads * head_dim
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head size {head_dim}: the attention kernel needs a power of two from 16")
    if width > MAX_WIDTH:
        raise ValueError(f"{width} rows per sequence: the attention kernel takes at most {MAX_WIDTH}")
    if qkv.stride(1) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride() or not slots.is_contiguous():
        raise ValueError("rows, keys and values must be contiguous in the head dimension, the two caches alike, "
                         "the slots contiguous")
    if qkv.shape != (batch * width, 3 * d if store else d):
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match {batch} x {width} rows of {d}")
    n_keys = mask.shape[-1]
    out = torch.empty((batch * width, d), dtype=qkv.dtype, device=qkv.device)
    m = mask[:, 0]
    _self_attention[(batch, heads)](
        qkv, qkv.stride(0), k_cache, v_cache, *k_cache.stride()[:3], slots, m, *m.stride(), out, width, n_keys,
        head_dim ** -0.5, d, HEAD_DIM=head_dim, BLOCK_W=16, BLOCK_C=64, STORE=store, BOOL_MASK=mask.dtype == torch.bool,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=4)
    return out
