"""The engine's worker: one thread runs the in-flight batch, off the event loop.

Requests from all sessions go into one queue. The worker thread runs the in-flight batch
(engines/batching.py): between decoder steps it admits waiting requests (finals first, partials
that a newer partial of the same stream superseded are dropped, even mid-decode), runs their
encoder together, and each step advances every admitted segment by one verification forward.
On a GPU the encoder calls run on a second thread and CUDA stream (`overlap_encoder`), so the
decoder steps go on while new segments are encoded; the worker admits them when they are ready.

Faults stay with the request that caused them: when a batch raises, its requests are retried
one at a time, so only a request that fails by itself gets the exception; a crash of the worker
loop itself fails the requests it held and the loop starts again (`health()` counts restarts).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from engines import compute
from engines.batching import Batch, Decoder, Sequence
from engines.gpu.streams import own_stream, sync
from engines.scheduling import Admission, Request, fail, newest, resolve, superseded, window_frames, without_stale
from engines.speculative.drafts import draft_sources, drafters
from engines.speculative.medusa import MedusaHeads, load_heads
from engines.transcript import Transcript, shape_text, shape_words
from engines.whisper.alignment import word_timings
from engines.whisper.audio import N_FRAMES, N_SAMPLES, clip_mel, pad_mel
from engines.whisper.decoding import DecodingResult, detect_language, segment_prompt
from engines.whisper.model import Whisper
from engines.whisper.sampled import SampledEncoder, SampledFeatures, encode_windows
from engines.whisper.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engines.gpu.cuda_graphs import GraphOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

# what the encoder thread hands the worker: a group of one window length, its frames, and the
# features or the exception of its encoder call
Encoded = tuple[list[Request], int, torch.Tensor | SampledFeatures | None, Exception | None]


@dataclass
class EngineLoad:
    """Running totals of the engine's work: the worker thread writes the step figures, whichever
    thread encodes writes the encoder ones; /metrics reads them (a read may straddle one update)."""

    steps: int = 0  # decoder steps of the running batch (admission forwards not counted)
    step_rows: int = 0  # rows those steps advanced, summed
    step_seconds: float = 0.0
    encoder_calls: int = 0
    encoder_windows: int = 0  # segments those calls encoded, summed


class EngineWorker:
    """The worker side of the engine (engines/engine.py's Engine is the facade callers use): the
    queue, the worker and encoder threads, and the batch they run. The model and the settings are
    the Engine's, set before `_start_worker`."""

    device: torch.device
    dtype: torch.dtype
    model: Whisper
    tokenizer: Tokenizer
    encoder: Callable[[torch.Tensor], torch.Tensor]  # mel -> features
    suppress_tokens: list[int]
    alignment_heads: list[tuple[int, int]]
    heads_file: Path | None  # Medusa heads (engines/speculative/drafts.py), loaded by `heads`
    script: str
    window_bucket: float
    padding_stride: int  # full windows: the padding sampled every this many positions (1: all of it)
    sampled_encoder: Callable[[torch.Tensor], torch.Tensor] | None  # engines/whisper/sampled.py; None: stride 1
    dense_bucket: int  # a sampled window's dense positions rounded up to a multiple of this
    # windows per encoder call at most (None: a group's all): on the CPU one, since a call for four costs
    # what four calls cost there while its activations (hundreds of MiB for ten 20 s windows) add up
    encoder_rows: int | None
    admission: Admission
    graphs: GraphOptions | None
    node_budget: int | None
    batch: Batch

    @cached_property
    def heads(self) -> MedusaHeads | None:
        """Medusa heads, loaded where the engine's drafts use them or a request first asks for them
        (the CPU's default drafts do not: 16 MiB of the server's memory; BENCHMARKS.md, issue 25)."""
        path = self.heads_file
        return None if path is None else load_heads(path, self.model.dims).to(self.device, self.dtype).eval()

    def _start_worker(self, overlap_encoder: bool | None, prioritize_steps: bool, stall_timeout: float) -> None:
        """The queue, the worker thread and, where it overlaps, the encoder thread."""
        cuda = self.device.type == "cuda"
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
        self.prioritize_steps = (
            prioritize_steps  # the worker's CUDA stream before the encoder thread's (engines/gpu/streams.py)
        )
        self._pipeline: list[Request] = []  # admitted, with the encoder thread or its output not yet in the batch
        self._to_encode: list[Request] = []
        self._encoded: list[Encoded] = []
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

    def _running(self) -> list[Request]:
        """The requests the batch is decoding."""
        return [_request(s) for s in self.batch.active]

    def _busy(self) -> bool:
        return bool(self._queue or self._pipeline or self.batch.active or self._held)

    # -- the worker ----------------------------------------------------------------------

    def _supervise(self) -> None:
        """The worker thread. One failed batch is handled in `_run`; a crash of the loop itself
        fails the requests it held, and the loop starts again (with a growing pause if it keeps crashing)."""
        while True:
            try:
                with own_stream(self.device, high_priority=self.prioritize_steps):
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
                for request in self._held + self._running():
                    fail(request.future, error)
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
                    latest = newest(
                        self._queue + self._pipeline + self._running() + [r for group, *_ in encoded for r in group]
                    )
                    encoded = [without_stale(item, latest) for item in encoded]
                started = [r for group, *_ in encoded for r in group] + ([] if self.overlap_encoder else live)
                self._held = started
            running = self._running()
            try:
                self._compute(partial(self._work, live, encoded))
                self._progress = time.monotonic()
            except Exception as exc:  # one bad batch must not kill the worker, nor fail every request in it
                log.exception("engine step failed")
                held = list({id(r): r for r in started + running + self._running()}.values())
                self.batch = self._new_batch(self.batch.rows)
                self._isolate([r for r in held if not r.future.done()], exc)

    def _work(self, live: list[Request], encoded: list[Encoded]) -> None:
        """A round's model work: new requests encoded and admitted, then one decoder step."""
        if live and not self.overlap_encoder:
            self._start(live)
            if self.device.type == "cpu":  # what the encoder freed, glibc keeps (engines/compute.py)
                compute.release_free_memory(every=compute.TRIM_INTERVAL)
        for group, frames, features, error in encoded:
            if not group:
                continue
            if error is not None:
                self._isolate([r for r in group if not r.future.done()], error)
            elif features is not None:
                self._begin(group, frames, features)
        if self.batch.active:
            self._step()

    def _compute(self, work: Callable[[], T]) -> T:
        """On the CPU, torch work runs on the process's one compute thread (engines/compute.py)."""
        return compute.run(work) if self.device.type == "cpu" else work()

    def _encode_loop(self) -> None:
        """The encoder thread (overlap_encoder): encodes what the worker admitted, one window length
        at a time, a group holding a final first (a final handed over later still overtakes queued
        partials), on its own CUDA stream; hands the features back, or a failure with its group."""
        with own_stream(self.device):
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
                item: Encoded
                try:
                    item = (group, frames, self._encode(group, frames), None)
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
                fail(r.future, exc)
            return
        for r in held:
            r.alone = True
        with self._cv:
            self._queue[:0] = held

    def _admit(self) -> list[Request]:
        """Takes the requests that start now (caller holds the lock): finals first, then partials;
        a partial superseded by a newer request of its stream (a partial, or the segment's final) is
        answered None, queued or running."""
        latest = newest(self._queue)  # a stream's newest request: partials before it are stale, even for its final
        for s in list(self.batch.active):
            r = _request(s)
            if superseded(r, latest):
                self._compute(partial(self.batch.remove, s))
                resolve(r.future, None)
        queue = []
        for r in self._queue:
            if r.future.cancelled():
                continue
            if superseded(r, latest):
                resolve(r.future, None)
            else:
                queue.append(r)
        queue.sort(key=lambda r: (not r.final, r.seq))
        started = self._running() + self._pipeline  # rows taken, or reserved for the encoder's output
        taken = self.admission.take(queue, started, self.batch.rows)
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

    def _encode(self, group: list[Request], frames: int) -> torch.Tensor | SampledFeatures:
        """Encoder features [n, frames / 2, D] of a group of one window length (SampledFeatures:
        full windows with their padding sampled, for the eager batch)."""
        t0 = time.perf_counter()
        # on a GPU the log-mel is computed there too: on the host it costs ~10 ms per 10 s of audio
        mels = [clip_mel(self._samples(r), self.model.dims.n_mels).to(self.device, self.dtype) for r in group]
        features: torch.Tensor | SampledFeatures
        with torch.inference_mode():
            if frames == N_FRAMES and self.sampled_encoder is not None:
                features = self._encode_sampled(mels)
            else:
                padded = [pad_mel(m, frames) for m in mels]
                step = self.encoder_rows or len(padded)
                features = torch.cat(
                    [self.encoder(torch.stack(padded[i : i + step])) for i in range(0, len(padded), step)]
                )
        sync(self.device)
        for r in group:
            r.encoder_seconds += (time.perf_counter() - t0) / len(group)
        self._load.encoder_calls += 1
        self._load.encoder_windows += len(group)
        return features

    def _encode_sampled(self, mels: list[torch.Tensor]) -> torch.Tensor | SampledFeatures:
        """Full windows with their padding sampled: the eager batch (the CPU) takes them unrepeated;
        a graphed one, whose pools and graphs are shaped for whole windows, repeated."""
        assert self.sampled_encoder is not None
        compact = self.batch.runner is None and isinstance(self.sampled_encoder, SampledEncoder)
        return encode_windows(self.sampled_encoder, mels, self.dense_bucket, self.encoder_rows, compact)

    def _begin(self, group: list[Request], frames: int, encoded: torch.Tensor | SampledFeatures) -> None:
        """Admits encoded requests to the batch (beam searches run on their own). SampledFeatures go
        to the greedy batch as they are; word timings, beam search and language detection see them
        repeated over the window."""
        window: torch.Tensor | None = encoded if isinstance(encoded, torch.Tensor) else None
        if isinstance(encoded, SampledFeatures) and any(
            r.words or r.options.beam_size > 1 or r.options.language is None for r in group
        ):
            window = encoded.expanded()
        for r, f in zip(group, window if window is not None else [None] * len(group)):
            if r.words:
                r.features = f
        for i, r in enumerate(group):  # beam search runs on its own, outside the greedy batch
            if r.options.beam_size > 1:
                assert window is not None
                t1 = time.perf_counter()
                res = Decoder(self.model, self.tokenizer, self.suppress_tokens).decode(window[i : i + 1], r.options)[0]
                r.decoder_seconds += time.perf_counter() - t1
                r.future.set_result(self._transcript(r, res, frames))
        greedy = [i for i, r in enumerate(group) if r.options.beam_size == 1]
        if not greedy:
            return
        requests = [group[i] for i in greedy]
        requested = [r.options.language for r in requests]
        detected = [""] * len(greedy)  # where every request names its language
        if None in requested:
            assert window is not None
            detected = detect_language(self.model, self.tokenizer, self.model.decoder.cross_kv(window[greedy]))
        languages = [lang or d for lang, d in zip(requested, detected)]
        feats = encoded[greedy]
        seqs = self._sequences(requests, languages, feats)
        t1 = time.perf_counter()
        self.batch.admit(feats.features if isinstance(feats, SampledFeatures) else feats, seqs)
        sync(self.device)
        for r in requests:
            r.decoder_seconds += (time.perf_counter() - t1) / len(greedy)
        self._finish([s for s in seqs if s.done])

    def _sequences(
        self, requests: list[Request], languages: list[str], features: torch.Tensor | SampledFeatures
    ) -> list[Sequence]:
        """The batch's sequences of greedy requests: prompts, drafts, and the encoder positions
        each one's cross-attention sees (with their log counts where they stand for several frames)."""
        n_ctx = self.model.dims.n_text_ctx
        if isinstance(features, SampledFeatures):
            lengths, bias = features.lengths(), features.log_counts()
            biases: list[torch.Tensor | None] = [row[:n] for row, n in zip(bias, lengths)]
        else:
            lengths, biases = [features.shape[1]] * len(requests), [None] * len(requests)
        seqs = []
        for r, lang, frames, cross_bias in zip(requests, languages, lengths, biases):
            prompt, prefix = segment_prompt(self.tokenizer, lang, r.options, n_ctx)
            drafts = drafters(
                r.previous,
                r.speculative,
                self.model,
                self.heads if "medusa" in draft_sources(r.speculative) else None,  # loaded when first asked for
                self.tokenizer,
                prompt[1:prefix],
                r.options.draft_text,
            )
            seqs.append(
                Sequence(prompt, lang, r.options, drafts, frames=frames, tag=r, prefix=prefix, cross_bias=cross_bias)
            )
        return seqs

    def _samples(self, request: Request):
        if self.device.type == "cuda":
            return torch.from_numpy(request.audio).to(self.device)
        return request.audio

    def _step(self) -> None:
        t0 = time.perf_counter()
        active = list(self.batch.active)
        finished = self.batch.step()
        sync(self.device)
        seconds = time.perf_counter() - t0
        self._load.steps += 1
        self._load.step_rows += len(active)
        self._load.step_seconds += seconds
        share = seconds / len(active)
        for s in active:
            _request(s).decoder_seconds += share
        self._finish(finished)

    def _finish(self, finished: list[Sequence]) -> None:
        if finished:  # progress before the answers (the compute thread sets them before the worker wakes)
            self._progress = time.monotonic()
        for s in finished:
            if s.row >= 0:
                self.batch.remove(s)
            request = _request(s)
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
        return window_frames(len(request.audio), request.window, self.window_bucket)

    def _transcript(self, request: Request, res: DecodingResult, frames: int) -> Transcript:
        transcript = Transcript(
            text=shape_text(res.text, res.language, self.script),
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
            # timed words: one more decoder pass over the tokens (engines/whisper/alignment.py)
            t0 = time.perf_counter()
            sot = self.tokenizer.prompt(res.language, request.options.task, timestamps=True)
            args = (self.alignment_heads, features, sot, res.tokens, res.language, request.audio[:N_SAMPLES])
            transcript.words = word_timings(self.model, self.tokenizer, *args)
            shape_words(transcript.words, res.language, self.script)
            sync(self.device)
            transcript.alignment_seconds = time.perf_counter() - t0
        return transcript


def _request(sequence: Sequence) -> Request:
    """The request a sequence of the engine's batch decodes (its tag)."""
    request = sequence.tag
    assert isinstance(request, Request), "every sequence the engine admits carries its request"
    return request
