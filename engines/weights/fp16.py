"""Half-precision weights on the CPU: every matrix product through fbgemm's fp16 GEMM.

PyTorch's float32 `linear` on a small CPU is slow for Whisper's shapes (the 51,865-token
vocabulary projection of a few draft nodes reads 106 MB of float32 weights for ~10 rows of
output). fbgemm keeps the weights packed in fp16, converts them on the fly and accumulates in
float32: on the 2-core box that is 2-10x faster for every product of the model (BENCHMARKS.md).
The embedded whisper-base is stored in fp16 (its CTranslate2 package), so its weights lose
nothing; a float32 checkpoint is rounded to fp16 once. Activations stay float32 and every output
row depends on its own input row only, so verifying a draft gives the same logits as a plain
step: speculative decoding stays exact. Attention, convolutions and layer norms stay float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engines.weights.mapped import drop_mapped_pages
from engines.whisper.model import Linear, MultiHeadAttention, Whisper


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed in fp16 for fbgemm (torch.ops.quantized.linear_dynamic_fp16)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        bias = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed)


def available() -> bool:
    return {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines) != set()


def pack_fp16_weights(model: Whisper, embedding: Tensor | None = None) -> Whisper:
    """Swaps every Linear of `model`, the fused self-attention projections and the vocabulary
    projection for PackedLinear, in place, and keeps no float32 copy of what was packed (the fused
    projections' query/key/value views go, the token embedding is kept in fp16 for its lookups).
    CPU only: fbgemm has no CUDA kernels. `embedding`: the checkpoint's token embedding, kept as the
    lookup table where it is the model's in fp16 (not copied: a memory-mapped one stays mostly on disk)."""
    if model.device.type != "cpu":
        raise ValueError("fp16-packed weights are for the CPU (fbgemm); a GPU runs fp16 or bf16 natively")
    if not available():
        raise RuntimeError("this PyTorch build has no fbgemm kernels; run with float32 weights")
    for module in list(model.modules()):
        fused_qkv = isinstance(module, MultiHeadAttention) and module.fused is not None
        for name, child in list(module.named_children()):
            if fused_qkv and name in ("query", "key", "value"):
                delattr(module, name)  # the fused projection below does their work: no float32 copy kept
            elif isinstance(child, Linear):
                setattr(module, name, PackedLinear(child.weight, child.bias))
        if isinstance(module, MultiHeadAttention) and isinstance(module.fused, tuple):
            module.fused = PackedLinear(*module.fused)
    table = model.decoder.token_embedding
    model.decoder.output = PackedLinear(table.weight, None)
    # the lookups read fp16 rows too (the output projection rounds the same matrix): half the memory, and
    # a float32 sum with the positional embedding, so exact for the fp16 weights of the embedded model
    table.weight = nn.Parameter(_lookup_table(table.weight, embedding), requires_grad=False)
    if model.dtype == torch.float32:
        from engines.weights.packed_step import PackedDecoder

        model.decoder.packed_hidden = PackedDecoder(model.decoder).hidden
    return model


def _lookup_table(weight: Tensor, source: Tensor | None) -> Tensor:
    """The fp16 token embedding for lookups: `source` itself where it is that table already (the
    checkpoint's fp16 tensor the model was loaded from, memory-mapped by engines/weights/checkpoints.py:
    only the rows looked up become resident), else a copy of `weight` in fp16."""
    table = weight.detach().half()
    if source is not None and source.dtype == torch.float16 and torch.equal(source, table):
        drop_mapped_pages(source)  # loading (and the comparison) read all of it
        return source
    return table
