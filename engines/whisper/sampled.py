"""The full 30 s encoder window at a fraction of its cost: the silence padding sampled.

Whisper's encoder attends over all 1500 positions of its window, the padding after a short clip
included, and the padding's states depend on the clip (they attend to it), so a shortened window
(the clip plus a margin) changes every layer and cost 0.8 CER points on the dev set; states
computed from a silent window instead are further off still (BENCHMARKS.md, issue 25). Here the
clip and a margin after it are computed exactly as in the full window; beyond them one position in
`stride` (the middle of its block) stands for the block: its key counts as many keys as the block
holds (a log-count bias on the attention scores, which is what repeating the key would do), and
its output is repeated over the block, so the decoder sees 1500 frames as usual. `stride` 1 is
the full window itself. The padding of the mel is 0.0 (audio.pad_mel), so its convolution output
away from the clip is one vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import AudioEncoder

MARGIN_POSITIONS = 50  # 1 s after the clip computed densely: the convolutions' edge and the nearest padding


def padding_blocks(clip_frames: int, stride: int, n_ctx: int = 1500) -> tuple[int, list[int]]:
    """Positions computed densely (the clip's and the margin's), and the sizes of the blocks
    that one sampled position each stands for after them (they sum to the rest of the window)."""
    dense = min(n_ctx, (clip_frames + 1) // 2 + MARGIN_POSITIONS)
    return dense, [min(stride, n_ctx - start) for start in range(dense, n_ctx, stride)]


def encode_sampled(encoder: AudioEncoder, mel: Tensor, stride: int) -> Tensor:
    """Features [1, n_ctx, D] of the clip's log-mel `mel` [n_mels, frames] (unpadded) in the full
    window, with the padding sampled every `stride` positions."""
    n_ctx = encoder.positional_embedding.shape[0]
    dense, blocks = padding_blocks(mel.shape[-1], stride, n_ctx)
    # the dense positions read frames up to 2 * dense; beyond the clip the frames are 0.0 as in the window
    frames = min(2 * n_ctx, 2 * dense + 4)
    x = F.pad(mel[None, :, :frames], (0, frames - min(frames, mel.shape[-1])))
    x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(x)))).permute(0, 2, 1)[:, :dense]
    silent = torch.zeros(1, mel.shape[0], 16, dtype=mel.dtype, device=mel.device)
    padding = F.gelu(encoder.conv2(F.gelu(encoder.conv1(silent))))[0, :, 4]  # away from both edges
    middles = [dense + i * stride + (size - 1) // 2 for i, size in enumerate(blocks)]
    positions = encoder.positional_embedding
    x = torch.cat([x + positions[:dense], (padding + positions[middles])[None]], 1).to(x.dtype)
    bias = torch.tensor([0.0] * dense + [math.log(size) for size in blocks], dtype=x.dtype, device=x.device)
    mask = bias[None, None, None, :] if blocks else None
    for block in encoder.layers:
        x = block(x, mask)
    repeats = torch.tensor([1] * dense + blocks, device=x.device)
    return torch.repeat_interleave(encoder.ln_post(x), repeats, dim=1)
