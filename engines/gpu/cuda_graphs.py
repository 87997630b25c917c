"""Decoder steps replayed as CUDA graphs, one graph per shape bucket.

A decoder step of the Breeze shape (32 layers) launches about a thousand small kernels; at
batch 1 the GPU then waits on Python far longer than it computes (17 ms eager against a
0.6 ms memory floor on an H100). A CUDA graph records those launches once and replays them
in one call, but it bakes in every shape and every address. What makes that possible here:

- the running batch (engines/batching.py) keeps its sequences on rows 0..n-1 of fixed pools
  (self-attention cache, cross-attention keys/values), so a step reads the leading slices
  `pool[:B]`, whose addresses never change;
- a step's inputs (tokens, positions, cache slots, masks) are copied into static buffers
  allocated once per shape, and the outputs (hidden states, logits) land in static buffers;
- shapes are bucketed: the batch n is padded up to a batch bucket B (1, 2, 4, ... rows) with
  no-op rows, the draft width to a width bucket, the cross-attention frames to a frame bucket
  (rows with fewer frames are masked), and the self-attention keys read to a context bucket
  (no sequence in the step reaches further).

A no-op row sits on a free row of the pools (rows n..B-1 hold no sequence), writes its keys
and values into slot n_ctx - 1 and attends to slot 0 and to its cross frames: finite garbage
nobody reads. Slot n_ctx - 1 is never visible to a real node (a sequence's nodes end at slot
n_ctx - 2, see Sequence.cap), so even a clamped padding node writing there is harmless.

Three modes share the same static-buffer step, so they compute the same function:
`graph` (torch.cuda.CUDAGraph, captured lazily per bucket into one shared memory pool),
`compile` (the regions between attention calls compiled by Inductor, engines/gpu/fused.py, and the
step then recorded into the same kind of graph: fewer, fused kernels), and `eager` (the same step
run directly: the reference, and the only mode on the CPU). In the graphed modes, buckets of at
most 16 rows (batch x width) run through hand-written Triton kernels instead (`row_kernels`,
engines/gpu/decode_kernels.py: eight or nine kernels per layer), which is what a lightly loaded GPU steps;
larger buckets keep PyTorch's projections but take their self-attention and its cache writes
from one Triton kernel (`attention_kernel`, engines/gpu/decode_attention.py).

Apart: the draft tree's input layout (engines/gpu/step_inputs.py), the variable-length
cross-attention and its autotuner (engines/gpu/cross_attention.py), the graphed encoder
(engines/gpu/encoder_graphs.py).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from engines.gpu import decode_attention, decode_kernels, row_kernels
from engines.gpu.cross_attention import KeyLengths, choose_cross_attention
from engines.gpu.fused import FusedDecoder
from engines.whisper.model import KVCache, Whisper

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WIDTH_BUCKETS = (1, 4, 9)  # a plain step; a prompt (sot, language, task, notimestamps); last token + 8 draft nodes
FRAME_BUCKETS = (256, 512, 768, 1024, 1500)  # encoder frames (50 per second): 5.1, 10.2, 15.4, 20.5, 30 s
CONTEXT_BUCKETS = (64, 128, 256, 448)  # self-attention cache slots read
MODES = ("graph", "compile", "eager")
# one recording at a time in the process: torch.cuda.graph synchronises the device when it starts, which
# another thread's recording in progress does not allow (the engine encodes on a thread of its own)
CAPTURE_LOCK = threading.Lock()
CROSS_ATTENTION = ("auto", "sdpa", "efficient", "flash")
log = logging.getLogger(__name__)


def bucket(n: int, buckets: tuple[int, ...] | list[int]) -> int:
    """The smallest bucket >= n; n itself past the largest (a shape of its own)."""
    return next((b for b in buckets if b >= n), n)


@dataclass(frozen=True)
class GraphOptions:
    mode: str = "graph"
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    width_buckets: tuple[int, ...] = WIDTH_BUCKETS
    frame_buckets: tuple[int, ...] = FRAME_BUCKETS
    context_buckets: tuple[int, ...] = CONTEXT_BUCKETS
    fused_cross_kv: bool = True  # one matrix product for every layer's cross keys/values at admission
    # cross-attention over rows of different window lengths: "sdpa" (a frame bucket, shorter rows
    # masked: every row reads the bucket's frames), "efficient" / "flash" (variable-length kernels
    # that read each row's own frames from the full-window pools), "auto" (the fastest of those
    # that pass a check on this GPU; sdpa on the CPU)
    cross_attention: str = "auto"
    encoder: bool = True  # the engine also replays its encoder as CUDA graphs (GraphedEncoder)
    # steps of at most row_kernels.MAX_ROWS rows (batch x width) through the Triton row kernels
    # (engines/gpu/decode_kernels.py, row_kernels.py): None = on CUDA where Triton is installed
    row_kernels: bool | None = None
    # steps of more rows: self-attention with its cache writes as one Triton kernel (engines/gpu/decode_attention.py)
    # instead of two scatters and cuDNN's attention; None = on CUDA where Triton is installed
    attention_kernel: bool | None = None
    # the vocabulary projection's rows padded with zeros to a multiple of this; None = 64 on CUDA, where with
    # Whisper's odd vocabulary (51865) cuBLAS took an unaligned kernel (253 us against ~50 at 64 rows on an
    # H100; BENCHMARKS.md, seventh session), 1 on the CPU (where the padded copy would only cost memory)
    vocab_multiple: int | None = None
    # while a thread of the runner records a new bucket's graph, its steps run in the smallest recorded
    # bucket that holds them (more padding rows, a longer context), eagerly where none does: recording
    # takes 0.2-0.5 s, which would stall every stream in the batch (False: record before the step)
    record_in_background: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"graph mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cross_attention not in CROSS_ATTENTION:
            raise ValueError(
                f"cross_attention must be one of {', '.join(CROSS_ATTENTION)}, got {self.cross_attention!r}"
            )


@dataclass
class _Buffers:
    """Static inputs and outputs of one (batch, width) bucket."""

    tokens: Tensor  # [B, W] int64
    positions: Tensor  # [B, W] int64
    slots: Tensor  # [B, W] int64
    hidden: Tensor  # [B, W, D] model dtype
    scores: Tensor  # [B*W, V'] model dtype: the vocabulary projection's output, V' = V padded (StepRunner.vocab_rows)
    logits: Tensor  # [B, W, V]: a view of the first V columns of `scores` (made float32 outside the graph)
    masks: dict[int, Tensor] = field(default_factory=dict)  # context bucket -> [B, 1, W, C] additive (0 / -inf)
    cross_masks: dict[int, Tensor] = field(default_factory=dict)  # frame bucket -> [B, 1, 1, F] additive
    key_lengths: KeyLengths | None = None  # variable-length cross-attention (full-window pools)


@dataclass
class RunnerStats:
    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    eager: int = 0
    stand_ins: int = 0  # steps run in a larger recorded bucket while theirs was being recorded
    keys: set = field(default_factory=set)


class StepRunner:
    """Runs decoder steps over rows 0..n-1 of a batch's pools, bucketed and (on CUDA) graphed."""

    def __init__(
        self, model: Whisper, cache: KVCache, cross_k: Tensor, cross_v: Tensor, options: GraphOptions = GraphOptions()
    ):
        self.model, self.cache, self.cross_k, self.cross_v = model, cache, cross_k, cross_v
        assert isinstance(cache.k, Tensor), "a graphed step's cache is one static tensor, not grown layers"
        self.device = cache.k.device
        mode = options.mode
        if mode != "eager" and self.device.type != "cuda":
            mode = "eager"  # graphs need CUDA; the same bucketed step still runs (and is tested) on the CPU
        self.mode = mode
        self.options = options
        dims = model.dims
        self.rows = cache.k.shape[1]
        self.n_ctx = dims.n_text_ctx
        self.n_frames = cross_k.shape[3]
        self.batch_buckets = tuple(sorted({b for b in options.batch_buckets if b < self.rows} | {self.rows}))
        self.width_buckets = tuple(sorted(options.width_buckets))
        self.frame_buckets = tuple(sorted({f for f in options.frame_buckets if f < self.n_frames} | {self.n_frames}))
        self.context_buckets = tuple(sorted({c for c in options.context_buckets if c < self.n_ctx} | {self.n_ctx}))
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._steps: dict[tuple, Callable[[], None]] = {}
        self._lock = threading.Lock()  # buffers made by the worker or the recording thread
        self._queued: set[tuple] = set()  # keys handed to the recording thread
        self._recorder: ThreadPoolExecutor | None = None
        graphed = self.mode != "eager"
        self._pool = torch.cuda.graph_pool_handle() if graphed else None
        # warm-up runs before a capture, and the recording thread's captures, each on a stream of its own
        self._warm_stream = torch.cuda.Stream(self.device) if graphed else None
        self._recording_stream = torch.cuda.Stream(self.device) if graphed else None
        self._cross_weight: Tensor | None = None
        multiple = options.vocab_multiple or (64 if self.device.type == "cuda" else 1)
        self.vocab_rows = -(-dims.n_vocab // multiple) * multiple
        embedding = model.decoder.token_embedding.weight.to(cache.dtype)  # the vocabulary projection, padded
        pad = self.vocab_rows - dims.n_vocab
        self._vocab_weight = torch.nn.functional.pad(embedding, (0, 0, 0, pad)) if pad else embedding
        self.stats = RunnerStats()
        self.cross_attention = options.cross_attention
        if self.device.type != "cuda":
            self.cross_attention = "sdpa"
        elif self.cross_attention == "auto":
            self.cross_attention = choose_cross_attention(
                dims.n_text_head, dims.n_text_state // dims.n_text_head, self.n_frames, cache.dtype, self.device
            )
        attention_kernel = self._triton(options.attention_kernel, decode_attention)
        self.fused = None  # the step through fused.py's regions: compiled, or plain with the attention kernel
        if self.mode == "compile" or attention_kernel:
            self.fused = FusedDecoder(
                model.decoder, backend="inductor" if self.mode == "compile" else None, attention_kernel=attention_kernel
            )
        self.kernels = None
        if self._triton(options.row_kernels, row_kernels):
            self.kernels = decode_kernels.KernelDecoder(
                model.decoder, dependent=row_kernels.dependent_launch(self.device)
            )

    def _triton(self, wanted: bool | None, kernels) -> bool:
        """An option for one of our Triton kernels: as given, or (None) in the graphed modes where Triton is."""
        return wanted if wanted is not None else self.mode != "eager" and kernels.available()

    # -- shapes ---------------------------------------------------------------------------------

    def width(self, width: int) -> int:
        return bucket(width, self.width_buckets)

    def key(self, n: int, width: int, max_slot: int, frames: list[int]) -> tuple[int, int, int, int, bool]:
        """(batch, width, frames, context, masked) of a step over n rows."""
        f = self.n_frames if self.cross_attention != "sdpa" else bucket(max(frames), self.frame_buckets)
        return (
            bucket(n, self.batch_buckets),
            width,
            f,
            bucket(max_slot + 1, self.context_buckets),
            any(x != f for x in frames),
        )

    def _io(self, batch: int, width: int) -> _Buffers:
        """The static buffers of a (batch, width) bucket, made once (the worker and the recording
        thread may both ask)."""
        io = self._buffers.get((batch, width))
        if io is None:
            with self._lock:
                io = self._buffers.get((batch, width))
                if io is None:
                    io = self._buffers[(batch, width)] = self._new_io(batch, width)
        return io

    def _new_io(self, batch: int, width: int) -> _Buffers:
        dims, dev = self.model.dims, self.device
        dtype = self.cache.dtype
        scores = torch.zeros((batch * width, self.vocab_rows), dtype=dtype, device=dev)
        return _Buffers(
            tokens=torch.zeros((batch, width), dtype=torch.long, device=dev),
            positions=torch.zeros((batch, width), dtype=torch.long, device=dev),
            slots=torch.full((batch, width), self.n_ctx - 1, dtype=torch.long, device=dev),
            hidden=torch.zeros((batch, width, dims.n_text_state), dtype=dtype, device=dev),
            scores=scores,
            logits=scores.view(batch, width, -1)[..., : dims.n_vocab],
        )

    def _masks(self, key, io: _Buffers | None = None) -> tuple[Tensor, Tensor | KeyLengths | None]:
        """The self- and cross-attention masks of `key` among `io`'s (default: the bucket's static buffers)."""
        batch, width, frames, context, masked = key
        io = io or self._io(batch, width)
        with self._lock:
            mask = io.masks.get(context)
            if (
                mask is None
            ):  # additive (0 / -inf) in the model's dtype: SDPA would convert a boolean one in every layer
                mask = io.masks[context] = torch.full(
                    (batch, 1, width, context), -math.inf, dtype=self.cache.dtype, device=self.device
                )
                mask[:, :, :, 0] = 0
            cross_mask: Tensor | KeyLengths | None = None
            if masked and self.cross_attention != "sdpa":
                if io.key_lengths is None:
                    io.key_lengths = KeyLengths(
                        self.cross_attention, batch, self.model.dims.n_text_head, width, frames, self.device
                    )
                cross_mask = io.key_lengths
            elif masked:
                cross_mask = io.cross_masks.get(frames)
                if cross_mask is None:
                    cross_mask = io.cross_masks[frames] = torch.zeros(
                        (batch, 1, 1, frames), dtype=self.cache.dtype, device=self.device
                    )
        return mask, cross_mask

    # -- the step ---------------------------------------------------------------------------------

    def body(self, key, io: _Buffers | None = None) -> None:
        """The step itself over the static buffers of `key` (what a graph records), or over `io`."""
        batch, width, frames, context, masked = key
        io = io or self._io(batch, width)
        mask, cross_mask = self._masks(key, io)
        decoder = self.model.decoder
        cross = [
            (self.cross_k[layer, :batch, :, :frames], self.cross_v[layer, :batch, :, :frames])
            for layer in range(self.model.dims.n_text_layer)
        ]
        if self.kernels is not None and batch * width <= row_kernels.MAX_ROWS:
            hidden = self.kernels.hidden(io.tokens, io.positions, self.cache, cross, mask, cross_mask, io.slots)
        elif self.fused is not None:
            hidden = self.fused.hidden(io.tokens, io.positions, self.cache, cross, mask, cross_mask, io.slots)
        else:
            hidden = decoder.hidden(io.tokens, io.positions, self.cache, None, cross, mask, cross_mask, slots=io.slots)
        io.hidden.copy_(hidden)
        torch.mm(hidden.flatten(0, 1), self._vocab_weight.T, out=io.scores)

    def _step_fn(self, key) -> Callable[[], None]:
        """The step of `key`, recorded now if it is not yet (on the calling thread)."""
        fn = self._steps.get(key)
        if fn is not None:
            return fn
        if self.mode == "eager":
            fn = functools.partial(self.body, key)
        else:
            with CAPTURE_LOCK:
                fn = self._steps.get(key) or self._record(key)
        self._steps[key] = fn
        return fn

    def _record(self, key) -> Callable[[], None]:
        """Warm-up runs (where Triton and the compile mode compile) over scratch buffers of the
        bucket's shape, then the graph of `key` over its static buffers; returns its replay. The
        warm-up runs execute: their rows are no-op rows (keys and values to slot n_ctx - 1), and
        their inputs and outputs are their own, so a step running meanwhile keeps its buffers.
        Caller holds CAPTURE_LOCK."""
        t0 = time.perf_counter()
        batch, width = key[:2]
        scratch = self._new_io(batch, width)
        assert self._warm_stream is not None, "steps are recorded in the graphed modes only"
        self._masks(key)  # the static masks exist before recording (made inside, their fills would be recorded)
        self._reset(key, scratch)
        self._warm_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._warm_stream):
            for _ in range(2):
                self.body(key, scratch)
        torch.cuda.current_stream(self.device).wait_stream(self._warm_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.body(key)
        self.stats.captures += 1
        self.stats.capture_seconds += time.perf_counter() - t0
        return graph.replay

    def _record_later(self, key) -> None:
        """Queues `key` for the recording thread (once)."""
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
            if self._recorder is None:
                self._recorder = ThreadPoolExecutor(1, thread_name_prefix="breeze-graphs")
        self._recorder.submit(self._record_queued, key)

    def _record_queued(self, key) -> None:
        """The recording thread: records `key` on a stream of its own and publishes its replay; a
        bucket whose recording fails stays eager (it stays queued, so it is not tried again; logged)."""
        try:  # inference mode is per thread: without it the warm-up runs would track gradients
            with torch.inference_mode(), torch.cuda.stream(self._recording_stream), CAPTURE_LOCK:
                self._steps[key] = self._record(key)
        except Exception:
            log.exception("recording the decoder step %s failed; it stays eager", key)

    def _reset(self, key, io: _Buffers) -> None:
        """Every row of `io` a no-op row (before warm-up runs that really execute)."""
        mask, cross_mask = self._masks(key, io)
        io.tokens.zero_()
        io.positions.zero_()
        io.slots.fill_(self.n_ctx - 1)
        mask.fill_(-math.inf)
        mask[:, :, :, 0] = 0
        if isinstance(cross_mask, KeyLengths):
            cross_mask.used.fill_(1)
        elif cross_mask is not None:
            cross_mask.zero_()

    def prepare(
        self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, mask: np.ndarray, frames: list[int]
    ) -> tuple:
        """Copies one step's inputs (rows 0..n-1; mask [n, W, n_ctx]) into the static buffers of
        its bucket, no-op rows after them; returns the bucket key."""
        n, width = tokens.shape
        key = self._stand_in(self.key(n, width, int(slots.max()), frames))
        batch, _, n_frames, context, masked = key
        io = self._io(batch, width)
        mask_buf, cross_buf = self._masks(key)
        pad = batch - n
        t = np.zeros((3, batch, width), dtype=np.int64)
        t[0, :n], t[1, :n], t[2, :n] = tokens, positions, slots
        t[2, n:] = self.n_ctx - 1
        m = np.zeros((batch, 1, width, context), dtype=bool)
        m[:n, 0] = mask[:, :, :context]
        if pad:
            m[n:, :, :, 0] = True
        staged = torch.from_numpy(t)
        io.tokens.copy_(staged[0])
        io.positions.copy_(staged[1])
        io.slots.copy_(staged[2])
        mask_buf.copy_(torch.from_numpy(np.where(m, 0.0, -np.inf).astype(np.float32)))
        if isinstance(cross_buf, KeyLengths):
            lengths = np.ones(batch, dtype=np.int32)
            lengths[:n] = frames
            cross_buf.set(lengths)
        elif cross_buf is not None:  # masked
            cm = np.ones((batch, 1, 1, n_frames), dtype=bool)
            cm[:n, 0, 0] = np.arange(n_frames)[None, :] < np.asarray(frames)[:, None]
            cross_buf.copy_(torch.from_numpy(np.where(cm, 0.0, -np.inf).astype(np.float32)))
        return key

    def _stand_in(self, key):
        """`key`, unless its graph is still to be recorded in the background: then it is queued for
        the recording thread, and its rows run in the smallest recorded bucket that holds them (same
        width and frames, at least as many rows and context positions, a cross mask if it needs one:
        a graph with padding rows is several times faster than the eager step), or in `key` itself,
        eagerly, where none does."""
        if self.mode == "eager" or not self.options.record_in_background or key in self._steps:
            return key
        self._record_later(key)
        batch, width, frames, context, masked = key
        holders = [
            k
            for k in list(self._steps)  # list(): the recording thread adds keys meanwhile
            if k[1] == width and k[2] == frames and k[0] >= batch and k[3] >= context and k[4] >= masked
        ]
        if not holders:
            return key
        self.stats.stand_ins += 1
        return min(holders)

    def launch(self, key) -> None:
        """Runs the step of `key` (from prepare): its graph; a bucket whose recording prepare queued
        (record_in_background) runs eagerly this time, else it is recorded first."""
        fn = self._steps.get(key)
        if fn is None and self.mode != "eager" and self.options.record_in_background:
            self.body(key)
            self.stats.eager += 1
        else:
            (fn or self._step_fn(key))()
            if self.mode == "eager":
                self.stats.eager += 1
            else:
                self.stats.replays += 1
        self.stats.keys.add(key)

    def outputs(self, key, n: int) -> tuple[Tensor, Tensor]:
        """(logits float32 [n, W, V], hidden [n, W, D]) of the last launch of `key`; the hidden
        states are a view of a static buffer, valid until the next step of that bucket."""
        io = self._io(key[0], key[1])
        return io.logits[:n].float(), io.hidden[:n]

    def forward(
        self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, mask: np.ndarray, frames: list[int]
    ) -> tuple[Tensor, Tensor]:
        key = self.prepare(tokens, positions, slots, mask, frames)
        self.launch(key)
        return self.outputs(key, tokens.shape[0])

    # -- admission ------------------------------------------------------------------------------

    @torch.inference_mode()
    def store_cross(self, features: Tensor, first: int) -> None:
        """Cross-attention keys/values of `features` [k, frames, D] into rows first..first+k-1 of
        the pools: with `fused_cross_kv`, one matrix product for all layers instead of two per layer."""
        decoder, dims = self.model.decoder, self.model.dims
        k, frames = features.shape[:2]
        if not self.options.fused_cross_kv:
            for layer, (key, value) in enumerate(decoder.cross_kv(features)):
                self.cross_k[layer, first : first + k, :, :frames] = key
                self.cross_v[layer, first : first + k, :, :frames] = value
            return
        if self._cross_weight is None:
            weights, biases = [], []
            for block in decoder.layers:
                attn, _ = block.cross_layers()
                weights += [attn.key.weight, attn.value.weight]
                biases += [torch.zeros_like(attn.value.bias), attn.value.bias]
            self._cross_weight = torch.cat(weights).to(self.cache.dtype)
            self._cross_bias = torch.cat(biases).to(self.cache.dtype)
        heads = dims.n_text_head
        chunk = max(1, (1 << 30) // (frames * self._cross_weight.shape[0] * self._cross_weight.element_size()))
        for lo in range(0, k, chunk):  # about 1 GB of keys/values at a time
            hi = min(k, lo + chunk)
            out = torch.nn.functional.linear(features[lo:hi].to(self.cache.dtype), self._cross_weight, self._cross_bias)
            out = out.view(hi - lo, frames, dims.n_text_layer, 2, heads, -1).permute(
                3, 2, 0, 4, 1, 5
            )  # [2, L, k, H, F, Dh]
            self.cross_k[:, first + lo : first + hi, :, :frames] = out[0]
            self.cross_v[:, first + lo : first + hi, :, :frames] = out[1]

    def capture(self, keys) -> None:
        """Records the steps of `keys` ahead of use (a server's warm-up)."""
        for key in keys:
            self._step_fn(key)
