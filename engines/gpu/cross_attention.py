"""Cross-attention over rows of different window lengths, and which kernel does it on this GPU.

Rows of a batch step may hold windows of different lengths. Masked SDPA over a frame bucket reads
every row's bucket of frames; the variable-length kernels (memory-efficient or flash attention)
read each row's own frames from the full-window pools. `choose_cross_attention` measures them on
random data once per shape and keeps the fastest that matches masked SDPA and records into a
CUDA graph (`--cuda-graphs`'s `cross_attention="auto"`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class KeyLengths:
    """Cross-attention in which row b sees only its first `lengths[b]` frames of full-window pools.

    The pools hold [rows, H, F, D] per layer; folding heads into the batch makes every (row, head)
    a variable-length sequence of the memory-efficient (or flash) kernel: queries
    [B*H*W, D] with starts every W, keys [B*H*F, D] with starts every F (a view, no copy) and
    `seqlen_k` / `seqused_k` = the row's frames, so the kernel reads only those frames instead
    of a masked frame bucket. Called by MultiHeadAttention.attend in place of a mask. The key
    counts per (row, head), `used`, are a static buffer set once per step (`set`), not per layer."""

    def __init__(self, kernel: str, batch: int, heads: int, width: int, frames: int, device: torch.device):
        self.kernel, self.heads = kernel, heads
        self.used = torch.full((batch * heads,), frames, dtype=torch.int32, device=device)
        self.seq_q = torch.arange(0, batch * heads * width + 1, width, dtype=torch.int32, device=device)
        self.seq_k = torch.arange(0, batch * heads * frames + 1, frames, dtype=torch.int32, device=device)

    def set(self, lengths: np.ndarray) -> None:
        """Frames seen by each row (one per row of the bucket)."""
        self.used.copy_(torch.from_numpy(np.repeat(np.asarray(lengths, dtype=np.int32), self.heads)))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return varlen_attention(self.kernel, q, k, v, self.used, self.seq_q, self.seq_k)


def varlen_attention(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, used: Tensor, seq_q: Tensor, seq_k: Tensor
) -> Tensor:
    """q [B, H, W, D] over k, v [B, H, F, D] (contiguous), (row, head) i limited to used[i] keys."""
    batch, heads, width, dim = q.shape
    frames = k.shape[2]
    if kernel == "efficient":
        out = torch.ops.aten._efficient_attention_forward(
            q.reshape(1, batch * heads * width, 1, dim),
            k.reshape(1, batch * heads * frames, 1, dim),
            v.reshape(1, batch * heads * frames, 1, dim),
            None,
            seq_q,
            seq_k,
            width,
            frames,
            0.0,
            0,
            False,
            seqlen_k=used,
        )[0]
    else:
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(batch * heads * width, 1, dim),
            k.reshape(batch * heads * frames, 1, dim),
            v.reshape(batch * heads * frames, 1, dim),
            seq_q,
            seq_k,
            width,
            frames,
            0.0,
            False,
            False,
            seqused_k=used,
        )[0]
    return out.reshape(batch, heads, width, dim)


_CHOICE: dict = {}


def choose_cross_attention(
    heads: int, dim: int, frames: int, dtype: torch.dtype, device: torch.device, batch: int = 32
) -> str:
    """The fastest cross-attention for rows of mixed window lengths among the variable-length
    kernels that match masked SDPA on this GPU (checked on random data), else "sdpa"."""
    key = (heads, dim, frames, dtype, str(device))
    if key in _CHOICE:
        return _CHOICE[key]
    report = cross_attention_report(heads, dim, frames, dtype, device, batch)
    valid = {k: r["ms"] for k, r in report.items() if r.get("ok")}
    _CHOICE[key] = min(valid, key=valid.__getitem__) if valid else "sdpa"
    return _CHOICE[key]


@torch.inference_mode()
def cross_attention_report(
    heads: int, dim: int, frames: int, dtype: torch.dtype, device: torch.device, batch: int = 32, width: int = 1
) -> dict:
    """Per kernel: max |difference| against masked SDPA, ms per call (one layer), ok."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, width, heads, dim, device=device, dtype=dtype, generator=gen).transpose(1, 2)
    k = torch.randn(batch, heads, frames, dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, heads, frames, dim, device=device, dtype=dtype, generator=gen)
    lengths = torch.randint(100, frames + 1, (batch,), device=device, generator=gen, dtype=torch.int32)
    lengths[0] = frames
    mask = (torch.arange(frames, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out: dict = {}

    def timing(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 20

    out["sdpa"] = {
        "ok": True,
        "max_abs_diff": 0.0,
        "ms": timing(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
    }
    for kernel in ("efficient", "flash"):
        keys = KeyLengths(kernel, batch, heads, width, frames, device)
        keys.set(lengths.cpu().numpy())
        try:
            got = keys(q, k, v)
            diff = (got.float() - reference.float()).abs().max().item()
            ms = timing(lambda keys=keys: keys(q, k, v))
            # it must also record into a CUDA graph (no host synchronisation inside)
            static = torch.empty_like(got)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                static.copy_(keys(q, k, v))
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static.copy_(keys(q, k, v))
            static.zero_()
            graph.replay()
            torch.cuda.synchronize(device)
            graphed = (static.float() - reference.float()).abs().max().item()
            out[kernel] = {
                "ok": diff < 2e-2 and graphed < 2e-2,
                "max_abs_diff": diff,
                "graph_max_abs_diff": graphed,
                "ms": ms,
            }
        except Exception as exc:  # an op missing or refusing these shapes on this build
            out[kernel] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out
