"""A decoder step's attention as Triton kernels: the self-attention over the KV cache (cache
writes included) and the cross-attention over the audio frames.

Self-attention. In a graphed step of 64 rows PyTorch spends three kernels per layer on it: two
index_put scatters of the new keys and values into the cache (4 us each on an H100) and cuDNN's
attention (29 us for 64 rows over 128 cache slots, twice the time its 42 MB take to read;
BENCHMARKS.md, seventh session). Here one program per (sequence, head) writes that head's new
keys and values to their slots, then attends over the first `n_keys` slots with an online
softmax, all the sequence's rows (draft nodes) at once as one tile. Its keys and values are read
once, and a program reads what it wrote itself (a barrier between), so no other program waits.
The mask is the step's own ([B, 1, W, n_keys], additive or boolean), so draft trees, padding rows
and shorter sequences work as with SDPA.

Cross-attention (the row kernels' steps). A sequence's 1500 frames per head are split in chunks,
one program per (sequence, head, chunk) with all the sequence's rows as one tile, and a second
kernel weighs the chunks' partial outputs by their softmax sums (split-K "flash decoding"). A
row of a shorter window reads only its own frames (KeyLengths.used). In place of PyTorch's
variable-length flash kernel this took a step of 16 rows of different windows from 3.83 to 3.20 ms,
and in place of cuDNN's SDPA a verification step of one sequence with 8 draft nodes from 2.45 to
2.12 (H100, eighth session); for steps of one row per sequence over whole windows cuDNN stays faster.

On the CPU the kernels run in Triton's interpreter (the tests), in float32.
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
    def dependent_start():
        """In a programmatic dependent launch: wait for the previous kernel's results (everything it
        wrote is visible after this), then let the next kernel's programs start."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _attend(q, k, v, bias, best, total, acc, scale, PRECISION: tl.constexpr):
        """One block of keys into an online softmax: scores q k^T * scale + bias (0 or -inf); returns
        the rows' running max, sum and unnormalised output."""
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias
        new_best = tl.maximum(best, tl.max(scores, 1))
        p = tl.exp(scores - new_best[:, None])
        fade = tl.exp(best - new_best)
        total = total * fade + tl.sum(p, 1)
        acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return new_best, total, acc

    @triton.jit
    def _self_attention(
        qkv_ptr,
        stride_row,
        k_ptr,
        v_ptr,
        stride_cb,
        stride_ch,
        stride_cs,
        slot_ptr,
        mask_ptr,
        stride_mb,
        stride_mw,
        stride_mc,
        out_ptr,
        width,
        n_keys,
        scale,
        D,
        HEAD_DIM: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        STORE: tl.constexpr,
        BOOL_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """Program (b, h): rows b*width .. b*width + width - 1, head h."""
        if DEPENDENT:  # the previous kernel's results (rows, cache) first
            dependent_start()
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
            best, total, acc = _attend(q, k, v, s_mask, best, total, acc, scale, PRECISION)
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # rows past `width` saw nothing
        tl.store(
            out_ptr + rows[:, None] * D + h * HEAD_DIM + rd[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=w_ok[:, None],
        )

    @triton.jit
    def _cross_part(
        q_ptr,
        stride_q,
        k_ptr,
        v_ptr,
        stride_kb,
        stride_kh,
        stride_kf,
        used_ptr,
        part_ptr,
        stat_ptr,
        width,
        frames,
        heads,
        parts,
        scale,
        D,
        HEAD_DIM: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        CHUNK: tl.constexpr,
        LENGTHS: tl.constexpr,
        PRECISION: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """Program (b, h, s): the rows of sequence b, head h, over frames [s * CHUNK, (s + 1) * CHUNK)
        (those the sequence has): the unnormalised output and the softmax's running max and sum."""
        if DEPENDENT:
            dependent_start()
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        rw = tl.arange(0, BLOCK_W)
        rd = tl.arange(0, HEAD_DIM)
        rc = tl.arange(0, BLOCK_C)
        w_ok = rw < width
        n_keys = frames
        if LENGTHS:
            n_keys = tl.minimum(tl.load(used_ptr + b * heads + h), frames)
        keys = k_ptr + b * stride_kb + h * stride_kh
        values = v_ptr + b * stride_kb + h * stride_kh
        q = tl.load(
            q_ptr + (b * width + rw)[:, None] * stride_q + h * HEAD_DIM + rd[None, :], mask=w_ok[:, None], other=0.0
        )
        best = tl.full([BLOCK_W], -1.0e30, tl.float32)
        total = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc = tl.zeros([BLOCK_W, HEAD_DIM], dtype=tl.float32)
        end = tl.minimum((s + 1) * CHUNK, n_keys)
        for c0 in range(s * CHUNK, end, BLOCK_C):
            cc = c0 + rc
            c_ok = cc < end
            k = tl.load(keys + cc[:, None] * stride_kf + rd[None, :], mask=c_ok[:, None], other=0.0)
            v = tl.load(values + cc[:, None] * stride_kf + rd[None, :], mask=c_ok[:, None], other=0.0)
            seen = tl.where(c_ok, 0.0, float("-inf"))[None, :]
            best, total, acc = _attend(q, k, v, seen, best, total, acc, scale, PRECISION)
        at = (b * heads + h) * parts + s
        tl.store(part_ptr + (at * BLOCK_W + rw)[:, None] * HEAD_DIM + rd[None, :], acc, mask=w_ok[:, None])
        tl.store(stat_ptr + (at * 2) * BLOCK_W + rw, best, mask=w_ok)
        tl.store(stat_ptr + (at * 2 + 1) * BLOCK_W + rw, total, mask=w_ok)

    @triton.jit
    def _cross_combine(
        part_ptr,
        stat_ptr,
        out_ptr,
        width,
        heads,
        parts,
        D,
        HEAD_DIM: tl.constexpr,
        BLOCK_W: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """Program (b, h): the parts of sequence b, head h, weighted by their softmax sums."""
        if DEPENDENT:
            dependent_start()
        b = tl.program_id(0)
        h = tl.program_id(1)
        rw = tl.arange(0, BLOCK_W)
        rd = tl.arange(0, HEAD_DIM)
        w_ok = rw < width
        first = (b * heads + h) * parts
        best = tl.full([BLOCK_W], -1.0e30, tl.float32)
        for s in range(parts):
            best = tl.maximum(best, tl.load(stat_ptr + ((first + s) * 2) * BLOCK_W + rw, mask=w_ok, other=-1.0e30))
        total = tl.zeros([BLOCK_W], dtype=tl.float32)
        acc = tl.zeros([BLOCK_W, HEAD_DIM], dtype=tl.float32)
        for s in range(parts):
            at = first + s
            weight = tl.exp(tl.load(stat_ptr + (at * 2) * BLOCK_W + rw, mask=w_ok, other=-1.0e30) - best)
            total += weight * tl.load(stat_ptr + (at * 2 + 1) * BLOCK_W + rw, mask=w_ok, other=0.0)
            acc += weight[:, None] * tl.load(
                part_ptr + (at * BLOCK_W + rw)[:, None] * HEAD_DIM + rd[None, :], mask=w_ok[:, None], other=0.0
            )
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(
            out_ptr + (b * width + rw)[:, None] * D + h * HEAD_DIM + rd[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=w_ok[:, None],
        )


# frames per program, per block of its loop, and warps: the best summed over six step shapes on an H100 (BENCHMARKS.md,
# eighth session; chunks of 128-512 frames, blocks of 32-128, 2 or 4 warps)
CROSS_CHUNK, CROSS_BLOCK, CROSS_WARPS = 512, 128, 4


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, used: Tensor | None = None, *, dependent: bool = False, chunk: int = CROSS_CHUNK
) -> Tensor:
    """Attention of a step's rows over one layer's cross-attention keys and values, split over the
    frames (a program per sequence, head and chunk of frames, then one combining the chunks): rows
    [B*W, D] (heads side by side) from the queries q [B*W, D] and k, v [B, H, F, Dh]; with `used`
    ([B*H] int32, KeyLengths.used), sequence b's head h sees only its first used[b*H + h] frames.
    dependent: both kernels launched as programmatic dependent launches (row_kernels.dependent_launch).
    chunk: frames per program (a multiple of CROSS_BLOCK)."""
    batch, heads, frames, head_dim = k.shape
    d = heads * head_dim
    width = q.shape[0] // batch
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head size {head_dim}: the attention kernel needs a power of two from 16")
    if width > MAX_WIDTH or q.shape != (batch * width, d):
        raise ValueError(f"queries {tuple(q.shape)} do not match {batch} sequences of at most {MAX_WIDTH} rows of {d}")
    if q.stride(1) != 1 or k.stride(3) != 1 or k.stride() != v.stride():
        raise ValueError("queries, keys and values must be contiguous in the head dimension, keys and values alike")
    if used is not None and (used.dtype != torch.int32 or used.shape != (batch * heads,)):
        raise ValueError(
            f"used must be int32 frame counts per sequence and head ({batch * heads}), "
            f"got {used.dtype} {tuple(used.shape)}"
        )
    if chunk % CROSS_BLOCK:
        raise ValueError(f"chunk {chunk} is not a multiple of the block, {CROSS_BLOCK}")
    parts = triton.cdiv(frames, chunk)
    part = torch.empty((batch * heads * parts, 16, head_dim), dtype=torch.float32, device=q.device)
    stat = torch.empty((batch * heads * parts, 2, 16), dtype=torch.float32, device=q.device)
    out = torch.empty((batch * width, d), dtype=q.dtype, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _cross_part[(batch, heads, parts)](
        q,
        q.stride(0),
        k,
        v,
        *k.stride()[:3],
        used if used is not None else stat,
        part,
        stat,
        width,
        frames,
        heads,
        parts,
        head_dim**-0.5,
        d,
        HEAD_DIM=head_dim,
        BLOCK_W=16,
        BLOCK_C=CROSS_BLOCK,
        CHUNK=chunk,
        LENGTHS=used is not None,
        PRECISION=precision,
        DEPENDENT=dependent,
        num_warps=CROSS_WARPS,
        **launch_options(dependent),
    )
    _cross_combine[(batch, heads)](
        part,
        stat,
        out,
        width,
        heads,
        parts,
        d,
        HEAD_DIM=head_dim,
        BLOCK_W=16,
        DEPENDENT=dependent,
        num_warps=4,
        **launch_options(dependent),
    )
    return out


def launch_options(dependent: bool) -> dict:
    """Triton launch arguments of a kernel launched as a programmatic dependent launch, or not."""
    return {"launch_pdl": True} if dependent else {}


def self_attention(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    mask: Tensor,
    *,
    store: bool = True,
    dependent: bool = False,
) -> Tensor:
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
    if (
        qkv.stride(1) != 1
        or k_cache.stride(3) != 1
        or k_cache.stride() != v_cache.stride()
        or not slots.is_contiguous()
    ):
        raise ValueError(
            "rows, keys and values must be contiguous in the head dimension, the two caches alike, the slots contiguous"
        )
    if qkv.shape != (batch * width, 3 * d if store else d):
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match {batch} x {width} rows of {d}")
    n_keys = mask.shape[-1]
    out = torch.empty((batch * width, d), dtype=qkv.dtype, device=qkv.device)
    m = mask[:, 0]
    _self_attention[(batch, heads)](
        qkv,
        qkv.stride(0),
        k_cache,
        v_cache,
        *k_cache.stride()[:3],
        slots,
        m,
        *m.stride(),
        out,
        width,
        n_keys,
        head_dim**-0.5,
        d,
        HEAD_DIM=head_dim,
        BLOCK_W=16,
        BLOCK_C=64,
        STORE=store,
        BOOL_MASK=mask.dtype == torch.bool,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        DEPENDENT=dependent,
        num_warps=4,
        **launch_options(dependent),
    )
    return out
