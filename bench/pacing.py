"""Pacing and sending for the measuring clients (bench.replay, bench.load): clips to one 16 kHz
stream, frames sent on an absolute real-time schedule, and one native-protocol session whose
events are logged with the send time of every frame (docs/architecture.md, native protocol).

Frame k is sent at ``t0 + k * frame / speed`` on the monotonic clock (an absolute schedule: a late
frame does not delay the ones after it). "Audio at time t": sample index ``round(t * 16000)`` for
a ``start`` and ``round(t * 16000) - 1`` (the last sample before t) for an ``end``; its send time
is the send time of the frame holding it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"

clock = time.monotonic


# --------------------------------------------------------------------------- inputs


@dataclass
class Clip:
    name: str
    path: str
    reference: str | None = None
    lang: str | None = None


@dataclass
class ClipSpan:
    """Where a clip sits in the replayed stream, in samples: [start, end)."""

    index: int
    name: str
    start: int
    end: int
    reference: str | None = None
    lang: str | None = None
    sample_rate: int = SAMPLE_RATE

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / self.sample_rate


@dataclass
class StreamPlan:
    pcm: np.ndarray  # int16, the whole stream (run_stream reads only its length and slices: bench.load loops clips)
    spans: list[ClipSpan]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


class ReplayInputError(Exception):
    """An input file or manifest that cannot be used (shown to the user as is)."""


def read_inputs(inputs: Iterable[str]) -> list[Clip]:
    """Clips from manifests (``.jsonl``/``.json``) and folders of WAV files with a ``.txt``
    transcript beside each (streaming.manifest), and plain audio files (no reference)."""
    from streaming.manifest import read_clips

    clips: list[Clip] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() or path.suffix.lower() in (".jsonl", ".json"):
            try:
                clips += [Clip(c.audio.stem, str(c.audio), c.text, c.lang) for c in read_clips(path)]
            except ValueError as exc:
                raise ReplayInputError(str(exc)) from None
        else:
            clips.append(Clip(name=path.stem, path=str(path)))
    if not clips:
        raise ReplayInputError("no clips to replay")
    return clips


def load_clip_audio(path: str) -> np.ndarray:
    try:
        from engines.whisper.audio import load_audio
    except ImportError:  # pragma: no cover - codecs is part of the package
        import soundfile
        import soxr

        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        audio = data.mean(axis=1).astype(np.float32)
        return soxr.resample(audio, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else audio
    try:
        return load_audio(path, SAMPLE_RATE)
    except Exception as exc:  # AudioFileError and friends
        raise ReplayInputError(str(exc)) from exc


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(audio, np.float64) * 32767.0), -32768, 32767).astype(np.int16)


def build_stream(
    clips: list[Clip],
    audios: list[np.ndarray],
    gap_s: float,
    sample_rate: int = SAMPLE_RATE,
    join: Callable[[list[np.ndarray]], Any] = np.concatenate,
) -> StreamPlan:
    """Silence of `gap_s`, clip, silence of `gap_s`, clip, ..., clip, silence of `gap_s`.

    `audios` are float or already int16; `join` makes the stream of the pieces (bench.load's
    streams read the pieces in place, without a copy per stream)."""
    gap = np.zeros(int(round(gap_s * sample_rate)), np.int16)
    pieces = [gap]
    spans = []
    position = len(gap)
    for index, (clip, audio) in enumerate(zip(clips, audios)):
        pcm = audio if audio.dtype == np.int16 else to_pcm16(audio)
        spans.append(ClipSpan(index, clip.name, position, position + len(pcm), clip.reference, clip.lang, sample_rate))
        pieces += [pcm, gap]
        position += len(pcm) + len(gap)
    return StreamPlan(join(pieces), spans, sample_rate)


# --------------------------------------------------------------------------- timing helpers


def frame_schedule(n_frames: int, frame_s: float, speed: float = 1.0, t0: float = 0.0) -> np.ndarray:
    """Absolute due times of frames 0..n-1: frame k at t0 + k * frame_s / speed."""
    return t0 + np.arange(n_frames, dtype=np.float64) * frame_s / speed


async def paced_send(
    n_frames: int,
    interval: float,
    send_frame: Callable[[int], Any],
    now: Callable[[], float],
    scheduled: np.ndarray,
    send_times: np.ndarray,
    stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> int:
    """Call `send_frame(k)` for k = 0..n-1 on an absolute schedule: frame k is due at t0 + k * interval.

    A late frame (slow send, busy loop) goes out at once and the ones after it keep their due
    times, so lateness never accumulates. `scheduled[k]` gets the due time and `send_times[k]`
    the time the frame was handed to `send_frame`, both on the `now()` clock. Stops early when
    `stop()` turns true. Returns the number of frames sent.
    """
    t0 = now()
    scheduled[:n_frames] = frame_schedule(n_frames, interval, 1.0, t0)
    for k in range(n_frames):
        wait = scheduled[k] - now()
        if wait > 0:
            await sleep(wait)
        if stop is not None and stop():
            return k
        send_times[k] = now()
        await send_frame(k)
    return n_frames


def sample_index(t_audio: float, sample_rate: int = SAMPLE_RATE, edge: str = "end") -> int:
    """The sample an event's `start` (first sample at or after t) or `end` (last sample before t) means."""
    index = int(round(float(t_audio) * sample_rate))
    return index - 1 if edge == "end" else index


def sample_send_time(send_times: np.ndarray, frame_samples: int, index: int) -> float:
    """Send time of the frame that holds sample `index` (clamped to the stream; NaN if unsent)."""
    if len(send_times) == 0:
        return math.nan
    frame = min(max(index // frame_samples, 0), len(send_times) - 1)
    return float(send_times[frame])


def audio_send_time(
    send_times: np.ndarray, frame_samples: int, t_audio: float, sample_rate: int = SAMPLE_RATE, edge: str = "end"
) -> float:
    return sample_send_time(send_times, frame_samples, sample_index(t_audio, sample_rate, edge))


# --------------------------------------------------------------------------- one stream over the wire


@dataclass
class StreamLog:
    """Everything one stream saw, times in seconds since the run's reference instant."""

    stream: int
    frame_samples: int
    sample_rate: int
    scheduled: np.ndarray
    send_times: np.ndarray  # NaN for frames never sent
    events: list[tuple[float, dict]] = field(default_factory=list)
    t_open: float | None = None
    t_ready: float | None = None
    t_first_frame: float | None = None
    t_stop: float | None = None
    t_end: float | None = None
    t_closed: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    failure: str | None = None  # client-side failure (no connection, timeout, early close)
    end_timed_out: bool = False  # no 'end' within the timeout after 'stop' (the connection was still open)
    session: str | None = None
    model: str | None = None
    language: str | None = None  # as the server's ready event confirms it
    binary_messages: int = 0

    @property
    def frames_sent(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.send_times)))


def _start_message(language: str) -> str:
    return json.dumps(
        {
            "type": "start",
            "sample_rate": SAMPLE_RATE,
            "encoding": "pcm_s16le",
            "channels": 1,
            "language": language,
            "partials": True,
        }
    )


async def run_stream(
    url: str,
    plan: StreamPlan,
    *,
    stream: int,
    t_ref: float,
    frame_ms: float,
    speed: float,
    language: str = "zh",
    delay: float = 0.0,
    ready_timeout: float = 30.0,
    end_timeout: float = 120.0,
    on_audio: Callable[[float], None] | None = None,
    on_event: Callable[[StreamLog, float, dict], None] | None = None,
) -> StreamLog:
    """Play the stream once over one connection and record the send and arrival times."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    frame_samples = int(round(frame_ms * plan.sample_rate / 1000))
    n_frames = -(-len(plan.pcm) // frame_samples)
    frame_s = frame_samples / plan.sample_rate
    log = StreamLog(stream, frame_samples, plan.sample_rate, np.full(n_frames, math.nan), np.full(n_frames, math.nan))
    now = lambda: clock() - t_ref  # noqa: E731
    ended = asyncio.Event()

    def record(message: str | bytes) -> dict | None:
        t = now()
        if isinstance(message, bytes):
            log.binary_messages += 1
            return None
        try:
            event = json.loads(message)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError:
            event = {"type": "_invalid", "raw": message[:500]}
        log.events.append((t, event))
        if event.get("type") == "end" and log.t_end is None:
            log.t_end = t
            ended.set()
        if on_event is not None:
            on_event(log, t, event)
        return event

    async def receive(ws) -> None:
        try:
            async for message in ws:
                record(message)
        except ConnectionClosed:
            pass
        finally:
            log.t_closed = now()
            ended.set()

    if delay > 0:
        await asyncio.sleep(delay)
    ws = None
    try:
        async with connect(url, max_size=None, compression=None, open_timeout=ready_timeout, close_timeout=5) as ws:
            log.t_open = now()
            await ws.send(_start_message(language))
            try:
                first = record(await asyncio.wait_for(ws.recv(), ready_timeout))
            except asyncio.TimeoutError:
                raise _StreamFailed(f"no 'ready' within {ready_timeout:g} s of 'start'") from None
            if not first or first.get("type") != "ready":
                raise _StreamFailed(
                    f"expected 'ready' after 'start', got {json.dumps(first, ensure_ascii=False)[:300]}"
                )
            log.t_ready = log.events[-1][0]
            log.session, log.model, log.language = first.get("session"), first.get("model"), first.get("language")

            receiver = asyncio.create_task(receive(ws))
            try:
                pcm = plan.pcm

                async def send_frame(k: int) -> None:
                    chunk = pcm[k * frame_samples : (k + 1) * frame_samples]
                    await ws.send(chunk.tobytes())
                    if on_audio is not None:
                        on_audio(len(chunk) / plan.sample_rate)

                await paced_send(
                    n_frames, frame_s / speed, send_frame, now, log.scheduled, log.send_times, stop=receiver.done
                )
                if receiver.done():
                    log.failure = "the server closed the connection before all audio was sent"
                else:
                    log.t_stop = now()
                    await ws.send(json.dumps({"type": "stop"}))
                    try:
                        await asyncio.wait_for(ended.wait(), end_timeout)
                    except asyncio.TimeoutError:
                        log.failure = f"no 'end' within {end_timeout:g} s of 'stop'"
                        log.end_timed_out = True
                    if log.t_end is None and log.failure is None:
                        log.failure = "the connection closed after 'stop' without an 'end' event"
                    if log.t_end is not None:
                        # Keep listening until the server closes, to catch anything sent after 'end'.
                        try:
                            await asyncio.wait_for(asyncio.shield(receiver), 5.0)
                        except asyncio.TimeoutError:
                            pass
            except ConnectionClosed:
                log.failure = "the server closed the connection before all audio was sent"
            finally:
                if not receiver.done():
                    await ws.close()
                    try:
                        await asyncio.wait_for(receiver, 5.0)
                    except (asyncio.TimeoutError, asyncio.CancelledError):
                        receiver.cancel()
    except _StreamFailed as exc:
        log.failure = str(exc)
    except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as exc:
        log.failure = f"cannot connect to {url}: {type(exc).__name__}: {exc}"
    except ConnectionClosed as exc:
        log.failure = f"connection closed: {exc}"
    if n_frames and not math.isnan(log.send_times[0]):
        log.t_first_frame = float(log.send_times[0])
    if ws is not None:
        log.close_code, log.close_reason = ws.close_code, ws.close_reason
        if log.failure and log.close_code is not None:
            log.failure += f" (close code {log.close_code}{': ' + log.close_reason if log.close_reason else ''})"
    return log


class _StreamFailed(Exception):
    pass
