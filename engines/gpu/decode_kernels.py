"""Decoder steps of a few rows as hand-written Triton kernels: eight or nine launches per layer.

A graphed Breeze decoder step at batch 1 is bound by kernel count and per-kernel latency, not
by bytes: cuBLAS spends 5-6 us on each of a layer's six projections whatever their size, and the
layer norms, biases, GELU, residual adds and KV-cache writes around them are kernels of their own
(BENCHMARKS.md, third session: 16 kernels per layer after Inductor's fusion, 2.3 ms per step).
Here each projection is one kernel that does all the pointwise work around it:

    qkv   = LN1(x) @ Wqkv + b          keys and values stored straight into the KV cache
    x     = x + attn @ Wo + b
    q     = LN2(x) @ Wq + b            (cross-attention query)
    x     = x + cross @ Wo' + b
    g     = GELU(LN3(x) @ W1 + b1)
    x     = x + g @ W2 + b2

plus the self-attention and the cross-attention (engines/gpu/decode_attention.py's kernels, or
PyTorch's SDPA for the cross-attention of plain steps over whole windows, where cuDNN is faster).
The projections are engines/gpu/row_kernels.py's.

`KernelDecoder.hidden` is TextDecoder.hidden for rows 0..B-1 through these kernels; the StepRunner
(engines/gpu/cuda_graphs.py) records it into its CUDA graphs for buckets of at most `MAX_ROWS` rows.
On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is how the tests
check them against the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from engines.gpu.decode_attention import cross_attention, self_attention
from engines.gpu.row_kernels import GEMV_ROWS, row_linear
from engines.whisper.model import KVCache, LayerNorm, TextDecoder, attention

Norm = tuple[Tensor, Tensor, float]  # a layer norm's weight, bias and eps


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights as the row kernels take them: (weight, bias[, norm before])."""

    qkv: tuple[Tensor, Tensor, Norm]  # fused query/key/value projection, after attn_ln
    out: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor, Norm]  # the cross-attention's query, after cross_attn_ln
    cross_out: tuple[Tensor, Tensor]
    fc1: tuple[Tensor, Tensor, Norm]  # after mlp_ln
    fc2: tuple[Tensor, Tensor]
    heads: int


class KernelDecoder:
    """TextDecoder.hidden for rows 0..B-1 with B x width <= MAX_ROWS, through the row kernels.

    Needs the model's fused query/key/value weights (Whisper.fuse()) in the model's dtype."""

    def __init__(self, decoder: TextDecoder, *, dependent: bool = False, cross: str = "auto"):
        """dependent: steps of at most GEMV_ROWS rows launch their kernels as programmatic dependent
        launches (dependent_launch()). cross: the cross-attention, "kernel" (decode_attention.cross_attention),
        "sdpa" (PyTorch's), or "auto": the kernel where a sequence has several rows or the rows read
        different numbers of frames, SDPA (cuDNN) for plain steps over whole windows (BENCHMARKS.md,
        eighth session). Additive cross masks (SDPA's frame buckets) always go to SDPA."""
        if cross not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"cross must be auto, kernel or sdpa, got {cross!r}")
        self.decoder, self.dependent, self.cross = decoder, dependent, cross
        self.layers: list[_Layer] = []
        for block in decoder.layers:
            qkv = block.attn.fused
            if not isinstance(qkv, tuple):
                raise ValueError(
                    "the row kernels need the model's plain fused query/key/value weights (Whisper.fuse())"
                )
            cross_attn, cross_ln = block.cross_layers()
            self.layers.append(
                _Layer(
                    qkv=(*qkv, _norm(block.attn_ln)),
                    out=_linear(block.attn.out),
                    query=(*_linear(cross_attn.query), _norm(cross_ln)),
                    cross_out=_linear(cross_attn.out),
                    fc1=(*_linear(block.mlp[0]), _norm(block.mlp_ln)),
                    fc2=_linear(block.mlp[2]),
                    heads=block.attn.n_head,
                )
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
        batch, width = tokens.shape
        x = self.decoder.embed(tokens, positions, cache.dtype).flatten(0, 1)  # rows [B*W, D]
        flat_slots = slots.reshape(-1)
        dep = self.dependent and batch * width <= GEMV_ROWS
        used = getattr(cross_mask, "used", None)  # KeyLengths: each row's frames
        kernel = not isinstance(cross_mask, Tensor) and (
            self.cross == "kernel" or self.cross == "auto" and (width > 1 or used is not None)
        )
        for layer, p in enumerate(self.layers):
            k_cache, v_cache = cache.k[layer], cache.v[layer]
            w, b, norm = p.qkv
            q = row_linear(x, w, b, norm=norm, kv=(k_cache, v_cache, flat_slots, width), dependent=dep)
            a = self_attention(q, k_cache, v_cache, slots, mask, store=False, dependent=dep)
            x = row_linear(a, *p.out, residual=x, dependent=dep)
            w, b, norm = p.query
            q = row_linear(x, w, b, norm=norm, dependent=dep)
            if kernel:
                a = cross_attention(q, *cross[layer], used, dependent=dep)
            else:
                a = _rows(attention(q.view(batch, width, p.heads, -1).transpose(1, 2), *cross[layer], cross_mask))
            x = row_linear(a, *p.cross_out, residual=x, dependent=dep)
            w, b, norm = p.fc1
            x = row_linear(row_linear(x, w, b, norm=norm, gelu=True, dependent=dep), *p.fc2, residual=x, dependent=dep)
        return self.decoder.ln(x).view(batch, width, -1)


def _norm(ln: LayerNorm) -> Norm:
    return ln.weight, ln.bias, ln.eps


def _linear(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The weight and bias of one of the model's linear layers (all have a bias here)."""
    assert isinstance(layer, nn.Linear) and layer.bias is not None, f"expected a linear layer, got {layer}"
    return layer.weight, layer.bias


def _rows(a: Tensor) -> Tensor:
    """Attention output [B, H, W, Dh] as rows [B*W, H*Dh] (a view when the layout allows)."""
    batch, heads, width, dh = a.shape
    rows = a.transpose(1, 2).reshape(batch * width, heads * dh)
    return rows if rows.stride(1) == 1 else rows.contiguous()
