"""Streaming policy of one session: VAD segments in, partial and final hypotheses out.

The transcriber owns a session's `Segmenter` and turns its segments into engine requests:

- while a segment is open, a *partial* decode of the segment so far every `partial_interval`
  seconds of new audio, on a shortened encoder window; at most one is in flight per session,
  so when the engine is behind, partials are skipped rather than queued (the engine also drops
  a queued partial once a newer one of the same stream arrives); a partial that shows nothing
  (no speech yet, or a repetition loop) lets the next one start after half the interval;
- the *stable* prefix of a partial is what the last two partial hypotheses agree on
  (LocalAgreement-2, by characters); once announced it never shrinks, and later partial texts
  keep it as their prefix;
- when a segment closes, a *final* decode of the whole segment on the full 30 s window, with
  word timings when `words` is set (in stream seconds, like the segment's start and end); it
  starts early, as soon as the silence after the speech holds the segment's end padding, so
  that the engine works while the hangover runs out (`early_finals`); the same decode, so the
  same text, and cancelled where speech resumes;
- every decode gets the segment's last partial tokens as `previous`: the engine verifies them
  as a draft (speculative decoding), so an unchanged prefix costs one forward, not one per token;
- a final whose transcript holds no speech is not sent; if partials with text were sent for
  that segment, a blank partial retracts them, so no hallucinated text is left on screen;
- every segment is decoded with the options in force when it started (`set_options` applies
  from the next segment on), their `prompt` included; with `condition_on_previous`, the text of
  the stream's earlier finals follows the prompt (openai/whisper's condition_on_previous_text):
  finals then run one after another, and text from an unreliable decode (a repetition loop, a
  compression ratio or an average log-probability past Whisper's thresholds) is not carried
  forward but clears what was carried;
- a slow engine costs partials, never finals: no partial starts while a final of the session is
  outstanding, and the audio of segments waiting for finals is bounded by `max_queued_audio`:
  sessions `await room()` after feeding, which waits while the bound is exceeded;
- the work of finals (audio waiting, engine and queue time) goes to `metrics.load`, from which
  the server estimates its capacity (streaming.server.admission).

Events come out in an order a client can rely on: all partials of a segment before its final,
finals in segment order, nothing of a segment after its final, and no partial of a segment
before the previous segment's final is resolved (partials of the next segment wait for it).
The transcriber is protocol-neutral: adapters turn `Partial`/`Final`/`Failure` into their
own wire format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import numpy as np

from engines.transcript import Transcript
from engines.whisper.alignment import Word
from engines.whisper.decoding import DecodingOptions

from ..metrics import Metrics
from .hypothesis_text import agreed_prefix, join_text, shift
from .segmenter import (
    SAMPLE_RATE,
    SegmentClosed,
    SegmentDiscarded,
    SegmentEnding,
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    SegmentGrew,
    SegmentResumed,
    SegmentStarted,
)
from .turns import TurnSegmenter

log = logging.getLogger(__name__)


class TranscriptionEngine(Protocol):
    """What the streaming side needs of an engine: engines.engine.Engine in this process, or
    streaming.server.workers.RemoteEngine in a worker of `serve --workers N`."""

    @property
    def name(self) -> str: ...

    async def transcribe_async(
        self, audio: np.ndarray, options: DecodingOptions = ..., **kwargs: Any
    ) -> Transcript | None: ...


@dataclass(frozen=True)
class TranscriberConfig:
    partial_interval: float = 0.5
    """Seconds of new segment audio between two partial decodes."""
    partial_window: float | None = 2.0
    """Partials run the encoder on the segment plus this many seconds of silence (None: the full
    30 s window). docs/architecture.md, Streaming policy: 2 s cost 0.2 CER points and saved 3.75x encoder time;
    the engine falls back to the full window when a short window makes the decoder loop."""
    final_window: float | None = None
    """The encoder window of finals, as for partials (None: the full 30 s window)."""
    early_finals: bool = True
    """Start a segment's final once the silence after its speech holds the end padding (the
    segmenter's `SegmentEnding`), not once the whole hangover has passed: the engine works during
    the rest of the hangover (280 ms by default) and the final goes out when the segment closes.
    The work is void, and cancelled, where speech resumes within the hangover."""
    speculative: str | None = None
    """Draft sources (off | hypothesis | medusa | both); None: the engine's default."""
    condition_on_previous: bool = False
    """Each segment's prompt also holds the text of the stream's earlier finals (as Whisper's
    condition_on_previous_text; off by default, as in faster-whisper's streaming uses)."""
    max_queued_audio: float = 60.0
    """Seconds of closed segments' audio waiting for their finals; past it `room()` holds the
    session's reading until the engine catches up (finals are never dropped; 0: no limit)."""
    words: bool = False
    """Finals carry word timings (one more decoder pass per final; partials never do)."""
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


@dataclass(frozen=True)
class Partial:
    segment: int
    start: float  # seconds of the stream's 16 kHz audio
    end: float
    text: str
    stable: str  # a prefix of text


@dataclass(frozen=True)
class Final:
    segment: int
    start: float
    end: float
    text: str
    transcript: Transcript
    words: list[Word] | None = None  # with `TranscriberConfig.words`: times in stream seconds


@dataclass(frozen=True)
class Failure:
    """The engine failed on this session's audio; the session cannot go on."""

    error: BaseException


Event = Partial | Final | Failure

MAX_CARRIED_CHARS = 1000
"""Earlier finals' text kept for condition_on_previous (the model reads the end of it)."""
MAX_DRAFT_CHARS = 200
"""Earlier finals' text that prompt-lookup drafts search without condition_on_previous."""


@dataclass
class _Segment:
    index: int
    start: int  # samples
    end: int
    audio: np.ndarray  # read-only view of [start, end) from the segmenter
    decoded_end: int  # end of the audio the last partial decode was given
    closed: bool = False
    previous: str | None = None  # last partial text sent
    stable: str = ""
    tokens: list[int] = field(default_factory=list)  # tokens of the last partial
    options: DecodingOptions = field(default_factory=DecodingOptions)  # in force when it started
    early: asyncio.Task[Transcript | None] | None = None  # its final, started at a SegmentEnding
    early_end: int = -1  # the end of the audio the early final decodes
    early_asked: float = 0.0  # when it was started


class StreamingTranscriber:
    """Per-session policy; `feed` audio as it arrives, then `finish` (stop) or `aclose` (gone).

    `emit` is called on the event loop, in event order, and must not block. `on_resolved(index)`,
    where given, is called once a segment's final is resolved: its `Final` emitted, or the segment
    found to hold no speech (OpenAI items need a `.completed` either way).
    """

    def __init__(
        self,
        engine: TranscriptionEngine,
        options: DecodingOptions,
        emit: Callable[[Event], None],
        *,
        config: TranscriberConfig = TranscriberConfig(),
        metrics: Metrics | None = None,
        segmenter: Segmenter | TurnSegmenter | None = None,
        on_resolved: Callable[[int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_resolved = on_resolved
        self._options = options
        self._emit = emit
        self.config = config
        self._metrics = metrics or Metrics()
        self._segmenter = segmenter or Segmenter(config.segmenter)
        self._interval = round(config.partial_interval * SAMPLE_RATE)
        self._open: _Segment | None = None
        self._partial: asyncio.Task[None] | None = None
        self._last_final: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._received = 0  # samples fed
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples fed after a chunk, its arrival time)
        self._failed = False
        self._closed = False
        self._queued = 0  # samples of closed segments whose finals are not resolved yet
        self._room = asyncio.Event()
        self._room.set()
        self._next_segment = 0  # index of the next segment to start
        self._carried = ""  # earlier finals' text, for condition_on_previous

    @property
    def options(self) -> DecodingOptions:
        """The options of segments that start from now on."""
        return self._options

    def set_options(self, options: DecodingOptions) -> int:
        """Changes the decoding options (a new prompt, language) from the next segment on: the
        open segment keeps its own, so its partials and final agree. Returns that next index."""
        self._options = options
        return self._next_segment if self._open is None else self._open.index + 1

    def _decode_options(self, segment: _Segment) -> DecodingOptions:
        if not self._carried:
            return segment.options
        if not self.config.condition_on_previous:  # prompt-lookup drafts may copy from it; the model never reads it
            return replace(segment.options, draft_text=self._carried[-MAX_DRAFT_CHARS:])
        return replace(segment.options, previous_text=self._carried)

    def _carry(self, transcript: Transcript) -> None:
        """Keeps a reliable final's text for the next segments: their prompt with
        condition_on_previous, else prompt-lookup drafts only; an unreliable decode clears it, so
        a loop or a hallucination is not fed forward."""
        if not transcript.reliable:
            self._carried = ""
        elif transcript.has_speech:
            self._carried = join_text([self._carried, transcript.text])[-MAX_CARRIED_CHARS:]

    @property
    def seconds(self) -> float:
        """Stream time fed so far."""
        return self._received / SAMPLE_RATE

    def feed(self, audio: np.ndarray) -> None:
        """Adds 16 kHz float32 audio; starts partial and final decodes as segments grow and close."""
        if not audio.size:
            return
        self._received += audio.size
        self._arrivals.append((self._received, time.monotonic()))
        self._metrics.audio_seconds.inc(audio.size / SAMPLE_RATE)
        self._handle(self._segmenter.feed(audio))
        keep_from = self._open.start if self._open is not None else self._received
        while len(self._arrivals) > 1 and self._arrivals[0][0] < keep_from:
            self._arrivals.popleft()
        self._maybe_partial()

    def cut(self) -> None:
        """Closes the open segment now (an OpenAI commit, an idle WhisperLive client); its final
        follows as for any closed segment, and the stream goes on."""
        self._handle(self._segmenter.flush())

    async def finish(self) -> None:
        """End of stream: closes the open segment and waits until every final is emitted."""
        self._handle(self._segmenter.flush())
        if self._partial is not None:
            self._partial.cancel()  # its segment is closed: the result would be dropped anyway
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def queued_seconds(self) -> float:
        """Audio of closed segments waiting for their finals."""
        return self._queued / SAMPLE_RATE

    async def room(self) -> None:
        """Returns once the audio waiting for finals is within `max_queued_audio` (at once, mostly)."""
        while not self._room.is_set():
            await self._room.wait()

    def _account(self, samples: int) -> None:
        self._queued += samples
        self._metrics.load.queued(samples / SAMPLE_RATE)
        limit = self.config.max_queued_audio
        if not limit or self._queued <= limit * SAMPLE_RATE or self._failed or self._closed:
            self._room.set()
        else:
            self._room.clear()

    async def aclose(self) -> None:
        """The client is gone: cancels outstanding decodes without waiting for the engine."""
        self._closed = True
        self._room.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- segments -------------------------------------------------------------------------------

    def _handle(self, events: list[SegmentEvent]) -> None:
        for event in events:
            if isinstance(event, SegmentStarted):
                if self._open is not None:  # a segment a Realtime clear dropped: its final is not needed
                    self._drop_early(self._open)
                self._open = _Segment(
                    event.index, event.start, event.start, np.zeros(0, np.float32), event.start, options=self._options
                )
                self._next_segment = event.index + 1
                self._metrics.segments.inc()
            elif isinstance(event, SegmentGrew):
                assert self._open is not None and self._open.index == event.index, (event, self._open)
                self._open.end, self._open.audio = event.end, event.audio
            elif isinstance(event, SegmentEnding):
                assert self._open is not None and self._open.index == event.index, (event, self._open)
                self._start_early(self._open, event)
            elif isinstance(event, SegmentResumed):
                assert self._open is not None and self._open.index == event.index, (event, self._open)
                self._drop_early(self._open)
            elif isinstance(event, SegmentClosed):
                segment = self._open  # the segmenter closes only the segment it announced last
                assert segment is not None and segment.index == event.index, (event, segment)
                segment.end, segment.audio, segment.closed = event.end, event.audio, True
                self._open = None
                arrival = self._arrival(event.end)
                self._account(segment.end - segment.start)
                task = self._spawn(self._final(segment, arrival, self._last_final))
                task.add_done_callback(partial(self._release, segment.end - segment.start))
                self._last_final = task
            elif isinstance(event, SegmentDiscarded):
                log.debug("discarded a %d ms voiced blip at %.2f s", event.voiced_ms, event.start / SAMPLE_RATE)

    def _release(self, samples: int, _: asyncio.Task[None]) -> None:
        """A final is resolved: its audio no longer waits."""
        self._account(-samples)

    def _arrival(self, position: int) -> float:
        """When the audio up to sample `position` had reached the server."""
        for fed, arrived in self._arrivals:
            if fed >= position:
                return arrived
        return self._arrivals[-1][1] if self._arrivals else time.monotonic()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[None]) -> None:
        """A decode is over: the engine has room, or the previous final is out, for a partial."""
        self._tasks.discard(task)
        if not task.cancelled():
            self._maybe_partial()

    # --- partials -------------------------------------------------------------------------------

    def _maybe_partial(self) -> None:
        segment = self._open
        if (
            segment is None
            or self._failed
            or self._closed
            or self._interval <= 0
            or (self._partial is not None and not self._partial.done())
            or (self._last_final is not None and not self._last_final.done())
            or segment.early is not None
            or segment.end - segment.decoded_end < self._interval
        ):
            return
        segment.decoded_end = segment.end
        self._partial = self._spawn(self._run_partial(segment, segment.audio, segment.end))

    async def _run_partial(self, segment: _Segment, audio: np.ndarray, end: int) -> None:
        try:
            transcript = await self._request(segment, audio, final=False)
        except Exception as exc:
            self._fail(exc, f"partial decode of segment {segment.index}")
            return
        if transcript is None:  # the engine dropped it for a newer partial of this stream
            return
        self._metrics.count_decode(transcript)
        if segment.closed:  # its final is on the way: a partial now would come after it
            return
        segment.tokens = transcript.tokens
        if transcript.has_speech:
            text, stable = self._agree(segment, transcript.text)
            self._emit(Partial(segment.index, segment.start / SAMPLE_RATE, end / SAMPLE_RATE, text, stable))
            self._metrics.partials.inc()
        else:  # nothing shown (no speech yet, or a repetition): the next partial waits half an interval
            segment.decoded_end = min(segment.decoded_end, end - self._interval // 2)

    @staticmethod
    def _agree(segment: _Segment, text: str) -> tuple[str, str]:
        """LocalAgreement-2, kept monotonic: the announced stable prefix stays the text's prefix."""
        stable = segment.stable
        if not text.startswith(stable):
            text = stable + text[len(stable) :]
        if segment.previous is not None:
            agreed = agreed_prefix(segment.previous, text)
            if len(agreed) > len(stable):
                stable = agreed
        segment.previous, segment.stable = text, stable
        return text, stable

    # --- finals ---------------------------------------------------------------------------------

    def _request(self, segment: _Segment, audio: np.ndarray, final: bool) -> Coroutine[Any, Any, Transcript | None]:
        """A decode of `segment`'s `audio` (its last partial's tokens as the draft): a partial on the
        partial window, or a final on the final window, with word timings where asked."""
        return self._engine.transcribe_async(
            audio,
            self._decode_options(segment),
            window=self.config.final_window if final else self.config.partial_window,
            previous=segment.tokens or None,
            speculative=self.config.speculative,
            final=final,
            stream=self,
            words=final and self.config.words,
        )

    def _start_early(self, segment: _Segment, event: SegmentEnding) -> None:
        """The final of `segment` as it will be if the silence lasts, started now. Not where its
        prompt waits for the previous final's text (condition_on_previous)."""
        if not self.config.early_finals or self._failed or self._closed:
            return
        if self.config.condition_on_previous and self._last_final is not None and not self._last_final.done():
            return
        self._drop_early(segment)
        segment.early_end, segment.early_asked = event.end, time.monotonic()
        task = asyncio.get_running_loop().create_task(self._request(segment, event.audio, final=True))
        task.add_done_callback(_retrieve)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        segment.early = task

    def _drop_early(self, segment: _Segment) -> None:
        """Speech resumed (or the segment closed elsewhere): its early final is void."""
        if segment.early is not None:
            segment.early.cancel()
            self._metrics.early_finals.labels("void").inc()
        segment.early, segment.early_end = None, -1

    async def _final(self, segment: _Segment, arrival: float, before: asyncio.Task[None] | None) -> None:
        early = segment.early if segment.early_end == segment.end else None
        if early is None:
            self._drop_early(segment)
        else:
            self._metrics.early_finals.labels("used").inc()
        if self.config.condition_on_previous and before is not None:
            await asyncio.wait({before})  # the previous final's text goes into this one's prompt
        asked = segment.early_asked if early is not None else time.monotonic()
        try:
            transcript = await (early if early is not None else self._request(segment, segment.audio, final=True))
        except Exception as exc:
            self._fail(exc, f"final decode of segment {segment.index}")
            return
        assert transcript is not None  # only partials are ever dropped
        waited = time.monotonic() - asked
        self._metrics.count_decode(transcript)
        self._metrics.final_engine.observe(waited)
        self._metrics.load.final_decoded(
            len(segment.audio) / SAMPLE_RATE, transcript.encoder_seconds + transcript.decoder_seconds, waited
        )
        if before is not None:  # finals go out in segment order
            await asyncio.wait({before})
        if self._failed:
            return
        self._carry(transcript)
        start, end = segment.start / SAMPLE_RATE, segment.end / SAMPLE_RATE
        if transcript.has_speech:
            self._emit(Final(segment.index, start, end, transcript.text, transcript, shift(transcript.words, start)))
            self._metrics.finals.inc()
            self._metrics.final_latency.observe(time.monotonic() - arrival)
        else:
            log.debug(
                "segment %d [%.2f-%.2f s] holds no speech (no_speech_prob %.2f, text %r)",
                segment.index,
                start,
                end,
                transcript.no_speech_prob,
                transcript.text,
            )
            if segment.previous:
                self._emit(Partial(segment.index, start, end, "", ""))
        if self._on_resolved is not None and not self._closed:
            self._on_resolved(segment.index)

    def _fail(self, exc: Exception, what: str) -> None:
        log.error("%s failed: %s", what, exc, exc_info=exc)
        if not self._failed:
            self._failed = True
            self._room.set()
            self._emit(Failure(exc))


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Reads a dropped early final's outcome, so that its failure is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()
