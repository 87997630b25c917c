"""The full 30 s encoder window at a fraction of its cost: the silence padding sampled.

Whisper's encoder attends over all 1500 positions of its window, the padding after a short clip
included, and the padding's states depend on the clip (they attend to it), so a shortened window
(the clip plus a margin) changes every layer and cost 0.8 CER points on the dev set; states
computed from a silent window instead are further off still (BENCHMARKS.md, issue 25). Here the
clip and a margin after it are computed exactly as in the full window; beyond them one position in
`stride` (the middle of its block) stands for the block: its key counts as many keys as the block
holds (a log-count bias on the attention scores, which is what repeating the key would do), and
its output is repeated over the block where 1500 frames are wanted (a GPU's graphed decoder, word
timings), while the CPU's decoder attends to the sampled positions themselves with the same
log-count bias (SampledFeatures). `stride` 1 is the full window itself. The padding of the mel is 0.0 (audio.pad_mel), so its convolution output
away from the clip is one vector.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import AudioEncoder

MARGIN_POSITIONS = 50  # 1 s after the clip computed densely: the convolutions' edge and the nearest padding


def dense_positions(clip_frames: int, bucket: int = 1, n_ctx: int = 1500) -> int:
    """Positions computed densely: the clip's and the margin's, rounded up to a multiple of
    `bucket` (a GPU records one encoder graph per count; more dense positions only come closer
    to the full window)."""
    dense = (clip_frames + 1) // 2 + MARGIN_POSITIONS
    return min(n_ctx, -(-dense // bucket) * bucket)


def padding_blocks(dense: int, stride: int, n_ctx: int = 1500) -> list[int]:
    """The sizes of the blocks that one sampled position each stands for after the dense
    positions (they sum to the rest of the window)."""
    return [min(stride, n_ctx - start) for start in range(dense, n_ctx, stride)]


class SampledEncoder:
    """mel [B, n_mels, 2 * dense] (the clips' log-mel padded with 0.0 to twice the dense
    positions, `dense_positions`) -> features [B, n_ctx, D] of the full window with its padding
    sampled every `stride` positions. Its layout per dense count is made once, so that a call
    reads no host data and can be recorded in a CUDA graph (engines/gpu/encoder_graphs.py)."""

    def __init__(self, encoder: AudioEncoder, stride: int, layouts: int | None = None):
        """`layouts`: how many dense counts' layouts to keep, the most recently used (None: every one,
        as a CUDA graph recorded for a count reads its layout's tensors). Unbucketed, as on the CPU,
        every clip length has a count of its own and a layout of up to 0.7 MiB: ten streams kept
        hundreds of them (BENCHMARKS.md, issue 25)."""
        self.encoder = encoder
        self.stride = stride
        self.keep = layouts
        self._layouts: OrderedDict[tuple[int, torch.device, torch.dtype], tuple[Tensor, Tensor | None, Tensor]] = (
            OrderedDict()
        )

    def _layout(self, dense: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        """Positional embeddings of the sampled positions, the log-count bias (None where every
        position is dense), and the index that repeats each output over its block."""
        key = (dense, device, dtype)
        if key not in self._layouts:
            counts = self.counts(dense)
            blocks = counts[dense:]
            middles = [dense + i * self.stride + (size - 1) // 2 for i, size in enumerate(blocks)]
            positions = self.encoder.positional_embedding[middles].to(dtype)
            bias = torch.tensor([math.log(c) for c in counts], dtype=dtype, device=device)[None, None, None, :]
            index = torch.arange(len(counts), device=device).repeat_interleave(torch.tensor(counts, device=device))
            self._layouts[key] = (positions, bias if blocks else None, index)
            if self.keep is not None and len(self._layouts) > self.keep:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(key)
        return self._layouts[key]

    def compact(self, mel: Tensor) -> Tensor:
        """Features [B, n, D] of the dense positions and of one sampled position per padding
        block, not repeated (`counts` says how many frames each stands for)."""
        encoder = self.encoder
        dense = mel.shape[-1] // 2
        positions, bias, _ = self._layout(dense, mel.device, mel.dtype)
        x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
        silent = torch.zeros(1, mel.shape[1], 16, dtype=mel.dtype, device=mel.device)
        padding = F.gelu(encoder.conv2(F.gelu(encoder.conv1(silent))))[0, :, 4]  # away from both edges
        x = x + encoder.positional_embedding[:dense].to(x.dtype)
        sampled = (padding + positions).expand(mel.shape[0], -1, -1)
        x = torch.cat([x, sampled], 1).to(mel.dtype)
        for block in encoder.layers:
            x = block(x, bias)
        features: Tensor = encoder.ln_post(x)
        return features

    def counts(self, dense: int) -> list[int]:
        """The frames of the full window that each position of `compact`'s output stands for."""
        return [1] * dense + padding_blocks(dense, self.stride, self.encoder.positional_embedding.shape[0])

    def __call__(self, mel: Tensor) -> Tensor:
        _, _, index = self._layout(mel.shape[-1] // 2, mel.device, mel.dtype)
        return self.compact(mel)[:, index]


@dataclass(frozen=True)
class SampledFeatures:
    """Encoder outputs of full windows with their padding sampled, not repeated: position j of row
    b stands for `counts[b, j]` identical frames of the full window (0: padding past the row's own
    positions). Attending to one such key with a log(count) bias on its score is attending to its
    `count` copies, so the decoder's cross-attention reads n keys instead of the window's 1500."""

    features: Tensor  # [B, n, D]
    counts: Tensor  # [B, n] int64, each row summing to the window's frames

    @classmethod
    def stack(cls, rows: list[tuple[Tensor, list[int]]]) -> SampledFeatures:
        """Rows of (features [n_i, D], counts), padded to the longest."""
        width = max(len(counts) for _, counts in rows)
        first = rows[0][0]
        features = first.new_zeros(len(rows), width, first.shape[-1])
        counts = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
        for b, (f, c) in enumerate(rows):
            features[b, : len(c)] = f[: len(c)]
            counts[b, : len(c)] = torch.tensor(c)
        return cls(features, counts)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, rows: list[int]) -> SampledFeatures:
        return SampledFeatures(self.features[rows], self.counts[rows])

    def lengths(self) -> list[int]:
        """Positions in use per row."""
        return [int(n) for n in (self.counts > 0).sum(1).tolist()]

    def log_counts(self) -> Tensor:
        """[B, n] in the features' dtype: the bias on the scores of each key (-inf for padding)."""
        return self.counts.to(self.features.dtype).log()

    def expanded(self) -> Tensor:
        """The window's features [B, n_ctx, D], each position repeated over its block."""
        return torch.stack([f.repeat_interleave(c, dim=0) for f, c in zip(self.features, self.counts)])


def sampled_mel(mel: Tensor, dense: int) -> Tensor:
    """A clip's log-mel [n_mels, frames] as SampledEncoder takes it for `dense` positions."""
    return F.pad(mel[..., : 2 * dense], (0, max(0, 2 * dense - mel.shape[-1])))


def encode_sampled(encoder: AudioEncoder, mel: Tensor, stride: int) -> Tensor:
    """Features [1, n_ctx, D] of one clip's log-mel `mel` [n_mels, frames] (unpadded) in the full
    window, with the padding sampled every `stride` positions."""
    dense = dense_positions(mel.shape[-1], n_ctx=encoder.positional_embedding.shape[0])
    return SampledEncoder(encoder, stride)(sampled_mel(mel, dense)[None])


def encode_windows(
    encoder: SampledEncoder | Callable[[Tensor], Tensor],
    mels: list[Tensor],
    bucket: int,
    rows: int | None,
    compact: bool,
) -> Tensor | SampledFeatures:
    """Full windows of clips' log-mels [n_mels, frames] with their padding sampled: one encoder call
    per count of dense positions (rounded up to `bucket`), of at most `rows` windows (None: all).
    `compact` (`encoder` a SampledEncoder): SampledFeatures, unrepeated; else features [n, n_ctx, D]."""
    by_dense: dict[int, list[int]] = {}
    for i, m in enumerate(mels):
        by_dense.setdefault(dense_positions(m.shape[-1], bucket), []).append(i)
    out: list[tuple[Tensor, list[int]]] = [(mels[0], [])] * len(mels)
    step = rows or len(mels)
    for dense, group in by_dense.items():
        for index in (group[i : i + step] for i in range(0, len(group), step)):
            batch = torch.stack([sampled_mel(mels[i], dense) for i in index])
            if compact:
                assert isinstance(encoder, SampledEncoder)
                features, counts = encoder.compact(batch), encoder.counts(dense)
            else:
                features, counts = encoder(batch), []
            for i, f in zip(index, features):
                out[i] = (f, counts)
    return SampledFeatures.stack(out) if compact else torch.stack([f for f, _ in out])
