"""The engine: one model per process, shared by every session, run off the event loop.

Requests from all sessions go into one queue. A worker thread runs the in-flight batch
(engines/batching.py): between decoder steps it admits waiting requests (finals first, partials
that a newer partial of the same stream superseded are dropped, even mid-decode), runs their
encoder together, and each step advances every admitted segment by one verification forward.
On a GPU the encoder calls run on a second thread and CUDA stream (`overlap_encoder`), so the
decoder steps go on while new segments are encoded; the worker admits them when they are ready.
Model code never runs on the asyncio loop: callers await `asyncio.wrap_future`.

Faults stay with the request that caused them: when a batch raises, its requests are retried
one at a time, so only a request that fails by itself gets the exception; a crash of the worker
loop itself fails the requests it held and the loop starts again (`health()` counts restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import zlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .alignment import Word, default_heads, word_timings
from .audio import FRAMES_PER_SECOND, N_FRAMES, N_SAMPLES, SAMPLE_RATE, clip_mel, pad_mel
from .batching import Batch, Decoder, Sequence
from .checkpoints import Checkpoint, load_checkpoint
from .cuda_graphs import GraphedEncoder, GraphOptions
from .decoding import DecodingOptions, DecodingResult, detect_language, segment_prompt
from .drafts import HypothesisDrafter, MedusaDrafter
from .fp16_weights import available as fp16_available
from .fp16_weights import pack_fp16_weights
from .fused import FusedEncoder
from .lookup import LookupDrafter
from .medusa import SHIPPED_HEADS, MedusaHeads, load_heads
from .model import Whisper
from .synthetic import RANDOM_PREFIX, random_engine
from .text import chinese_pieces, chinese_text
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CUDA_MAX_BATCH, CPU_MAX_BATCH = 128, 16
CUDA_WINDOW_BUCKET, CPU_WINDOW_BUCKET = 5.0, 1.0  # seconds
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


@dataclass
class Transcript:
    """One decoded segment, with what it cost."""

    text: str  # after the text stage (Traditional Chinese, full-width punctuation, unless the script is as-is)
    tokens: list[int]
    language: str
    no_speech_prob: float
    avg_logprob: float
    looped: bool
    window_frames: int  # mel frames the encoder saw (3000 = the full 30 s window)
    encoder_seconds: float
    decoder_seconds: float
    forwards: int
    draft_proposed: dict[str, int] = field(default_factory=dict)
    draft_accepted: dict[str, int] = field(default_factory=dict)
    words: list[Word] | None = None  # timed words of a final that asked for them (seconds from the audio's start)
    alignment_seconds: float = 0.0  # what finding the word timings took

    @property
    def has_speech(self) -> bool:
        """Whisper's own rule for a silent segment, plus the blank and the loop cases."""
        if not self.text.strip():
            return False
        if self.no_speech_prob > NO_SPEECH_THRESHOLD and self.avg_logprob < LOGPROB_THRESHOLD:
            return False
        return not self.repetitive

    @property
    def repetitive(self) -> bool:
        """Whisper's compression-ratio test: text that gzip shrinks this much repeats itself."""
        data = self.text.encode()
        return len(data) >= 32 and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO_THRESHOLD

    @property
    def reliable(self) -> bool:
        """Fit to condition the next segment on: openai/whisper carries no text forward from a
        decode that needed its fallback (compression ratio or average log-probability past the
        thresholds), nor from one that looped."""
        return not (self.looped or self.repetitive or self.avg_logprob < LOGPROB_THRESHOLD)


@dataclass(eq=False)  # requests are compared by identity (they hold arrays)
class Request:
    audio: np.ndarray  # float32 mono 16 kHz
    options: DecodingOptions
    window: float | None  # seconds of silence margin after the clip; None = the full 30 s window
    previous: list[int] | None  # the segment's previous hypothesis: a draft
    speculative: str  # off | hypothesis | medusa | both
    final: bool  # finals go before partials and are never dropped
    stream: object | None  # partials of one stream supersede each other
    future: Future
    seq: int = 0
    encoder_seconds: float = 0.0
    decoder_seconds: float = 0.0
    forwards: int = 0  # spent on an earlier attempt (a short window that looped)
    alone: bool = False  # its batch failed: it is retried by itself, so that only a bad request fails
    words: bool = False  # a final that wants word timings
    features: torch.Tensor | None = None  # its encoder output, kept for the word timings until it is answered


SPECULATIVE_MODES = ("off", "hypothesis", "lookup", "medusa", "both")


@dataclass
class EngineLoad:
    """Running totals of the engine's work: the worker thread writes the step figures, whichever
    thread encodes writes the encoder ones; /metrics reads them (a read may straddle one update)."""

    steps: int = 0  # decoder steps of the running batch (admission forwards not counted)
    step_rows: int = 0  # rows those steps advanced, summed
    step_seconds: float = 0.0
    encoder_calls: int = 0
    encoder_windows: int = 0  # segments those calls encoded, summed


class Engine:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        script: str = "traditional",
        max_batch: int | None = None,
        speculative: str = "both",
        medusa: str | Path | None = None,
        cuda_graphs: bool | GraphOptions = True,
        window_bucket: float | None = None,
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
        self.model = Whisper(checkpoint.dims)
        self.model.load_state_dict(checkpoint.state_dict)
        self.model.to(self.device, self.dtype).eval().fuse()
        # on the CPU, matrix products through fbgemm's fp16 GEMM (engines/fp16_weights.py); None: where available
        if fp16_weights is None:
            fp16_weights = self.device.type == "cpu" and fp16_available()
        self.fp16_weights = fp16_weights
        if fp16_weights:
            pack_fp16_weights(self.model)
        self.tokenizer = Tokenizer(checkpoint.vocabulary)
        self.encoder = (
            self.model.encoder if encoder is None else encoder
        )  # mel -> features; engines.trtllm swaps in a TensorRT-LLM engine
        self.suppress_tokens = checkpoint.suppress_tokens
        # cross-attention heads whose weights follow the speech, for word timings (engines/alignment.py)
        dims = checkpoint.dims
        self.alignment_heads = checkpoint.alignment_heads or default_heads(dims.n_text_layer, dims.n_text_head)
        self.heads = self._load_heads(checkpoint, medusa)
        if speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}")
        self.speculative = speculative
        self.script = script
        # load tests on random weights (engines/synthetic.py): each request decodes this many tokens per
        # second of its audio, as a real model of the shape would, instead of stopping at <|endoftext|>
        self.tokens_per_second = tokens_per_second
        cuda = self.device.type == "cuda"
        # rows of the running batch: a GPU serves hundreds of streams from one batch (engines.capacity
        # measured 200 Breeze-shape streams with 128 rows, BENCHMARKS.md); a CPU gains little past a few
        max_batch = max_batch or (CUDA_MAX_BATCH if cuda else CPU_MAX_BATCH)
        # shortened encoder windows are rounded up to multiples of this many seconds, so that
        # segments of similar length share one encoder call (one call per distinct window; on a GPU
        # coarser buckets batch more partials per call, as the capacity runs measured)
        self.window_bucket = window_bucket or (CUDA_WINDOW_BUCKET if cuda else CPU_WINDOW_BUCKET)
        # partials are optional work: they may hold at most `max_partials` rows of the batch, and at most
        # `partials_per_round` start between two decoder steps, so that their encoder calls and rows
        # never stall the finals (a stream's newest partial waits; an older one is answered None)
        # (BENCHMARKS.md, capacity: on an H200 at 200 streams, 8 of 128 rows and 2 per round cut the p95 by 2/3)
        self.max_partials = (
            max_partials if max_partials is not None else (max(4, max_batch // 16) if cuda else max_batch)
        )
        self.partials_per_round = partials_per_round or (2 if cuda else max_batch)
        # on the CPU batching buys little (an encoder call for 3 windows costs what 3 calls cost) while every
        # row slows the others' steps: finals run one at a time, each as soon as possible, and no partial
        # starts beside a final; a GPU batches them all
        self.partials_beside_finals = self.concurrent_finals = cuda
        # decoder steps as CUDA graphs per batch-size bucket (engines/cuda_graphs.py); eager on the CPU
        self.graphs = None
        if self.device.type == "cuda" and cuda_graphs:
            self.graphs = cuda_graphs if isinstance(cuda_graphs, GraphOptions) else GraphOptions()
        # on a GPU a step over many rows verifies shorter drafts (engines/batching.py, node_budget)
        self.node_budget = node_budget or (128 if cuda else None)
        self.batch = self._new_batch(max_batch)
        if self.graphs is not None and self.graphs.encoder and encoder is None:
            # launch-bound at small batches without graphs; "compile" also fuses each block's pointwise work
            fused = self.graphs.mode == "compile"
            self.encoder = GraphedEncoder(FusedEncoder(self.model.encoder) if fused else self.model.encoder)
        self._queue: list[Request] = []
        self._cv = threading.Condition()
        # running totals for /metrics (load_stats), each written by one thread only, so without a lock
        self._load = EngineLoad()
        self._seq = itertools.count()
        self._closed = False
        self._held: list[Request] = []  # taken from the queue by the worker, not yet in the batch
        # on a GPU the encoder runs on a thread and CUDA stream of its own, beside the decoder steps:
        # serial admission took ~40% of the worker's time at 200 streams (BENCHMARKS.md, call J); on the
        # CPU the two would only share the same cores. None: on CUDA.
        self.overlap_encoder = cuda if overlap_encoder is None else overlap_encoder
        self.prioritize_steps = prioritize_steps  # the worker's CUDA stream before the encoder thread's (_own_stream)
        self._pipeline: list[Request] = []  # admitted, with the encoder thread or its output not yet in the batch
        self._to_encode: list[Request] = []
        self._encoded: list[tuple[list[Request], int, torch.Tensor | None, Exception | None]] = []
        self._encoder_thread: threading.Thread | None = None
        self._encoder_stop = False  # set by the worker when it exits: nothing more will be handed over
        if self.overlap_encoder:
            self._encoder_thread = threading.Thread(target=self._encode_loop, name="breeze-encoder", daemon=True)
            self._encoder_thread.start()
        self.restarts = 0  # times the worker loop crashed and was started again
        self.last_error: str | None = None
        # a worker that holds work but has finished nothing for this long is reported dead by health()
        # (a hung kernel or a deadlock: /healthz turns 503 so that an orchestrator restarts the process);
        # longer than any first compilation or graph recording
        self.stall_timeout = stall_timeout
        self._progress = time.monotonic()  # the worker's or encoder thread's last finished piece of work
        if cuda:
            torch.cuda.synchronize(
                self.device
            )  # the pools' zeros (default stream) before the worker's stream reads them
        self._worker = threading.Thread(target=self._supervise, name="breeze-engine", daemon=True)
        self._worker.start()

    def _new_batch(self, rows: int) -> Batch:
        return Batch(
            self.model,
            self.tokenizer,
            self.suppress_tokens,
            rows=rows,
            graphs=self.graphs,
            node_budget=self.node_budget,
        )

    @classmethod
    def load(cls, spec: str = "default", device: str = "auto", **kwargs) -> Engine:
        """The engine of a model spec: a checkpoint (engines.checkpoints), or `random:SHAPE`, random
        weights of a real shape for load tests (engines.synthetic)."""
        if spec.startswith(RANDOM_PREFIX):
            log.warning("model %s: RANDOM WEIGHTS of that shape, for load tests; transcripts are meaningless", spec)
            return random_engine(spec[len(RANDOM_PREFIX) :], device, **kwargs)
        return cls(load_checkpoint(spec), device=device, **kwargs)

    def _load_heads(self, checkpoint: Checkpoint, medusa: str | Path | None) -> MedusaHeads | None:
        """Medusa heads from `medusa`, else the shipped ones when they fit this model, else none."""
        if medusa is None:
            if (
                not SHIPPED_HEADS.exists()
                or checkpoint.dims.n_text_state != 512
                or "whisper-base" not in checkpoint.name
            ):
                return None
            medusa = SHIPPED_HEADS
        return load_heads(medusa, checkpoint.dims).to(self.device, self.dtype).eval()

    def drafters(
        self, previous: list[int] | None, speculative: str, context: list[int] | None = None, draft_text: str = ""
    ) -> list:
        """The draft sources of one request: the previous hypothesis first, then prompt lookup over
        `context` (the prompt's text tokens), `draft_text` (a stream's earlier finals) and the
        segment's own output, then Medusa."""
        out = []
        if speculative in ("hypothesis", "both") and previous:
            out.append(HypothesisDrafter(previous))
        if speculative in ("lookup", "both"):
            earlier = self.tokenizer.encode(" " + draft_text.strip()) if draft_text.strip() else []
            out.append(LookupDrafter([*(context or []), *earlier]))
        if speculative in ("medusa", "both") and self.heads is not None:
            out.append(MedusaDrafter(self.model, self.heads))
        return out

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
        speculative = speculative or self.speculative
        if speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {speculative!r}")
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

    def _busy(self) -> bool:
        return bool(self._queue or self._pipeline or self.batch.active or self._held)

    # -- the worker ----------------------------------------------------------------------

    def _supervise(self) -> None:
        """The worker thread. One failed batch is handled in `_run`; a crash of the loop itself
        fails the requests it held, and the loop starts again (with a growing pause if it keeps crashing)."""
        while True:
            try:
                with self._own_stream(high_priority=self.prioritize_steps):
                    self._run()
                return
            except BaseException as exc:  # noqa: BLE001 - the worker must outlive any bug
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.critical(
                    "engine worker crashed (%s); restarting it (restart %d)",
                    self.last_error,
                    self.restarts,
                    exc_info=True,
                )
                error = RuntimeError(f"the engine worker crashed: {self.last_error}")
                for request in self._held + [s.tag for s in self.batch.active]:
                    _fail(request.future, error)
                self._held = []
                self.batch = self._new_batch(self.batch.rows)
                time.sleep(min(1.0, 0.01 * 2 ** min(self.restarts, 7)))

    def _ensure_worker(self) -> None:
        """Starts a new worker thread if the last one is gone (its recovery failed)."""
        if self._worker.is_alive() or self._closed:
            return
        with self._cv:
            if self._worker.is_alive() or self._closed:
                return
            self.restarts += 1
            log.critical("the engine worker thread is gone; starting a new one")
            self._worker = threading.Thread(target=self._supervise, name="breeze-engine", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            self._held = []
            with self._cv:
                while True:
                    if self._closed and not self._busy():
                        self._encoder_stop = True
                        self._cv.notify_all()
                        return
                    # a request retried on the full window is already running; others may have been cancelled
                    live = [r for r in self._admit() if r.future.running() or r.future.set_running_or_notify_cancel()]
                    encoded, self._encoded = self._encoded, []
                    if live or encoded or self.batch.active:
                        break
                    self._cv.wait()
                if self.overlap_encoder and live:  # the encoder thread takes them; their rows stay reserved
                    self._pipeline += live
                    self._to_encode += live
                    self._cv.notify_all()
                for group, *_ in encoded:
                    self._pipeline = [r for r in self._pipeline if r not in group]
                if encoded:  # a partial that a newer request of its stream superseded while it was encoded
                    newest = _newest(
                        self._queue
                        + self._pipeline
                        + [s.tag for s in self.batch.active]
                        + [r for group, *_ in encoded for r in group]
                    )
                    encoded = [_without_stale(item, newest) for item in encoded]
                started = [r for group, *_ in encoded for r in group] + ([] if self.overlap_encoder else live)
                self._held = started
            running = [s.tag for s in self.batch.active]
            try:
                if live and not self.overlap_encoder:
                    self._start(live)
                for group, frames, features, error in encoded:
                    if not group:
                        continue
                    if error is not None:
                        self._isolate([r for r in group if not r.future.done()], error)
                    else:
                        self._begin(group, frames, features)
                if self.batch.active:
                    self._step()
                self._progress = time.monotonic()
            except Exception as exc:  # one bad batch must not kill the worker, nor fail every request in it
                log.exception("engine step failed")
                held = list({id(r): r for r in started + running + [s.tag for s in self.batch.active]}.values())
                self.batch = self._new_batch(self.batch.rows)
                self._isolate([r for r in held if not r.future.done()], exc)

    def _encode_loop(self) -> None:
        """The encoder thread (overlap_encoder): encodes what the worker admitted, one window length
        at a time, a group holding a final first (a final handed over later still overtakes queued
        partials), on its own CUDA stream; hands the features back, or a failure with its group."""
        with self._own_stream():
            while True:
                with self._cv:
                    while not self._to_encode and not self._encoder_stop:
                        self._cv.wait()
                    if not self._to_encode:
                        return
                    groups = self._by_window(self._to_encode)
                    frames = min(groups, key=lambda f: not any(r.final for r in groups[f]))
                    group = groups[frames]
                    self._to_encode = [r for r in self._to_encode if r not in group]
                try:
                    features = self._encode(group, frames)
                    item = (group, frames, features, None)
                    self._progress = time.monotonic()
                except Exception as exc:
                    log.exception("encoder call failed")
                    item = (group, frames, None, exc)
                with self._cv:
                    self._encoded.append(item)
                    self._cv.notify_all()

    def _isolate(self, held: list[Request], exc: Exception) -> None:
        """The requests of a failed batch: one that failed by itself gets the exception; several are
        retried one at a time (from the start), so only the one that fails again gets it."""
        if len(held) <= 1 or any(r.alone for r in held):
            for r in held:
                _fail(r.future, exc)
            return
        for r in held:
            r.alone = True
        with self._cv:
            self._queue[:0] = held

    def _admit(self) -> list[Request]:
        """Takes the requests that start now (caller holds the lock): finals first, then partials;
        a partial superseded by a newer request of its stream (a partial, or the segment's final) is
        answered None, queued or running."""
        latest = _newest(self._queue)  # a stream's newest request: partials before it are stale, even for its final
        for s in list(self.batch.active):
            r = s.tag
            if _superseded(r, latest):
                self.batch.remove(s)
                _resolve(r.future, None)
        queue = []
        for r in self._queue:
            if r.future.cancelled():
                continue
            if _superseded(r, latest):
                _resolve(r.future, None)
            else:
                queue.append(r)
        queue.sort(key=lambda r: (not r.final, r.seq))
        alone = [r for r in queue if r.alone]
        if alone:  # retried after a failed batch: one at a time, in an empty batch
            taken = [] if self.batch.active or self._pipeline else alone[:1]
        else:
            finals = [r for r in queue if r.final]
            started = [
                s.tag for s in self.batch.active
            ] + self._pipeline  # rows taken, or reserved for the encoder's output
            free = self.batch.rows - len(started)
            final_active = any(r.final for r in started)
            taken = finals[: free if self.concurrent_finals else min(free, int(not final_active))]
            running = sum(not r.final for r in started)
            room = min(free - len(taken), self.max_partials - running, self.partials_per_round)
            if not self.partials_beside_finals and (finals or final_active):
                room = 0
            taken += [r for r in queue if not r.final][: max(0, room)]
        self._queue = [r for r in queue if r not in taken]
        return taken

    def _start(self, requests: list[Request]) -> None:
        """Encodes new requests (grouped by window length) and admits them to the batch."""
        for frames, group in self._by_window(requests).items():
            self._begin(group, frames, self._encode(group, frames))

    def _by_window(self, requests: list[Request]) -> dict[int, list[Request]]:
        groups: dict[int, list[Request]] = {}
        for r in requests:
            groups.setdefault(self._frames(r), []).append(r)
        return groups

    def _encode(self, group: list[Request], frames: int) -> torch.Tensor:
        """Encoder features [n, frames / 2, D] of a group of one window length."""
        t0 = time.perf_counter()
        # on a GPU the log-mel is computed there too: on the host it costs ~10 ms per 10 s of audio
        mel = torch.stack([pad_mel(clip_mel(self._samples(r), self.model.dims.n_mels), frames) for r in group])
        with torch.inference_mode():
            features = self.encoder(mel.to(self.device, self.dtype))
        self._sync()
        for r in group:
            r.encoder_seconds += (time.perf_counter() - t0) / len(group)
        self._load.encoder_calls += 1
        self._load.encoder_windows += len(group)
        return features

    def _begin(self, group: list[Request], frames: int, features: torch.Tensor) -> None:
        """Admits encoded requests to the batch (beam searches run on their own)."""
        for r, f in zip(group, features):
            if r.words:
                r.features = f
        beams = [(r, f) for r, f in zip(group, features) if r.options.beam_size > 1]
        for r, f in beams:  # beam search runs on its own, outside the greedy batch
            t1 = time.perf_counter()
            res = Decoder(self.model, self.tokenizer, self.suppress_tokens).decode(f[None], r.options)[0]
            r.decoder_seconds += time.perf_counter() - t1
            r.future.set_result(self._transcript(r, res, frames))
        greedy = [(r, f) for r, f in zip(group, features) if r.options.beam_size == 1]
        if not greedy:
            return
        feats = torch.stack([f for _, f in greedy])
        languages = [r.options.language for r, _ in greedy]
        if None in languages:
            detected = detect_language(self.model, self.tokenizer, self.model.decoder.cross_kv(feats))
            languages = [lang or d for lang, d in zip(languages, detected)]
        n_ctx = self.model.dims.n_text_ctx
        prompts = [segment_prompt(self.tokenizer, lang, r.options, n_ctx) for (r, _), lang in zip(greedy, languages)]
        seqs = [
            Sequence(
                prompt,
                lang,
                r.options,
                self.drafters(r.previous, r.speculative, prompt[1:prefix], r.options.draft_text),
                frames=feats.shape[1],
                tag=r,
                prefix=prefix,
            )
            for (r, _), lang, (prompt, prefix) in zip(greedy, languages, prompts)
        ]
        t1 = time.perf_counter()
        self.batch.admit(feats, seqs)
        self._sync()
        for r, _ in greedy:
            r.decoder_seconds += (time.perf_counter() - t1) / len(greedy)
        self._finish([s for s in seqs if s.done])

    def _samples(self, request: Request):
        if self.device.type == "cuda":
            return torch.from_numpy(request.audio).to(self.device)
        return request.audio

    def _step(self) -> None:
        t0 = time.perf_counter()
        active = list(self.batch.active)
        finished = self.batch.step()
        self._sync()
        seconds = time.perf_counter() - t0
        self._load.steps += 1
        self._load.step_rows += len(active)
        self._load.step_seconds += seconds
        share = seconds / len(active)
        for s in active:
            s.tag.decoder_seconds += share
        self._finish(finished)

    def _finish(self, finished: list[Sequence]) -> None:
        for s in finished:
            if s.row >= 0:
                self.batch.remove(s)
            request = s.tag
            result = s.result(self.tokenizer)
            frames = self._frames(request)
            # short windows can loop: a final is redone on the full window; a partial keeps its
            # hypothesis without the repeated tail (Sequence.push cut it), since a full-window
            # partial would cost a 30 s encoder pass and stall the stream's next partials
            if result.looped and frames < N_FRAMES and (request.final or request.stream is None):
                log.info("repetition loop on a %d-frame window; retrying with the full window", frames)
                request.window = None
                request.forwards += result.forwards
                with self._cv:
                    self._queue.insert(0, request)
                continue
            request.future.set_result(self._transcript(request, result, frames))

    def _frames(self, request: Request) -> int:
        if request.window is None:
            return N_FRAMES
        frames = len(request.audio) // 160 + int(request.window * FRAMES_PER_SECOND)
        step = 2 * max(1, round(self.window_bucket * FRAMES_PER_SECOND / 2))  # buckets so segments batch together
        return min(N_FRAMES, math.ceil(frames / step) * step)

    def _transcript(self, request: Request, res: DecodingResult, frames: int) -> Transcript:
        text = res.text
        chinese = self.script == "traditional" and res.language in ("zh", "yue")
        if chinese:
            text = chinese_text(text)
        transcript = Transcript(
            text=text,
            tokens=res.tokens,
            language=res.language,
            no_speech_prob=res.no_speech_prob,
            avg_logprob=res.avg_logprob,
            looped=res.looped,
            window_frames=frames,
            encoder_seconds=request.encoder_seconds,
            decoder_seconds=request.decoder_seconds,
            forwards=res.forwards + request.forwards,
            draft_proposed=res.draft_proposed,
            draft_accepted=res.draft_accepted,
        )
        features, request.features = request.features, None
        if request.words and features is not None and transcript.has_speech:
            t0 = time.perf_counter()
            transcript.words = self._word_timings(request, res, features)
            if chinese:
                for word, piece in zip(transcript.words, chinese_pieces([w.text for w in transcript.words])):
                    word.text = piece
            self._sync()
            transcript.alignment_seconds = time.perf_counter() - t0
        return transcript

    def _word_timings(self, request: Request, res: DecodingResult, features: torch.Tensor) -> list[Word]:
        """Timed words of a decoded final (one more decoder pass over its tokens, engines/alignment.py)."""
        sot_sequence = self.tokenizer.prompt(res.language, request.options.task, timestamps=True)
        return word_timings(
            self.model,
            self.tokenizer,
            self.alignment_heads,
            features,
            sot_sequence,
            res.tokens,
            res.language,
            request.audio[:N_SAMPLES],
        )

    def _own_stream(self, high_priority: bool = False):
        """On CUDA, a stream of the calling thread's own (the worker's, the encoder thread's): work on
        the legacy default stream would break a graph the other thread is recording, since that
        stream synchronises with every other blocking stream. The worker's stream may take the higher
        priority, so that where its decoder steps and the encoder's kernels are both ready the GPU
        schedules the steps' blocks first (no gain measured yet: BENCHMARKS.md, fourth session)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self.device, priority=-1 if high_priority else 0))  # lower is higher

    def _sync(self) -> None:
        """Waits for this thread's CUDA stream (the encoder thread has its own)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _fail(future: Future, error: BaseException) -> None:
    """Sets an exception unless the future is settled (or its caller cancelled it) meanwhile."""
    try:
        if not future.done():
            future.set_exception(error)
    except InvalidStateError:
        pass


def _resolve(future: Future, value: object) -> None:
    """Sets a result unless the caller cancelled the future meanwhile (a client that left)."""
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def _newest(requests: list[Request]) -> dict[object, int]:
    """Each stream's newest request (its sequence number) among `requests`."""
    newest: dict[object, int] = {}
    for r in requests:
        if r.stream is not None:
            newest[r.stream] = max(newest.get(r.stream, -1), r.seq)
    return newest


def _superseded(request: Request, newest: dict[object, int]) -> bool:
    """A partial whose stream has a newer request (a partial, or the segment's final) in `newest`."""
    return not request.final and request.stream is not None and request.seq < newest.get(request.stream, -1)


def _without_stale(item: tuple, newest: dict[object, int]) -> tuple:
    """An encoded group without its superseded partials (answered None)."""
    group, frames, features, error = item
    keep = [i for i, r in enumerate(group) if not _superseded(r, newest)]
    for i in set(range(len(group))) - set(keep):
        _resolve(group[i].future, None)
    if len(keep) == len(group):
        return item
    return [group[i] for i in keep], frames, None if features is None else features[keep], error
