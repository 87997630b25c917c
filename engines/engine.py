"""The engine: one model per process, shared by every session, run off the event loop.

`Engine` is what callers use: it loads the model, takes segments (`submit`, `transcribe_async`)
and reports its health and load. Its worker (engines/worker.py) runs them in one in-flight batch on
a thread of its own; model code never runs on the asyncio loop: callers await `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engines import compute
from engines.options import SPECULATIVE
from engines.scheduling import Admission, Request
from engines.speculative.drafts import draft_sources, heads_file
from engines.transcript import Transcript
from engines.weights.checkpoints import Checkpoint, load_checkpoint
from engines.weights.fp16 import available as fp16_available
from engines.weights.fp16 import pack_fp16_weights
from engines.weights.mapped import MAPPED_NAME
from engines.whisper.alignment import default_heads
from engines.whisper.audio import FRAMES_PER_SECOND, SAMPLE_RATE
from engines.whisper.decoding import DecodingOptions
from engines.whisper.model import Whisper
from engines.whisper.sampled import SampledEncoder
from engines.whisper.tokenizer import Tokenizer
from engines.worker import EngineWorker

if TYPE_CHECKING:  # engines.gpu loads Triton (~70 MiB resident): imported on a GPU only
    from engines.gpu.cuda_graphs import GraphOptions

log = logging.getLogger(__name__)

# through the server's sockets on an H100 (BENCHMARKS.md, issue 20) 16 rows and 1 s buckets gave a p95
# at or below that of 128 rows and 5 s buckets at every count measured (300 streams: 0.66 against 0.68 s
# in one run, 0.40 against 0.47 s with finals on clip + 2 s windows), in a quarter of the GPU memory.
# On the CPU 4: the rows' cross-attention keys/values cost ~25 KB a frame each (ten streams' finals filled
# 15 rows of 1152 frames, ~430 MiB, with 16), a step's cost grows with its nodes (8 rows of drafts cost
# twice 4), and four streams' finals fit (each takes its own stream's partial's row): four staggered
# streams' final p95 1.82 s with 8 rows, 1.91 s with 4; ten streams' peak 861 -> 721-750 MiB
CUDA_MAX_BATCH, CPU_MAX_BATCH = 16, 4
CUDA_WINDOW_BUCKET, CPU_WINDOW_BUCKET = 1.0, 1.0  # seconds
CPU_PADDING_STRIDE = 4  # positions of a full window's padding that one sampled position stands for
CPU_SAMPLED_LAYOUTS = 16  # dense counts whose sampled-window layouts the CPU keeps (engines/whisper/sampled.py)
CPU_ENCODER_ROWS = 1  # windows per encoder call on the CPU (engines/worker.py)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def offline_speculative(device: str) -> str:
    """Draft sources of offline segments, which have no previous hypothesis to draft from: none on
    the CPU, where Medusa's heads and prompt lookup cost more per forward than their few accepted
    tokens save (dev set: 816 forwards in 11.7 s without drafts, 752 in 13.8 s with both, the same
    tokens; BENCHMARKS.md, issue 25); both on a GPU, where a forward's extra nodes are nearly free."""
    return "off" if resolve_device(device).type == "cpu" else "both"


def streaming_speculative(device: torch.device) -> str:
    """Draft sources of streaming segments: the previous hypothesis and prompt lookup on the CPU,
    where Medusa's heads cost more than they save there too (every proposal runs the heads and an
    output projection, and they were right for 2.5% of their nodes on the dev set: four streams'
    final p95 2.99 -> 1.68 s without them; BENCHMARKS.md, issue 25); all three on a GPU."""
    return "hypothesis+lookup" if device.type == "cpu" else "both"


def _known(speculative: str) -> str:
    """`speculative` where it names a draft mode (engines/options.py), else a ValueError."""
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {speculative!r}")
    return speculative


class Engine(EngineWorker):
    """One model and the worker that serves it; thread-safe, shared by every session."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        script: str = "traditional",
        max_batch: int | None = None,
        speculative: str | None = None,
        medusa: str | Path | None = None,
        cuda_graphs: bool | GraphOptions = True,
        window_bucket: float | None = None,
        padding_stride: int | None = None,
        encoder=None,
        max_partials: int | None = None,
        partials_per_round: int | None = None,
        node_budget: int | None = None,
        fp16_weights: bool | None = None,
        overlap_encoder: bool | None = None,
        stall_timeout: float = 120.0,
        prioritize_steps: bool = True,
        tokens_per_second: float | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name = checkpoint.name

        self.speculative = _known(speculative or streaming_speculative(self.device))
        self.heads_file = heads_file(checkpoint, medusa)

        def load() -> None:
            self._load_model(checkpoint, fp16_weights, encoder)
            if medusa is not None or "medusa" in draft_sources(self.speculative):
                _ = self.heads  # now: a named file fails at the start, and the default drafts use them
            if self.device.type == "cpu":
                compute.release_free_memory()

        # on the CPU on the compute thread, like all of the engine's torch work (engines/compute.py)
        compute.run(load) if self.device.type == "cpu" else load()
        self.script = script
        # load tests on random weights (engines/synthetic.py): each request decodes this many tokens per
        # second of its audio, as a real model of the shape would, instead of stopping at <|endoftext|>
        self.tokens_per_second = tokens_per_second
        self._configure_batch(max_batch, window_bucket, max_partials, partials_per_round, cuda_graphs, node_budget)
        # full 30 s windows with the silence padding sampled (engines/whisper/sampled.py): on the CPU
        # 2-3x less encoder time at the dev set's accuracy (BENCHMARKS.md, issue 25); a GPU computes it all
        if padding_stride is not None and padding_stride < 1:
            raise ValueError(f"padding_stride must be >= 1, got {padding_stride}")
        self.padding_stride = padding_stride or (1 if self.device.type == "cuda" else CPU_PADDING_STRIDE)
        # an encoder swapped in (TensorRT-LLM's) computes whole windows
        self.sampled_encoder = None
        if self.padding_stride > 1 and encoder is None:
            layouts = None if self.device.type == "cuda" else CPU_SAMPLED_LAYOUTS
            self.sampled_encoder = SampledEncoder(self.model.encoder, self.padding_stride, layouts)
        # on a GPU one graph per count of dense positions: counted in window buckets
        self.dense_bucket = round(self.window_bucket * FRAMES_PER_SECOND / 2) if self.device.type == "cuda" else 1
        self.encoder_rows = None if self.device.type == "cuda" else CPU_ENCODER_ROWS
        if self.graphs is not None and self.graphs.encoder and encoder is None:
            from engines.gpu.encoder_graphs import GraphedEncoder
            from engines.gpu.fused import FusedEncoder

            # launch-bound at small batches without graphs; "compile" also fuses each block's pointwise work
            fused = self.graphs.mode == "compile"
            self.encoder = GraphedEncoder(FusedEncoder(self.model.encoder) if fused else self.model.encoder)
            if self.sampled_encoder is not None:
                self.sampled_encoder = GraphedEncoder(self.sampled_encoder)
        self._start_worker(overlap_encoder, prioritize_steps, stall_timeout)

    def _load_model(self, checkpoint: Checkpoint, fp16_weights: bool | None, encoder) -> None:
        """The model on its device, its tokenizer and suppressed tokens, the encoder to call."""
        self.model = Whisper(checkpoint.dims)
        self.model.load_state_dict(checkpoint.state_dict)
        self.model.to(self.device, self.dtype).eval().fuse()
        # on the CPU, matrix products through fbgemm's fp16 GEMM (engines/weights/fp16.py); None: where available
        if fp16_weights is None:
            fp16_weights = self.device.type == "cpu" and fp16_available()
        self.fp16_weights = fp16_weights
        if fp16_weights:
            pack_fp16_weights(self.model, checkpoint.state_dict.get(MAPPED_NAME))
        self.tokenizer = Tokenizer(checkpoint.vocabulary)
        self.encoder = (
            self.model.encoder if encoder is None else encoder
        )  # mel -> features; engines.trtllm swaps in a TensorRT-LLM engine
        self.suppress_tokens = checkpoint.suppress_tokens
        # cross-attention heads whose weights follow the speech, for word timings (engines/whisper/alignment.py)
        dims = checkpoint.dims
        self.alignment_heads = checkpoint.alignment_heads or default_heads(dims.n_text_layer, dims.n_text_head)

    def _configure_batch(
        self,
        max_batch: int | None,
        window_bucket: float | None,
        max_partials: int | None,
        partials_per_round: int | None,
        cuda_graphs: bool | GraphOptions,
        node_budget: int | None,
    ) -> None:
        """The running batch and the admission rules, with the device's defaults where not given."""
        cuda = self.device.type == "cuda"
        # rows of the running batch: on a GPU, 16 rows serve 300-400 streams through the sockets (above);
        # a CPU gains little past a few
        max_batch = max_batch or (CUDA_MAX_BATCH if cuda else CPU_MAX_BATCH)
        # shortened encoder windows are rounded up to multiples of this many seconds, so that
        # segments of similar length share one encoder call (one call per distinct window; coarser
        # buckets batched more partials per call in the engine-only capacity runs, but their longer
        # windows cost more than they saved through the sockets)
        self.window_bucket = window_bucket or (CUDA_WINDOW_BUCKET if cuda else CPU_WINDOW_BUCKET)
        # partials are optional work, finals never wait for them (engines/scheduling.py)
        self.admission = Admission.for_device(cuda, max_batch, max_partials, partials_per_round)
        # decoder steps as CUDA graphs per batch-size bucket (engines/gpu/cuda_graphs.py); eager on the CPU
        self.graphs = None
        if self.device.type == "cuda" and cuda_graphs:
            from engines.gpu.cuda_graphs import GraphOptions

            self.graphs = cuda_graphs if isinstance(cuda_graphs, GraphOptions) else GraphOptions()
        # on a GPU a step over many rows verifies shorter drafts (engines/batching.py, node_budget)
        self.node_budget = node_budget or (128 if cuda else None)
        self.batch = self._new_batch(max_batch)

    @classmethod
    def load(cls, spec: str = "default", device: str = "auto", **kwargs) -> Engine:
        """The engine of a checkpoint spec (engines.weights.checkpoints); `random:SHAPE` models are
        engines.backend.create_engine's. On the CPU the checkpoint is read on the compute thread too
        (engines/compute.py: a parallel region on the caller's thread, where that thread lives on, would
        leave a second OpenMP team beside the compute thread's)."""
        if resolve_device(device).type == "cpu":
            return cls(compute.run(lambda: load_checkpoint(spec)), device=device, **kwargs)
        return cls(load_checkpoint(spec), device=device, **kwargs)

    # -- submitting work ---------------------------------------------------------------

    def submit(
        self,
        audio: np.ndarray,
        options: DecodingOptions = DecodingOptions(),
        *,
        window: float | None = None,
        previous: list[int] | None = None,
        speculative: str | None = None,
        final: bool = True,
        stream: object | None = None,
        words: bool = False,
    ) -> Future:
        """Queues one segment; the future gets a Transcript, or None when a newer partial of the
        same stream superseded this one. `words`: a final's transcript carries word timings
        (partials never do: they stay cheap)."""
        speculative = _known(speculative or self.speculative)
        if self.tokens_per_second is not None:
            length = max(1, math.ceil(self.tokens_per_second * len(audio) / SAMPLE_RATE))
            options = replace(options, max_new_tokens=length)
        request = Request(
            np.array(audio, dtype=np.float32),
            options,
            window,
            previous,
            speculative,
            final,
            stream,
            Future(),
            words=words and final,
        )
        self._ensure_worker()
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            request.seq = next(self._seq)
            if not self._busy():  # an idle engine has nothing to be late with: its clock starts now
                self._progress = time.monotonic()
            self._queue.append(request)
            self._cv.notify_all()
        return request.future

    async def transcribe_async(
        self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs
    ) -> Transcript | None:
        return await asyncio.wrap_future(self.submit(audio, options, **kwargs))

    def transcribe(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs) -> Transcript:
        return self.submit(audio, options, **kwargs).result()

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=timeout)
        if self._encoder_thread is not None:
            self._encoder_thread.join(timeout=timeout)

    def health(self) -> dict:
        """The worker's state, for /healthz: alive (running, and not stalled with work in hand),
        restarts after crashes, the last crash, seconds without progress while holding work."""
        self._ensure_worker()
        stalled = time.monotonic() - self._progress if self._busy() else 0.0
        return {
            "alive": self._worker.is_alive() and stalled < self.stall_timeout,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "stalled_s": round(stalled, 1),
            "queued": len(self._queue),
            "encoding": len(self._pipeline),
            "running": len(self.batch.active),
        }

    def load_stats(self) -> dict[str, float]:
        """How loaded the engine is, for /metrics: running totals of decoder steps, the rows they
        advanced (rows / steps is the batch occupancy), their seconds, encoder calls and the windows
        they encoded; and now: requests waiting in the queue, rows in the batch."""
        load = self._load
        return {
            "steps": load.steps,
            "step_rows": load.step_rows,
            "step_seconds": load.step_seconds,
            "encoder_calls": load.encoder_calls,
            "encoder_windows": load.encoder_windows,
            "queued": len(self._queue),
            "running": len(self.batch.active),
        }
