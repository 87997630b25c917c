"""The engine: one model per process, shared by every session, run off the event loop.

Requests from all sessions go into one queue; a worker thread takes whatever is waiting,
finals first, drops partial work that a newer partial of the same stream has superseded,
batches segments that share decoding options and window length through one encoder call and
one lockstep decode, and resolves each request's future. Model code never runs on the
asyncio loop: callers await `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .audio import FRAMES_PER_SECOND, N_FRAMES, clip_mel, pad_mel
from .checkpoints import Checkpoint, load_checkpoint
from .decoding import Decoder, DecodingOptions, DecodingResult, Drafter
from .model import Whisper
from .text import to_traditional
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

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

    text: str  # after the text stage (Traditional Chinese unless the script is as-is)
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

    @property
    def has_speech(self) -> bool:
        """Whisper's own rule for a silent segment, plus the blank and the loop cases."""
        if not self.text.strip():
            return False
        if self.no_speech_prob > NO_SPEECH_THRESHOLD and self.avg_logprob < LOGPROB_THRESHOLD:
            return False
        data = self.text.encode()
        return len(data) / len(zlib.compress(data)) <= COMPRESSION_RATIO_THRESHOLD or len(data) < 32


@dataclass(eq=False)  # requests are compared by identity (they hold arrays)
class Request:
    audio: np.ndarray  # float32 mono 16 kHz
    options: DecodingOptions
    window: float | None  # seconds of silence margin after the clip; None = the full 30 s window
    drafters: list[Drafter]
    final: bool  # finals go before partials and are never dropped
    stream: object | None  # partials of one stream supersede each other
    future: Future
    seq: int = 0


class Engine:
    def __init__(self, checkpoint: Checkpoint, device: str = "auto", dtype: torch.dtype | None = None,
                 script: str = "traditional", max_batch: int = 16, threads: int | None = None):
        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name = checkpoint.name
        self.model = Whisper(checkpoint.dims)
        self.model.load_state_dict(checkpoint.state_dict)
        self.model.to(self.device, self.dtype).eval()
        self.tokenizer = Tokenizer(checkpoint.vocabulary)
        self.decoder = Decoder(self.model, self.tokenizer, checkpoint.suppress_tokens)
        self.script = script
        self.max_batch = max_batch
        self._queue: list[Request] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="breeze-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, spec: str = "default", device: str = "auto", **kwargs) -> Engine:
        return cls(load_checkpoint(spec), device=device, **kwargs)

    # -- submitting work ---------------------------------------------------------------

    def submit(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), *, window: float | None = None,
               drafters: list[Drafter] | None = None, final: bool = True, stream: object | None = None) -> Future:
        """Queues one segment; the future gets a Transcript, or None when a newer partial of the
        same stream superseded this one before it ran."""
        request = Request(np.asarray(audio, dtype=np.float32), options, window, drafters or [], final, stream, Future())
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            request.seq = next(self._seq)
            self._queue.append(request)
            self._cv.notify()
        return request.future

    async def transcribe_async(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs) -> Transcript | None:
        return await asyncio.wrap_future(self.submit(audio, options, **kwargs))

    def transcribe(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **kwargs) -> Transcript:
        return self.submit(audio, options, **kwargs).result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)

    # -- the worker ----------------------------------------------------------------------

    def _take(self) -> list[Request] | None:
        """Waits for work; returns one batch (same options and window), finals first."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            latest: dict[object, int] = {}
            for r in self._queue:
                if not r.final and r.stream is not None:
                    latest[r.stream] = max(latest.get(r.stream, -1), r.seq)
            keep = []
            for r in self._queue:
                if not r.final and r.stream is not None and r.seq != latest[r.stream]:
                    r.future.set_result(None)  # superseded partial: never run stale work
                else:
                    keep.append(r)
            keep.sort(key=lambda r: (not r.final, r.seq))
            head = keep[0]
            key = (head.options, self._frames(head))
            batch = [r for r in keep if (r.options, self._frames(r)) == key][: self.max_batch]
            self._queue = [r for r in keep if r not in batch]
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                for request, transcript in zip(live, self._transcribe_batch(live)):
                    request.future.set_result(transcript)
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("engine batch of %d failed", len(live))
                for request in live:
                    if not request.future.done():
                        request.future.set_exception(exc)

    def _frames(self, request: Request) -> int:
        if request.window is None:
            return N_FRAMES
        frames = len(request.audio) // 160 + int(request.window * FRAMES_PER_SECOND)
        return min(N_FRAMES, math.ceil(frames / 100) * 100)  # 1 s buckets so segments batch together

    def _transcribe_batch(self, batch: list[Request]) -> list[Transcript]:
        frames = self._frames(batch[0])
        options = batch[0].options
        t0 = time.perf_counter()
        mel = torch.stack([pad_mel(clip_mel(r.audio, self.model.dims.n_mels), frames) for r in batch])
        with torch.inference_mode():
            features = self.model.encoder(mel.to(self.device, self.dtype))
        self._sync()
        t1 = time.perf_counter()
        results = self.decoder.decode(features, options, [r.drafters for r in batch])
        self._sync()
        t2 = time.perf_counter()
        transcripts = [self._transcript(res, frames, (t1 - t0) / len(batch), (t2 - t1) / len(batch)) for res in results]
        for i, (request, transcript) in enumerate(zip(batch, transcripts)):
            if transcript.looped and frames < N_FRAMES:  # short windows can loop: redo on the full window
                log.info("repetition loop on a %d-frame window; retrying with the full window", frames)
                retry = replace(request, window=None)
                again = self._transcribe_batch([retry])[0]
                again.encoder_seconds += transcript.encoder_seconds
                again.decoder_seconds += transcript.decoder_seconds
                again.forwards += transcript.forwards
                transcripts[i] = again
        return transcripts

    def _transcript(self, res: DecodingResult, frames: int, enc: float, dec: float) -> Transcript:
        text = res.text
        if self.script == "traditional" and res.language in ("zh", "yue"):
            text = to_traditional(text)
        return Transcript(text=text, tokens=res.tokens, language=res.language, no_speech_prob=res.no_speech_prob,
                          avg_logprob=res.avg_logprob, looped=res.looped, window_frames=frames,
                          encoder_seconds=enc, decoder_seconds=dec, forwards=res.forwards,
                          draft_proposed=res.draft_proposed, draft_accepted=res.draft_accepted)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
