"""Streaming policy with a scripted segmenter and an engine whose answers the test controls.

The test decides which segment events each `feed` produces and when (and with what) each
engine request completes, so cadence, skipping, ordering and the stable prefix are checked
exactly, without models or audio.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pytest

from engines.transcript import Transcript
from engines.whisper.decoding import DecodingOptions
from streaming.audio.segmenter import (
    SegmentClosed,
    SegmentEnding,
    SegmentEvent,
    SegmentGrew,
    SegmentResumed,
    SegmentStarted,
)
from streaming.audio.transcriber import (
    Event,
    Failure,
    Final,
    Partial,
    StreamingTranscriber,
    TranscriberConfig,
    agreed_prefix,
)
from streaming.metrics import Metrics

RATE = 16000


@dataclass
class Call:
    samples: int
    window: float | None
    previous: list[int] | None
    final: bool
    stream: object
    future: Future
    options: DecodingOptions


class FakeEngine:
    """Records requests; the test completes their futures."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def submit(
        self, audio, options, *, window=None, previous=None, speculative=None, final=True, stream=None, words=False
    ) -> Future:
        self.calls.append(Call(len(audio), window, previous, final, stream, Future(), options))
        return self.calls[-1].future

    async def transcribe_async(self, audio, options, **kwargs):
        return await asyncio.wrap_future(self.submit(audio, options, **kwargs))

    def pending(self) -> list[Call]:
        return [c for c in self.calls if not c.future.done()]


class ScriptedSegmenter:
    """Hands out the events the test queued, one list per `feed`."""

    def __init__(self) -> None:
        self.script: list[list[SegmentEvent]] = []
        self.at_flush: list[SegmentEvent] = []

    def feed(self, audio: np.ndarray) -> list[SegmentEvent]:
        return self.script.pop(0) if self.script else []

    def flush(self) -> list[SegmentEvent]:
        return self.at_flush


def transcript(
    text: str, tokens: list[int] | None = None, avg_logprob: float = -0.2, looped: bool = False
) -> Transcript:
    return Transcript(
        text=text,
        tokens=tokens if tokens is not None else [ord(c) for c in text],
        language="zh",
        no_speech_prob=0.01,
        avg_logprob=avg_logprob,
        looped=looped,
        window_frames=3000,
        encoder_seconds=0.01,
        decoder_seconds=0.02,
        forwards=3,
    )


def s(seconds: float) -> int:
    return round(seconds * RATE)


def started(index: int, start: float) -> SegmentStarted:
    return SegmentStarted(index, s(start))


def grew(index: int, start: float, end: float) -> SegmentGrew:
    return SegmentGrew(index, s(start), s(end), np.zeros(s(end) - s(start), np.float32))


def closed(index: int, start: float, end: float) -> SegmentClosed:
    return SegmentClosed(index, s(start), s(end), np.zeros(s(end) - s(start), np.float32), "silence")


def ending(index: int, start: float, end: float) -> SegmentEnding:
    return SegmentEnding(index, s(start), s(end), np.zeros(s(end) - s(start), np.float32))


class Harness:
    def __init__(self, **config) -> None:
        self.engine = FakeEngine()
        self.segmenter = ScriptedSegmenter()
        self.events: list[Event] = []
        self.metrics = Metrics()
        self.transcriber = StreamingTranscriber(
            self.engine,
            DecodingOptions(),
            self.events.append,
            config=TranscriberConfig(**config),
            metrics=self.metrics,
            segmenter=self.segmenter,
        )

    def count(self, name: str) -> float:
        suffix = "" if name.endswith(("_count", "_sum")) else "_total"
        return self.metrics.registry.get_sample_value(f"breeze_{name}{suffix}")

    async def feed(self, *events: SegmentEvent) -> None:
        self.segmenter.script.append(list(events))
        self.transcriber.feed(np.zeros(1600, np.float32))
        await settle()

    async def answer(self, call: Call, result: Transcript | Exception) -> None:
        if isinstance(result, Exception):
            call.future.set_exception(result)
        else:
            call.future.set_result(result)
        await settle()


async def settle() -> None:
    """Lets the transcriber's tasks run up to their next engine request or event."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_agreed_prefix():
    assert agreed_prefix("今天天氣", "今天天器很好") == "今天天"
    assert agreed_prefix("I like apples", "I like apple pie") == "I like "
    assert agreed_prefix("hello world", "hello world!") == "hello world"
    assert agreed_prefix("offer 12", "offer 123") == "offer "
    assert agreed_prefix("", "x") == ""


async def test_partial_cadence_skips_while_busy():
    h = Harness(partial_interval=0.5)
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.3))
    assert h.engine.calls == []  # less than an interval of audio
    await h.feed(grew(0, 0.0, 0.6))
    [first] = h.engine.calls
    assert (first.samples, first.window, first.final, first.previous, first.stream) == (
        s(0.6),
        2.0,
        False,
        None,
        h.transcriber,
    )
    await h.feed(grew(0, 0.0, 1.2))
    await h.feed(grew(0, 0.0, 1.8))
    assert len(h.engine.calls) == 1  # the engine is busy with our partial: skip, don't queue
    await h.answer(first, transcript("今天"))
    assert h.events == [Partial(0, 0.0, 0.6, "今天", "")]
    second = h.engine.calls[1]  # at once, with everything that arrived meanwhile
    assert second.samples == s(1.8) and second.previous == [ord("今"), ord("天")]
    await h.answer(second, transcript("今天天氣"))
    assert h.events[-1] == Partial(0, 0.0, 1.8, "今天天氣", "今天")
    assert h.count("partials") == 2


async def test_a_partial_that_shows_nothing_lets_the_next_come_sooner():
    h = Harness(partial_interval=0.5)
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    [first] = h.engine.calls
    await h.answer(first, transcript(""))  # no speech yet: nothing shown
    assert h.events == []
    await h.feed(grew(0, 0.0, 0.8))
    assert len(h.engine.calls) == 1  # not even half an interval of new audio
    await h.feed(grew(0, 0.0, 0.9))
    assert len(h.engine.calls) == 2 and h.engine.calls[1].samples == s(0.9)  # half an interval, not a whole one
    await h.answer(h.engine.calls[1], transcript("今天"))
    await h.feed(grew(0, 0.0, 1.2))
    assert len(h.engine.calls) == 2  # shown: the next waits the whole interval again
    await h.feed(grew(0, 0.0, 1.4))
    assert len(h.engine.calls) == 3


async def test_stable_prefix_never_shrinks():
    h = Harness(partial_interval=0.5)
    await h.feed(started(0, 0.0))
    hypotheses = ["今天", "今天天氣", "今天天器很好", "今天天氣很好啊", "明天"]
    expected = [
        ("今天", ""),
        ("今天天氣", "今天"),
        ("今天天器很好", "今天天"),
        ("今天天氣很好啊", "今天天"),
        ("今天天", "今天天"),
    ]  # the last hypothesis contradicts the stable prefix: the prefix wins
    for i, text in enumerate(hypotheses):
        await h.feed(grew(0, 0.0, 0.5 * (i + 1)))
        await h.answer(h.engine.calls[-1], transcript(text))
        assert (h.events[-1].text, h.events[-1].stable) == expected[i]


async def test_final_uses_full_window_and_last_partial_as_draft():
    h = Harness()
    await h.feed(started(0, 0.5), grew(0, 0.5, 1.1))
    await h.answer(h.engine.calls[0], transcript("你好", [7, 8]))
    await h.feed(closed(0, 0.5, 1.6))
    final = h.engine.calls[1]
    assert (final.samples, final.window, final.final, final.previous) == (s(1.1), None, True, [7, 8])
    await h.answer(final, transcript("你好嗎"))
    assert h.events[-1] == Final(0, 0.5, 1.6, "你好嗎", h.events[-1].transcript)
    assert h.count("finals") == 1 and h.count("final_latency_seconds_count") == 1
    assert h.count("tokens") == 5 and h.count("decoder_forwards") == 6


async def test_finals_in_segment_order_and_next_partials_wait():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.4))
    await h.feed(closed(0, 0.0, 0.8), started(1, 1.0), grew(1, 1.0, 2.0))
    final0 = h.engine.calls[0]
    assert final0.final and len(h.engine.calls) == 1  # no partial of segment 1 before final 0 is resolved
    await h.feed(closed(1, 1.0, 2.5))
    final1 = h.engine.calls[1]
    await h.answer(final1, transcript("二"))
    assert h.events == []  # final 1 waits for final 0
    await h.answer(final0, transcript("一"))
    assert [(e.segment, e.text) for e in h.events] == [(0, "一"), (1, "二")]


async def test_partial_of_the_next_segment_after_the_final():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.4))
    await h.feed(closed(0, 0.0, 0.8), started(1, 1.0), grew(1, 1.0, 2.0))
    await h.answer(h.engine.calls[0], transcript("一"))
    partial = h.engine.calls[1]  # started as soon as final 0 was out
    assert not partial.final and partial.samples == s(1.0)
    await h.answer(partial, transcript("二"))
    assert [type(e).__name__ for e in h.events] == ["Final", "Partial"]


@pytest.mark.parametrize("partial_first", [True, False])
async def test_no_partial_after_the_final(partial_first: bool):
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    partial = h.engine.calls[0]
    await h.feed(closed(0, 0.0, 0.9))
    final = h.engine.calls[1]
    for call, text in [(partial, "早"), (final, "早安")] if partial_first else [(final, "早安"), (partial, "早")]:
        await h.answer(call, transcript(text))
    assert [(type(e).__name__, e.text) for e in h.events] == [("Final", "早安")]


async def test_no_speech_sends_no_final_and_retracts_partials():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    await h.answer(h.engine.calls[0], transcript("謝謝觀看"))
    await h.feed(closed(0, 0.0, 0.9), started(1, 2.0))
    await h.answer(h.engine.calls[1], transcript(""))
    assert h.events[-1] == Partial(0, 0.0, 0.9, "", "")  # the hallucinated partial is withdrawn
    await h.feed(closed(1, 2.0, 2.2))
    await h.answer(h.engine.calls[2], transcript(""))
    assert len(h.events) == 2 and h.count("finals") == 0  # nothing shown, nothing to withdraw


async def test_partials_off():
    h = Harness(partial_interval=0.0)
    await h.feed(started(0, 0.0), grew(0, 0.0, 5.0))
    assert h.engine.calls == []


async def test_finish_flushes_the_open_segment():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    partial = h.engine.calls[0]
    h.segmenter.at_flush = [closed(0, 0.0, 0.7)]
    finishing = asyncio.ensure_future(h.transcriber.finish())
    await settle()
    assert partial.future.cancelled()  # its segment is closing: not worth the engine's time
    await h.answer(h.engine.calls[1], transcript("晚安"))
    await asyncio.wait_for(finishing, 1)
    assert [(type(e).__name__, e.text) for e in h.events] == [("Final", "晚安")]


async def test_aclose_cancels_without_waiting():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    await h.feed(closed(0, 0.0, 0.9))
    await asyncio.sleep(0)
    await asyncio.wait_for(h.transcriber.aclose(), 1)
    assert all(c.future.cancelled() for c in h.engine.calls) and h.events == []
    assert not [t for t in asyncio.all_tasks() if "StreamingTranscriber" in repr(t)]


async def test_engine_failure_is_reported_once():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.4))
    await h.feed(closed(0, 0.0, 0.8), started(1, 1.0))
    await h.feed(closed(1, 1.0, 1.5))
    await h.answer(h.engine.calls[0], RuntimeError("CUDA error: out of memory"))
    await h.answer(h.engine.calls[1], transcript("二"))
    assert len(h.events) == 1 and isinstance(h.events[0], Failure)


async def test_new_options_apply_from_the_next_segment():
    """A prompt set while a segment is open leaves that segment's partials and final alone."""
    h = Harness(partial_interval=0.5)
    h.transcriber.set_options(DecodingOptions(prompt="台積電"))
    await h.feed(started(0, 0.0), grew(0, 0.0, 0.6))
    assert h.transcriber.set_options(DecodingOptions(prompt="聯發科")) == 1  # segment 0 is open: from 1 on
    await h.answer(h.engine.calls[0], transcript("台"))
    await h.feed(grew(0, 0.0, 1.2))
    await h.answer(h.engine.calls[1], transcript("台積"))
    await h.feed(closed(0, 0.0, 1.4))
    await h.answer(h.engine.calls[2], transcript("台積電"))
    await h.feed(started(1, 2.0), grew(1, 2.0, 2.6))
    await h.feed(closed(1, 2.0, 3.0))
    assert [(c.final, c.options.prompt) for c in h.engine.calls] == [
        (False, "台積電"),
        (False, "台積電"),
        (True, "台積電"),
        (False, "聯發科"),
        (True, "聯發科"),
    ]
    assert h.transcriber.set_options(DecodingOptions()) == 2  # none open: the next to start


async def test_condition_on_previous_carries_reliable_finals_only():
    """Earlier finals follow the prompt; a final waits for the one before it; a loop or a
    low-confidence decode clears what was carried (Whisper's guard)."""
    h = Harness(partial_interval=0.0, condition_on_previous=True)
    h.transcriber.set_options(DecodingOptions(prompt="客服"))
    await h.feed(started(0, 0.0), closed(0, 0.0, 1.0), started(1, 1.5), closed(1, 1.5, 2.5))
    assert len(h.engine.calls) == 1  # segment 1's final waits: segment 0's text goes into its prompt
    await h.answer(h.engine.calls[0], transcript("你好"))
    second = h.engine.calls[1]
    assert (second.options.prompt, second.options.previous_text) == ("客服", "你好")
    await h.answer(second, transcript("ABC"))
    await h.feed(started(2, 3.0), closed(2, 3.0, 4.0))
    assert h.engine.calls[2].options.previous_text == "你好ABC"
    await h.answer(h.engine.calls[2], transcript("好好好", looped=True))  # a loop: nothing carried any more
    await h.feed(started(3, 4.5), closed(3, 4.5, 5.0))
    assert h.engine.calls[3].options == DecodingOptions(prompt="客服")
    await h.answer(h.engine.calls[3], transcript("嗯"))
    await h.feed(started(4, 5.5), closed(4, 5.5, 6.0))
    assert h.engine.calls[4].options.previous_text == "嗯"
    await h.answer(h.engine.calls[4], transcript("請問", avg_logprob=-1.5))  # unsure: cleared as well
    await h.feed(started(5, 6.5), closed(5, 6.5, 7.0))
    assert h.engine.calls[5].options.previous_text == ""
    assert [e.text for e in h.events if isinstance(e, Final)] == ["你好", "ABC", "好好好", "嗯", "請問"]


async def test_without_condition_on_previous_finals_do_not_wait():
    h = Harness(partial_interval=0.0)
    await h.feed(started(0, 0.0), closed(0, 0.0, 1.0), started(1, 1.5), closed(1, 1.5, 2.5))
    assert len(h.engine.calls) == 2 and all(c.options.previous_text == "" for c in h.engine.calls)


def early_finals(h: Harness, outcome: str) -> float:
    return h.metrics.registry.get_sample_value("breeze_early_finals_total", {"outcome": outcome}) or 0.0


async def test_early_final_starts_in_the_hangover_and_goes_out_at_the_close():
    h = Harness()
    await h.feed(started(0, 0.5), grew(0, 0.5, 1.1))
    await h.answer(h.engine.calls[0], transcript("你好", [7, 8]))
    await h.feed(grew(0, 0.5, 1.8), ending(0, 0.5, 1.6))
    early = h.engine.calls[1]  # the final's request, before the segment closes
    assert (early.samples, early.window, early.final, early.previous) == (s(1.1), None, True, [7, 8])
    await h.answer(early, transcript("你好嗎"))
    await h.feed(grew(0, 0.5, 2.1))
    assert len(h.engine.calls) == 2  # no partial beside the early final
    assert [type(e) for e in h.events] == [Partial]  # nothing final before the segment closes
    await h.feed(closed(0, 0.5, 1.6))
    assert len(h.engine.calls) == 2  # the early request was the final: no second one
    assert h.events[-1] == Final(0, 0.5, 1.6, "你好嗎", h.events[-1].transcript)
    assert early_finals(h, "used") == 1 and early_finals(h, "void") == 0
    assert h.count("final_engine_seconds_count") == 1


async def test_speech_that_resumes_voids_the_early_final():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 1.0), ending(0, 0.0, 0.9))
    early = h.engine.calls[0]
    assert early.final and early.samples == s(0.9)
    await h.feed(SegmentResumed(0), grew(0, 0.0, 1.6))
    assert early.future.cancelled()  # withdrawn from the engine
    partial = h.engine.calls[1]  # partials go on with the segment
    assert not partial.final and partial.samples == s(1.6)
    await h.answer(partial, transcript("我們"))
    await h.feed(closed(0, 0.0, 2.0))
    final = h.engine.calls[2]
    assert final.final and final.samples == s(2.0)
    await h.answer(final, transcript("我們走"))
    assert h.events[-1].text == "我們走" and len(h.engine.calls) == 3
    assert early_finals(h, "used") == 0 and early_finals(h, "void") == 1


async def test_a_close_at_another_end_does_not_take_the_early_final():
    h = Harness()
    await h.feed(started(0, 0.0), grew(0, 0.0, 1.0), ending(0, 0.0, 0.9))
    early = h.engine.calls[0]
    h.segmenter.at_flush = [closed(0, 0.0, 1.0)]  # the stream stopped mid-hangover, cut at its end
    finishing = asyncio.ensure_future(h.transcriber.finish())
    await settle()
    assert early.future.cancelled()
    final = h.engine.calls[1]
    assert final.final and final.samples == s(1.0)
    await h.answer(final, transcript("好"))
    await finishing
    assert [(e.segment, e.text) for e in h.events] == [(0, "好")]


async def test_no_early_final_where_its_prompt_waits_or_it_is_off():
    h = Harness(condition_on_previous=True)
    await h.feed(started(0, 0.0), closed(0, 0.0, 1.0), started(1, 1.5), grew(1, 1.5, 2.0), ending(1, 1.5, 1.9))
    assert len(h.engine.calls) == 1  # final 0's text goes into segment 1's prompt: nothing starts before it
    await h.answer(h.engine.calls[0], transcript("一"))
    await h.feed(closed(1, 1.5, 1.9))
    final = h.engine.calls[-1]
    assert final.final and final.samples == s(0.4) and final.options.previous_text == "一"

    off = Harness(early_finals=False)
    await off.feed(started(0, 0.0), grew(0, 0.0, 0.4), ending(0, 0.0, 0.3))
    assert off.engine.calls == []
    await off.feed(closed(0, 0.0, 0.3))
    assert [c.final for c in off.engine.calls] == [True]
