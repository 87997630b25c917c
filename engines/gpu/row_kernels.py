"""The row kernels: one Triton kernel per projection of a decoder step of a few rows, with all the
pointwise work around it (layer norm before; bias, GELU, residual or the KV-cache writes after).

Every weight is read once per step, and a row's layer norm is recomputed by every program from
the row itself (a few KB, in L2) instead of being a kernel of its own. Two forms:

- up to GEMV_ROWS rows (_row_gemv): the CUDA cores, one warp per program and a few columns each,
  the program's whole K in registers, so that thousands of small programs have the whole weight
  in flight at once; on Hopper each kernel is a programmatic dependent launch that loads its
  weights while the previous kernel ends (1.41 against 1.97 ms per step at one row, eighth session);
- up to MAX_ROWS rows (_row_linear): tensor cores, BLOCK_N columns for all rows (padded to a tile
  of 16) over the whole K; the padding's arithmetic costs nothing next to the weight reads.

`row_linear` launches the one that fits; engines/gpu/decode_kernels.py builds decoder steps of them.
On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engines.gpu.decode_attention import launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU install without it): the plain step is used
    triton = None

MAX_ROWS = 16  # rows (batch x draft width) of a step these kernels take: one tile (BENCHMARKS.md, fifth
# session: at 32 rows they gained 6% over cuBLAS, at 64 they lost 18%)


def available() -> bool:
    return triton is not None


if triton is not None:
    from engines.gpu.decode_attention import dependent_start

    @triton.jit
    def _row_linear(
        x_ptr,
        w_ptr,
        b_ptr,
        res_ptr,
        out_ptr,
        ln_w_ptr,
        ln_b_ptr,
        eps,
        k_ptr,
        v_ptr,
        slot_ptr,
        width,
        stride_cb,
        stride_ch,
        stride_cs,
        M,
        N,
        stride_xm,
        D,
        K: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NORM: tl.constexpr,
        GELU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        KV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """out[m, n] = epilogue(sum_k norm(x)[m, k] * w[n, k] + b[n]) for the BLOCK_N columns n
        that program n owns, over the whole K."""
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok = rm < M
        col_ok = rn < N
        if NORM:
            mean, rstd = _row_statistics(x_ptr, rm, row_ok, stride_xm, eps, K, BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            xk = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                gamma = tl.load(ln_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                beta = tl.load(ln_b_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                xk = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            acc += tl.dot(xk.to(w.dtype), tl.trans(w), input_precision=PRECISION)
        _epilogue(
            acc,
            rm,
            rn,
            row_ok[:, None] & col_ok[None, :],
            row_ok,
            b_ptr,
            res_ptr,
            out_ptr,
            k_ptr,
            v_ptr,
            slot_ptr,
            width,
            stride_cb,
            stride_ch,
            stride_cs,
            N,
            D,
            HEAD_DIM,
            GELU,
            RESIDUAL,
            KV,
        )

    @triton.jit
    def _row_gemv(
        x_ptr,
        w_ptr,
        b_ptr,
        res_ptr,
        out_ptr,
        ln_w_ptr,
        ln_b_ptr,
        eps,
        k_ptr,
        v_ptr,
        slot_ptr,
        width,
        stride_cb,
        stride_ch,
        stride_cs,
        M,
        N,
        stride_xm,
        D,
        K: tl.constexpr,
        PART: tl.constexpr,
        REST: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NORM: tl.constexpr,
        GELU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        KV: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DEPENDENT: tl.constexpr,
    ):
        """_row_linear for a step of one or two rows, on the CUDA cores: a few columns per program
        (many programs), the whole K in registers as two tiles, columns [0, PART) and [PART, PART +
        REST) (powers of two; the second masked past K), so every load of a program is in flight at
        once. DEPENDENT (a programmatic dependent launch): the weights, which no kernel writes, are
        loaded before waiting for the previous kernel's results."""
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ra = tl.arange(0, PART)
        rb = PART + tl.arange(0, REST)
        row_ok = rm < M
        col_ok = rn < N
        b_ok = rb < K
        wa = tl.load(w_ptr + rn[:, None] * K + ra[None, :], mask=col_ok[:, None], other=0.0)
        wb = tl.load(w_ptr + rn[:, None] * K + rb[None, :], mask=col_ok[:, None] & b_ok[None, :], other=0.0)
        bias = tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        if DEPENDENT:
            dependent_start()
        xa, xb = _gemv_inputs(x_ptr, ln_w_ptr, ln_b_ptr, eps, rm, ra, rb, row_ok, b_ok, stride_xm, K, NORM)
        acc = tl.sum(xa[:, None, :] * wa.to(tl.float32)[None, :, :], axis=2) + tl.sum(
            xb[:, None, :] * wb.to(tl.float32)[None, :, :], axis=2
        )
        _epilogue(
            acc + bias[None, :],
            rm,
            rn,
            row_ok[:, None] & col_ok[None, :],
            row_ok,
            b_ptr,
            res_ptr,
            out_ptr,
            k_ptr,
            v_ptr,
            slot_ptr,
            width,
            stride_cb,
            stride_ch,
            stride_cs,
            N,
            D,
            HEAD_DIM,
            GELU,
            RESIDUAL,
            KV,
            BIAS=False,
        )

    @triton.jit
    def _row_statistics(
        x_ptr, rm, row_ok, stride_xm, eps, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        """The layer norm's mean and 1 / std of each row, in one pass, in float32; unrolled, so that
        its loads are in flight together."""
        rk = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            kk = k0 + rk
            xk = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0
            ).to(tl.float32)
            total += tl.sum(xk, axis=1)
            squares += tl.sum(xk * xk, axis=1)
        mean = total / K
        rstd = 1.0 / tl.sqrt(tl.maximum(squares / K - mean * mean, 0.0) + eps)
        return mean, rstd

    @triton.jit
    def _gemv_inputs(
        x_ptr, ln_w_ptr, ln_b_ptr, eps, rm, ra, rb, row_ok, b_ok, stride_xm, K: tl.constexpr, NORM: tl.constexpr
    ):
        """_row_gemv's rows as its two float32 tiles (columns ra and rb), layer-normed where NORM."""
        xa = tl.load(x_ptr + rm[:, None] * stride_xm + ra[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + rm[:, None] * stride_xm + rb[None, :], mask=row_ok[:, None] & b_ok[None, :], other=0.0).to(
            tl.float32
        )
        if NORM:
            mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / K
            da = xa - mean[:, None]
            db = tl.where(b_ok[None, :], xb - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt((tl.sum(da * da, axis=1) + tl.sum(db * db, axis=1)) / K + eps)
            xa = (
                da * rstd[:, None] * tl.load(ln_w_ptr + ra).to(tl.float32)[None, :]
                + tl.load(ln_b_ptr + ra).to(tl.float32)[None, :]
            )
            xb = (
                db * rstd[:, None] * tl.load(ln_w_ptr + rb, mask=b_ok, other=0.0).to(tl.float32)[None, :]
                + tl.load(ln_b_ptr + rb, mask=b_ok, other=0.0).to(tl.float32)[None, :]
            )
        return xa, xb

    @triton.jit
    def _epilogue(
        acc,
        rm,
        rn,
        ok,
        row_ok,
        b_ptr,
        res_ptr,
        out_ptr,
        k_ptr,
        v_ptr,
        slot_ptr,
        width,
        stride_cb,
        stride_ch,
        stride_cs,
        N,
        D,
        HEAD_DIM: tl.constexpr,
        GELU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        KV: tl.constexpr,
        BIAS: tl.constexpr = True,
    ):
        """Bias, GELU, residual; the result to `out` (or, for a query/key/value projection, the
        query to `out` and the keys and values to the cache at the rows' slots)."""
        if BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GELU:  # exact (erf) GELU, as the model's nn.GELU()
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        if RESIDUAL:
            acc += tl.load(res_ptr + rm[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        if KV:  # columns [0, D): the query, to out [M, D]; [D, 2D) keys and [2D, 3D) values, to the cache
            tl.store(
                out_ptr + rm[:, None] * D + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok & (rn < D)[None, :]
            )
            slot = tl.load(slot_ptr + rm, mask=row_ok, other=0)
            column = rn % D
            place = ((rm // width) * stride_cb + slot * stride_cs)[:, None] + (
                (column // HEAD_DIM) * stride_ch + column % HEAD_DIM
            )[None, :]
            is_k = (rn >= D) & (rn < 2 * D)
            tl.store(k_ptr + place, acc.to(k_ptr.dtype.element_ty), mask=ok & is_k[None, :])
            tl.store(v_ptr + place, acc.to(v_ptr.dtype.element_ty), mask=ok & (rn >= 2 * D)[None, :])
        else:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _blocks(n: int, k: int, itemsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages) for an [n, k] weight, from a sweep on an H100 (BENCHMARKS.md,
    fifth session): each program reads the whole K in blocks of 256, with column blocks as narrow
    as keeps the programs few. BLOCK_K halves where the pipelined tiles would not fit in shared
    memory (float32 tiles). K is never split across programs: the split form (its parts meeting
    through atomics in a scratch tile) read sums still in flight on the H100 (sixth session)."""
    stages = 3
    block_n, block_k = 16 if n <= 2048 else 32 if n <= 4096 else 64, min(256, triton.next_power_of_2(k))
    while block_k > 32 and stages * (MAX_ROWS + block_n) * block_k * itemsize > _SHARED_BYTES:
        block_k //= 2
    return block_n, block_k, 4, stages


_SHARED_BYTES = 160 * 1024  # of an H100's 227 KB per block, with room for Triton's own buffers

GEMV_ROWS = 2  # steps of at most this many rows take the CUDA-core form (_row_gemv)


def _gemv_blocks(n: int, k: int, dependent: bool) -> tuple[int, int]:
    """(BLOCK_N, warps) of _row_gemv for an [n, k] weight, from a sweep on an H100 at one row
    (BENCHMARKS.md, eighth session): one warp per program and a few columns each, fewer for fc2's
    long K; a dependent launch overlaps more, so its programs take more columns."""
    if dependent:
        return (2 if k > 2048 else 4), 1
    return (1, 4) if k > 2048 else (2, 1)


def dependent_launch(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later): a kernel's programs start while the previous
    kernel ends, and wait for its results only where they read them."""
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def row_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    *,
    norm: tuple[Tensor, Tensor, float] | None = None,
    gelu: bool = False,
    residual: Tensor | None = None,
    kv: tuple[Tensor, Tensor, Tensor, int] | None = None,
    dependent: bool = False,
) -> Tensor:
    """epilogue(norm(x) @ weight.T + bias) for x [M, K], M <= MAX_ROWS (rows contiguous in K).

    norm: (gamma, beta, eps) of a layer norm applied to x first; gelu: exact GELU after the bias;
    residual: [M, N] added last. kv: (k_cache, v_cache, slots, width) of one layer ([rows, H, n_ctx,
    Dh] each; slots [M]; row m belongs to cache row m // width): the weight is a fused query/key/value
    projection, the keys and values go to the cache at the rows' slots and only the query [M, N/3]
    is returned. dependent: launched as a programmatic dependent launch (dependent_launch()); steps
    of at most GEMV_ROWS rows only."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"{m} rows: the row kernels take at most {MAX_ROWS}")
    if dependent and m > GEMV_ROWS:
        raise ValueError(f"{m} rows: dependent launches are for steps of at most {GEMV_ROWS} rows")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x needs contiguous rows and the weight must be contiguous")
    d = n // 3 if kv else n
    out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    gamma, beta, eps = norm if norm is not None else (bias, bias, 0.0)
    if kv is not None:
        k_cache, v_cache, slots, width = kv
        strides = k_cache.stride()[:3]
        head_dim = k_cache.shape[-1]
    else:
        k_cache = v_cache = slots = out
        width, strides, head_dim = 1, (0, 0, 0), 1
    args: tuple[object, ...] = (x, weight, bias, out if residual is None else residual, out, gamma, beta, eps)
    args += (k_cache, v_cache, slots, width, *strides, m, n, x.stride(0), d)
    flags = dict(
        K=k, HEAD_DIM=head_dim, NORM=norm is not None, GELU=gelu, RESIDUAL=residual is not None, KV=kv is not None
    )
    if m <= GEMV_ROWS:
        block_n, warps = _gemv_blocks(n, k, dependent)
        part = 1 << (k.bit_length() - 1)  # the largest power of two in K, then the rest rounded up
        rest = triton.next_power_of_2(k - part) if k > part else 1
        _row_gemv[(triton.cdiv(n, block_n),)](
            *args,
            **flags,
            PART=part,
            REST=rest,
            BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=block_n,
            DEPENDENT=dependent,
            num_warps=warps,
            **launch_options(dependent),
        )
        return out
    block_n, block_k, warps, stages = _blocks(n, k, x.element_size())
    _row_linear[(triton.cdiv(n, block_n),)](
        *args,
        **flags,
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32: as torch computes it
    )
    return out
