"""Replay harness: play audio clips to a running server as a live stream and measure it.

`breeze-stream replay (MANIFEST | WAV...) --url ws://HOST:PORT/v1/stream` concatenates the clips
of each session language (a clip's manifest ``lang``, unless ``--language`` names one for all) into
one stream (``--gap`` seconds of silence before the first clip, between clips and after the
last one, so the last segment closes on its own before ``stop``), converts it to pcm_s16le 16 kHz
and sends it over the native protocol (DESIGN.md) in ``--frame-ms`` frames at real-time pace
times ``--speed``. Frame k is sent at ``t0 + k * frame / speed`` on the monotonic clock (an
absolute schedule: a late frame does not delay the ones after it). The harness records the time
each frame was handed to the socket and the arrival time of every event, and computes
(DESIGN.md, Measuring):

- final latency: arrival of a final - send time of the audio at the final's ``end``;
- final latency from the clip end: per clip, arrival of the last final assigned to the clip -
  send time of the clip's last sample (the segment's own ``end`` lies wherever the VAD put it,
  the clip end is ground truth; a clip that ends in silence longer than the server's hangover
  can give a negative value: the final came before the clip's trailing silence was sent);
- partial lag: arrival of a partial - send time of the audio at its ``end``;
- first-partial latency: first partial of a segment - send time of the audio at its ``start``;
- partial cadence: gaps between consecutive partials of segments longer than 2 s;
- streaming CER per clip: finals assigned to the clip they overlap most, joined in order,
  scored with `streaming.scoring` against the manifest reference (corpus CER for zh+mix,
  WER for en);
- server real-time factor from ``GET /metrics`` before and after the run:
  (encoder + decoder seconds) / audio seconds;
- contract checks: finals per clip (each clip needs one), lost finals (a segment whose last
  partial left text on screen and that got no final; a blank partial retracts), finals
  arriving after ``end``, duplicate finals, errors.

"Audio at time t": sample index ``round(t * 16000)`` for a ``start`` and ``round(t * 16000) - 1``
(the last sample before t) for an ``end``; its send time is the send time of the frame holding it.
Percentiles are numpy's default (linear interpolation between closest ranks).

Exit status: 0 when every stream finished (``end`` received) and every check passed, 1 when a
stream failed or a check failed, 2 when nothing could run (bad arguments or input files, no
connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
LONG_SEGMENT_S = 2.0
"""Partial cadence is measured on segments longer than this (issue 3: partials every <= 1 s)."""

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


def _load_audio(path: str) -> np.ndarray:
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


def stats(values: Iterable[float]) -> dict[str, Any]:
    """n, p50, p95, p99, max, mean (numpy linear-interpolation percentiles); None where there are no values."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if array.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": int(array.size),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


def assign_clip(start: float, end: float, spans: list[ClipSpan]) -> int | None:
    """Index of the clip whose span [start_s, end_s] the interval [start, end] overlaps most.

    A zero-length interval goes to the clip containing it; an interval that touches no clip
    (text over silence) gets None. Ties go to the earlier clip.
    """
    best, best_overlap = None, 0.0
    for span in spans:
        overlap = min(end, span.end_s) - max(start, span.start_s)
        if overlap > best_overlap:
            best, best_overlap = span.index, overlap
    if best is None and end <= start:
        for span in spans:
            if span.start_s <= start <= span.end_s:
                return span.index
    return best


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


# --------------------------------------------------------------------------- /metrics


def metrics_url(ws_url: str) -> str:
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/metrics", "", ""))


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value summed over its label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        totals[name.strip()] = totals.get(name.strip(), 0.0) + value
    return totals


def fetch_metrics(url: str, timeout: float = 5.0) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                return None
            return parse_prometheus(response.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def server_rtf(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """(encoder + decoder seconds) / audio seconds between two /metrics readings."""
    if not before or not after:
        return None
    names = ("breeze_encoder_seconds_total", "breeze_decoder_seconds_total", "breeze_audio_seconds_total")
    if not all(name in after for name in names):
        return None
    delta = {name: after[name] - before.get(name, 0.0) for name in names}
    audio = delta["breeze_audio_seconds_total"]
    if audio <= 0:
        return None
    encoder, decoder = delta["breeze_encoder_seconds_total"], delta["breeze_decoder_seconds_total"]
    return {
        "rtf": (encoder + decoder) / audio,
        "encoder_rtf": encoder / audio,
        "decoder_rtf": decoder / audio,
        "encoder_s": encoder,
        "decoder_s": decoder,
        "audio_s": audio,
    }


# --------------------------------------------------------------------------- analysis


def analyze_stream(log: StreamLog, spans: list[ClipSpan]) -> dict[str, Any]:
    """Latencies, cadence, per-clip hypotheses and contract checks of one stream."""
    sr, fs, sends = log.sample_rate, log.frame_samples, log.send_times
    t_end = log.t_end
    records: list[dict] = []
    finals: list[dict] = []
    partials: list[dict] = []
    errors: list[dict] = []
    seen_end = False
    for arrival, event in log.events:
        kind = event.get("type")
        record: dict[str, Any] = {"arrival": arrival, "event": event}
        if kind in ("partial", "final") and isinstance(event.get("end"), (int, float)):
            start = float(event.get("start", event["end"]))
            end = float(event["end"])
            sent_end = audio_send_time(sends, fs, end, sr, "end")
            record["audio_end_sent"] = sent_end
            record["clip"] = assign_clip(start, end, spans)
            record["after_end"] = seen_end
            if kind == "final":
                record["latency"] = arrival - sent_end
                finals.append(record)
            else:
                record["lag"] = arrival - sent_end
                record["audio_start_sent"] = audio_send_time(sends, fs, start, sr, "start")
                partials.append(record)
        elif kind == "error":
            errors.append(event)
        elif kind == "end":
            seen_end = True
        records.append(record)

    # Segments: first partial, partial cadence, finals per segment.
    segments: dict[Any, dict] = {}
    for record in partials + finals:
        event = record["event"]
        segment = segments.setdefault(event.get("segment"), {"partials": [], "finals": []})
        segment["partials" if event["type"] == "partial" else "finals"].append(record)
    first_partial, gaps, audio_gaps, lost, duplicates = [], [], [], [], 0
    segment_rows = []
    for key, segment in segments.items():
        ps = sorted(segment["partials"], key=lambda r: r["arrival"])
        fl = segment["finals"]
        if len(fl) > 1:
            duplicates += len(fl) - 1
        if ps:
            first_partial.append(ps[0]["arrival"] - ps[0]["audio_start_sent"])
        if fl:
            seg_start, seg_end = float(fl[0]["event"].get("start", 0.0)), float(fl[0]["event"]["end"])
        else:
            seg_start, seg_end = float(ps[0]["event"].get("start", 0.0)), float(ps[-1]["event"]["end"])
        row = {
            "segment": key,
            "start": seg_start,
            "end": seg_end,
            "partials": len(ps),
            "finals": len(fl),
            "max_partial_gap": None,
            "max_partial_gap_audio": None,
        }
        if seg_end - seg_start > LONG_SEGMENT_S and len(ps) >= 2:
            seg_gaps = np.diff([r["arrival"] for r in ps])
            seg_audio_gaps = np.diff([float(r["event"]["end"]) for r in ps])
            gaps += seg_gaps.tolist()
            audio_gaps += seg_audio_gaps.tolist()
            row["max_partial_gap"] = float(seg_gaps.max())
            row["max_partial_gap_audio"] = float(seg_audio_gaps.max())
        if not fl and ps and str(ps[-1]["event"].get("text", "")).strip():  # text left on screen, never finalised
            lost.append(key)
        segment_rows.append(row)

    # Per clip: finals assigned to it, hypothesis, latency from the clip's own end.
    clips = []
    for span in spans:
        mine = sorted(
            (r for r in finals if r["clip"] == span.index),
            key=lambda r: (float(r["event"].get("start", 0.0)), r["arrival"]),
        )
        texts = [str(r["event"].get("text", "")).strip() for r in mine]
        clip_end_sent = sample_send_time(sends, fs, span.end - 1)
        clip_latency = (max(r["arrival"] for r in mine) - clip_end_sent) if mine else None
        clips.append(
            {
                "index": span.index,
                "finals": len(mine),
                "hypothesis": " ".join(t for t in texts if t),
                "clip_end_sent": clip_end_sent,
                "clip_end_latency": clip_latency,
            }
        )

    return {
        "stream": log.stream,
        "session": log.session,
        "model": log.model,
        "completed": log.failure is None and t_end is not None,
        "failure": log.failure,
        "records": records,
        "segments": segment_rows,
        "clips": clips,
        "final_latency": [r["latency"] for r in finals],
        "clip_end_latency": [c["clip_end_latency"] for c in clips if c["clip_end_latency"] is not None],
        "partial_lag": [r["lag"] for r in partials],
        "first_partial_latency": first_partial,
        "partial_gaps": gaps,
        "partial_gaps_audio": audio_gaps,
        "counts": {
            "partials": len(partials),
            "finals": len(finals),
            "segments": len(segments),
            "errors": len(errors),
            "lost_finals": len(lost),
            "finals_after_end": sum(1 for r in finals if r["after_end"]),
            "duplicate_finals": duplicates,
            "finals_outside_clips": sum(1 for r in finals if r["clip"] is None),
            "clips_without_final": sum(1 for c in clips if c["finals"] == 0),
            "frames_sent": log.frames_sent,
            "frames_total": len(sends),
        },
        "errors": errors,
        "lost_segments": lost,
        "stop_to_end": (t_end - log.t_stop) if (t_end is not None and log.t_stop is not None) else None,
        "pacing_max_late": float(np.nanmax(sends - log.scheduled)) if log.frames_sent else None,
    }


# --------------------------------------------------------------------------- scoring


def _score_clip(reference: str, hypothesis: str, lang: str) -> tuple[int, int] | None:
    """(errors, reference tokens) by streaming.scoring, or None if it is unavailable."""
    try:
        from streaming import scoring
    except ImportError:
        return None
    result = scoring.score(reference, hypothesis, lang)
    return result.errors, result.ref_tokens


def score_group(lang: str | None) -> str | None:
    """Corpus group a clip's errors count towards: 'zh' (CER, zh and mix) or 'en' (WER)."""
    if lang in ("zh", "mix"):
        return "zh"
    if lang == "en":
        return "en"
    return None


# --------------------------------------------------------------------------- whole run


def summarize(
    plan: StreamPlan,
    analyses: list[dict],
    rtf: dict | None,
    scorer: Callable[[str, str, str], tuple[int, int] | None] = _score_clip,
) -> dict[str, Any]:
    """Aggregate over streams: latency stats, per-clip results, corpus CER/WER, checks."""
    pool = lambda key: [v for a in analyses for v in a[key]]  # noqa: E731
    per_clip = []
    corpus: dict[str, list[int]] = {}
    scoring_missing = False
    for span in plan.spans:
        rows = [a["clips"][span.index] for a in analyses]
        entry: dict[str, Any] = {
            "index": span.index,
            "name": span.name,
            "lang": span.lang,
            "start": span.start_s,
            "end": span.end_s,
            "duration": span.duration_s,
            "reference": span.reference,
            "hypotheses": [r["hypothesis"] for r in rows],
            "finals": [r["finals"] for r in rows],
            "clip_end_latency": [r["clip_end_latency"] for r in rows],
            "errors": None,
            "ref_tokens": None,
            "error_rate": None,
        }
        group = score_group(span.lang)
        if span.reference is not None and group is not None:
            scored = [scorer(span.reference, r["hypothesis"], span.lang) for r in rows]
            if any(s is None for s in scored):
                scoring_missing = True
            else:
                errors, tokens = sum(s[0] for s in scored), sum(s[1] for s in scored)
                entry.update(errors=errors, ref_tokens=tokens, error_rate=errors / tokens if tokens else None)
                total = corpus.setdefault(group, [0, 0, 0])
                total[0] += errors
                total[1] += tokens
                total[2] += 1
        per_clip.append(entry)

    counts: dict[str, int] = {}
    for a in analyses:
        for key, value in a["counts"].items():
            counts[key] = counts.get(key, 0) + value
    accuracy = {}
    for group, (errors, tokens, n) in corpus.items():
        accuracy["cer_zh_mix" if group == "zh" else "wer_en"] = {
            "rate": errors / tokens if tokens else None,
            "errors": errors,
            "ref_tokens": tokens,
            "clips": n,
        }
    gaps = pool("partial_gaps")
    audio_gaps = pool("partial_gaps_audio")
    stop_to_end = [a["stop_to_end"] for a in analyses if a["stop_to_end"] is not None]
    pacing = [a["pacing_max_late"] for a in analyses if a["pacing_max_late"] is not None]
    checks = {
        "all_streams_completed": all(a["completed"] for a in analyses),
        "every_clip_has_final": counts.get("clips_without_final", 0) == 0,
        "no_lost_finals": counts.get("lost_finals", 0) == 0 and counts.get("finals_after_end", 0) == 0,
        "no_duplicate_finals": counts.get("duplicate_finals", 0) == 0,
        "no_errors": counts.get("errors", 0) == 0,
    }
    return {
        "streams": len(analyses),
        "clips": len(plan.spans),
        "stream_audio_s": plan.duration_s,
        "final_latency": stats(pool("final_latency")),
        "clip_end_latency": stats(pool("clip_end_latency")),
        "partial_lag": stats(pool("partial_lag")),
        "first_partial_latency": stats(pool("first_partial_latency")),
        "partial_gap": stats(gaps),
        "partial_gap_audio_max": max(audio_gaps) if audio_gaps else None,
        "accuracy": accuracy,
        "scoring_unavailable": scoring_missing,
        "server_rtf": rtf,
        "stop_to_end": stats(stop_to_end),
        "pacing_max_late": max(pacing) if pacing else None,
        "counts": counts,
        "checks": checks,
        "ok": all(checks.values()),
        "per_clip": per_clip,
        "per_stream": [
            {
                "stream": a["stream"],
                "session": a["session"],
                "completed": a["completed"],
                "failure": a["failure"],
                "final_latency": stats(a["final_latency"]),
                "clip_end_latency": stats(a["clip_end_latency"]),
                "partial_lag": stats(a["partial_lag"]),
                "first_partial_latency": stats(a["first_partial_latency"]),
                "stop_to_end": a["stop_to_end"],
                "counts": a["counts"],
            }
            for a in analyses
        ],
    }


class _Progress:
    """tqdm over sent audio seconds (all streams), with finals and the last final latency."""

    def __init__(self, total_s: float, enabled: bool) -> None:
        self.bar = None
        self.finals = 0
        self.errors = 0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total_s,
                    unit="s",
                    desc="replay",
                    file=sys.stderr,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio "
                    "[{elapsed}<{remaining}]{postfix}",
                    mininterval=0.25,
                )
            except ImportError:  # pragma: no cover
                self.bar = None

    def audio(self, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(seconds)

    def event(self, stream: int, t: float, event: dict, latency: float | None = None) -> None:
        kind = event.get("type")
        if kind == "final":
            self.finals += 1
        elif kind == "error":
            self.errors += 1
            if self.bar is not None:
                self.bar.write(f"stream {stream}: error {event.get('code')}: {event.get('message')}")
        if self.bar is not None and kind in ("final", "error"):
            postfix = f"finals={self.finals}"
            if latency is not None:
                postfix += f" last latency={latency:.2f}s"
            if self.errors:
                postfix += f" errors={self.errors}"
            self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def replay(
    plan: StreamPlan,
    url: str,
    *,
    concurrency: int = 1,
    speed: float = 1.0,
    frame_ms: float = 40.0,
    language: str = "zh",
    stagger: float = 0.0,
    end_timeout: float = 120.0,
    progress: bool = True,
) -> tuple[list[StreamLog], dict | None, dict | None, float]:
    """Run `concurrency` streams of the plan; returns their logs, /metrics before and after, t_ref."""
    murl = metrics_url(url)
    before = await asyncio.to_thread(fetch_metrics, murl)
    bar = _Progress(plan.duration_s * concurrency, progress)
    t_ref = clock()

    def on_event(log: StreamLog, t: float, event: dict) -> None:
        latency = None
        if event.get("type") == "final" and isinstance(event.get("end"), (int, float)):
            latency = t - audio_send_time(log.send_times, log.frame_samples, event["end"], log.sample_rate)
        bar.event(log.stream, t, event, latency)

    def one(index: int):
        return run_stream(
            url,
            plan,
            stream=index,
            t_ref=t_ref,
            frame_ms=frame_ms,
            speed=speed,
            language=language,
            delay=index * stagger,
            end_timeout=end_timeout,
            on_audio=bar.audio,
            on_event=on_event,
        )

    try:
        logs = list(await asyncio.gather(*(one(i) for i in range(concurrency))))
    finally:
        bar.close()
    after = await asyncio.to_thread(fetch_metrics, murl)
    return logs, before, after, t_ref


# --------------------------------------------------------------------------- output


def _fit(text: str, width: int) -> str:
    """Cut `text` to `width` display columns (CJK counts 2) and pad it."""
    out, used = [], 0
    for ch in text:
        w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + w > width - (1 if len(out) < len(text) else 0):
            out.append("…")
            used += 1
            break
        out.append(ch)
        used += w
    return "".join(out) + " " * max(0, width - used)


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_summary(summary: dict, config: dict) -> str:
    lines = []
    lines.append(
        f"replay of {summary['clips']} clips, {summary['stream_audio_s']:.1f} s of stream audio per stream, "
        f"{summary['streams']} stream(s), speed {config['speed']:g}, {config['frame_ms']:g} ms frames, "
        f"gap {config['gap']:g} s -> {config['url']}"
    )
    models = sorted({s.get("model") or "?" for s in config.get("sessions", [])})
    if models:
        lines.append(f"model: {', '.join(models)}")
    lines.append("")
    lines.append(f"{'latency (s)':<34}{'n':>6}{'p50':>9}{'p95':>9}{'max':>9}")
    for key, label in (
        ("final_latency", "final latency (segment end)"),
        ("clip_end_latency", "final latency (clip end)"),
        ("partial_lag", "partial lag"),
        ("first_partial_latency", "first-partial latency"),
        ("partial_gap", f"partial gap (segments > {LONG_SEGMENT_S:g} s)"),
        ("stop_to_end", "stop -> end"),
    ):
        s = summary[key]
        lines.append(f"{label:<34}{s['n']:>6}{_num(s['p50']):>9}{_num(s['p95']):>9}{_num(s['max']):>9}")
    if summary["partial_gap_audio_max"] is not None:
        lines.append(f"  (largest partial gap in stream audio: {summary['partial_gap_audio_max']:.2f} s)")
    lines.append("")
    acc = summary["accuracy"]
    parts = []
    if "cer_zh_mix" in acc:
        a = acc["cer_zh_mix"]
        parts.append(f"zh+mix CER {_pct(a['rate'])} ({a['errors']}/{a['ref_tokens']} tokens, {a['clips']} clips)")
    if "wer_en" in acc:
        a = acc["wer_en"]
        parts.append(f"en WER {_pct(a['rate'])} ({a['errors']}/{a['ref_tokens']} words, {a['clips']} clips)")
    if summary["scoring_unavailable"]:
        parts.append("scoring unavailable (streaming.scoring missing)")
    lines.append("accuracy: " + ("; ".join(parts) if parts else "no references (plain audio files)"))
    rtf = summary["server_rtf"]
    if rtf:
        lines.append(
            f"server RTF {rtf['rtf']:.3f} (encoder {rtf['encoder_rtf']:.3f}, decoder {rtf['decoder_rtf']:.3f})"
            f" over {rtf['audio_s']:.1f} s of audio, from /metrics"
        )
    else:
        lines.append("server RTF: unavailable (/metrics not reachable or without breeze_* seconds counters)")
    c = summary["counts"]
    lines.append(
        f"events: {c.get('finals', 0)} finals, {c.get('partials', 0)} partials, {c.get('segments', 0)} segments; "
        f"clips without final {c.get('clips_without_final', 0)}, lost finals {c.get('lost_finals', 0)}, "
        f"finals after end {c.get('finals_after_end', 0)}, duplicate finals {c.get('duplicate_finals', 0)}, "
        f"finals outside clips {c.get('finals_outside_clips', 0)}, errors {c.get('errors', 0)}"
    )
    if summary["pacing_max_late"] is not None:
        lines.append(
            f"pacing: largest lateness of a frame against its schedule {1000 * summary['pacing_max_late']:.1f} ms"
        )
    if summary["streams"] > 1 or any(not s["completed"] for s in summary["per_stream"]):
        lines.append("")
        lines.append(
            f"{'stream':<8}{'session':<14}{'finals':>7}{'p50':>8}{'p95':>8}{'max':>8}{'stop->end':>11}  status"
        )
        for s in summary["per_stream"]:
            fl = s["final_latency"]
            status = "ok" if s["completed"] else f"FAILED: {s['failure']}"
            lines.append(
                f"{s['stream']:<8}{_fit(str(s['session'] or '-'), 13)} {s['counts']['finals']:>7}"
                f"{_num(fl['p50'], '{:.2f}'):>8}{_num(fl['p95'], '{:.2f}'):>8}{_num(fl['max'], '{:.2f}'):>8}"
                f"{_num(s['stop_to_end'], '{:.2f}'):>11}  {status}"
            )
    lines.append("")
    lines.append(f"{'#':>3}  {_fit('clip', 30)} {'lang':<5}{'dur':>6}{'finals':>8}{'err%':>8}{'lat(s)':>8}  hypothesis")
    for row in summary["per_clip"]:
        finals = ",".join(str(n) for n in row["finals"])
        lat = [v for v in row["clip_end_latency"] if v is not None]
        hyp = row["hypotheses"][0] if row["hypotheses"] else ""
        lines.append(
            f"{row['index']:>3}  {_fit(row['name'], 30)} {(row['lang'] or '-'):<5}{row['duration']:>6.1f}"
            f"{finals:>8}{_pct(row['error_rate']):>8}{_num(max(lat) if lat else None, '{:.2f}'):>8}  "
            f"{_fit(hyp, 40).rstrip()}"
        )
    lines.append("")
    if any(v < 0 for row in summary["per_clip"] for v in row["clip_end_latency"] if v is not None):
        lines.append(
            "negative lat(s): the clip's final arrived before its last sample was sent: the clip ends in "
            "more silence than the server's hangover, so its segment closed inside the clip"
        )
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append("checks: " + ("all passed" if not failed else "FAILED " + ", ".join(failed)))
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def build_report(plan: StreamPlan, logs: list[StreamLog], analyses: list[dict], summary: dict, config: dict) -> dict:
    return _jsonable(
        {
            "config": config,
            "clips": [
                {
                    "index": s.index,
                    "name": s.name,
                    "lang": s.lang,
                    "start": s.start_s,
                    "end": s.end_s,
                    "reference": s.reference,
                }
                for s in plan.spans
            ],
            "summary": {k: v for k, v in summary.items() if k != "per_clip"},
            "per_clip": summary["per_clip"],
            "streams": [
                {
                    "stream": log.stream,
                    "session": log.session,
                    "model": log.model,
                    "failure": log.failure,
                    "frame_samples": log.frame_samples,
                    "sample_rate": log.sample_rate,
                    "t_open": log.t_open,
                    "t_ready": log.t_ready,
                    "t_first_frame": log.t_first_frame,
                    "t_stop": log.t_stop,
                    "t_end": log.t_end,
                    "t_closed": log.t_closed,
                    "close_code": log.close_code,
                    "close_reason": log.close_reason,
                    "frame_send_times": log.send_times,
                    "frame_scheduled": log.scheduled,
                    "events": analysis["records"],
                    "segments": analysis["segments"],
                }
                for log, analysis in zip(logs, analyses)
            ],
        }
    )


def plot_latencies(plan: StreamPlan, analyses: list[dict], summary: dict, path: str) -> None:
    """Final latency and partial lag over stream time, clip spans shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(10.0, min(40.0, plan.duration_s / 8)), 5))
    for span in plan.spans:
        ax.axvspan(span.start_s, span.end_s, color="0.88" if span.index % 2 == 0 else "0.8", lw=0)
        ax.text(
            (span.start_s + span.end_s) / 2,
            1.0,
            str(span.index),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize="x-small",
            color="0.35",
        )
    streams = len(analyses)
    px, py, fx, fy, cx, cy = [], [], [], [], [], []
    for analysis in analyses:
        for record in analysis["records"]:
            event = record["event"]
            if event.get("type") == "partial" and "lag" in record:
                px.append(float(event["end"]))
                py.append(record["lag"])
            elif event.get("type") == "final" and "latency" in record:
                fx.append(float(event["end"]))
                fy.append(record["latency"])
        for row in analysis["clips"]:
            if row["clip_end_latency"] is not None:
                cx.append(plan.spans[row["index"]].end_s)
                cy.append(row["clip_end_latency"])
    ax.scatter(px, py, s=6, color="tab:blue", alpha=0.5, label="partial lag", zorder=2)
    ax.scatter(fx, fy, s=28, color="tab:red", label="final latency (segment end)", zorder=3)
    ax.scatter(cx, cy, s=40, marker="x", color="black", label="final latency (clip end)", zorder=4)
    ax.set_xlim(0, plan.duration_s)
    ax.axhline(0.0, color="0.5", lw=0.8, zorder=1)
    ax.set_xlabel("stream time (s of audio)")
    ax.set_ylabel("seconds after the audio was sent")
    fl = summary["final_latency"]
    title = f"replay: {summary['clips']} clips, {streams} stream(s)"
    if fl["n"]:
        title += f"; final latency p50 {fl['p50']:.2f} s, p95 {fl['p95']:.2f} s"
    ax.set_title(title + " (shaded: clips)", pad=14)
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def check_stream_arguments(args: argparse.Namespace) -> str | None:
    """What replay and bench-load share: frame size, silence gap and the server's URL."""
    if not 20 <= args.frame_ms <= 100:
        return "--frame-ms must be between 20 and 100"
    if args.gap < 0:
        return "--gap must not be negative"
    if urllib.parse.urlsplit(args.url).scheme not in ("ws", "wss"):
        return f"--url must be a ws:// or wss:// URL, got {args.url!r}"
    return None


def _check_args(args: argparse.Namespace) -> str | None:
    if args.speed <= 0:
        return "--speed must be positive"
    if args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.stagger < 0:
        return "--stagger must not be negative"
    if args.limit is not None and args.limit < 1:
        return "--limit must be at least 1"
    return check_stream_arguments(args)


def _headline(summary: dict) -> str:
    fl, acc = summary["final_latency"], summary["accuracy"]
    parts = [f"final latency p50 {_num(fl['p50'], '{:.2f}')} s p95 {_num(fl['p95'], '{:.2f}')} s"]
    if "cer_zh_mix" in acc:
        parts.append(f"CER {_pct(acc['cer_zh_mix']['rate'])}")
    if "wer_en" in acc:
        parts.append(f"WER {_pct(acc['wer_en']['rate'])}")
    if summary["server_rtf"]:
        parts.append(f"server RTF {summary['server_rtf']['rtf']:.3f}")
    parts.append("checks ok" if summary["ok"] else "checks FAILED")
    return "; ".join(parts)


def session_language(clip: Clip) -> str:
    """The start message's language for a clip: its manifest `lang` (mix, Mandarin-English
    code-switching, is zh; another code is auto), zh for audio files without a manifest."""
    return {None: "zh", "zh": "zh", "mix": "zh", "en": "en"}.get(clip.lang, "auto")


def language_groups(clips: list[Clip], language: str | None) -> list[tuple[str, list[int]]]:
    """(language, clip indices) per session language, in order of first appearance: one group
    when --language names one, else one per language the clips have (a session has one language)."""
    groups: dict[str, list[int]] = {}
    for index, clip in enumerate(clips):
        groups.setdefault(language or session_language(clip), []).append(index)
    return list(groups.items())


def run_replay(args: argparse.Namespace) -> int:
    """Replays the clips, one run per session language (language_groups); prints each run's table
    and writes its report (--json: the report, or {"groups": [report, ...]} for several languages;
    --plot: one file per language, named OUT-LANG.png, for several)."""
    problem = _check_args(args)
    if problem:
        print(f"breeze-stream replay: {problem}", file=sys.stderr)
        return 2
    try:
        clips = read_inputs(args.inputs)
        if args.limit:
            clips = clips[: args.limit]
        audios = [_load_audio(clip.path) for clip in clips]
    except ReplayInputError as exc:
        print(f"breeze-stream replay: {exc}", file=sys.stderr)
        return 2
    groups = language_groups(clips, args.language)
    reports, ok = [], True
    for language, members in groups:
        if len(groups) > 1:
            print(f"\n== {len(members)} clip(s) in {language} sessions ==")
        plan = build_stream([clips[i] for i in members], [audios[i] for i in members], args.gap)
        plot = args.plot
        if plot and len(groups) > 1:  # out.png -> out-zh.png, out-en.png
            plot = str(Path(plot).with_stem(f"{Path(plot).stem}-{language}"))
        result = _replay_plan(args, plan, language, plot)
        if result is None:
            return 130
        if not result:
            return 2
        summary, report = result
        ok = ok and summary["ok"]
        reports.append(report)
    if args.json_out:
        document = reports[0] if len(reports) == 1 else {"groups": reports}
        Path(args.json_out).write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0 if ok else 1


def _replay_plan(
    args: argparse.Namespace, plan: StreamPlan, language: str, plot: str | None
) -> tuple[dict, dict] | None | bool:
    """One run over `plan`: (summary, report), its plot drawn to `plot`; False when no stream could
    start, None on Ctrl-C."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        logs, before, after, _ = asyncio.run(
            replay(
                plan,
                args.url,
                concurrency=args.concurrency,
                speed=args.speed,
                frame_ms=args.frame_ms,
                language=language,
                stagger=args.stagger,
                end_timeout=args.end_timeout,
                progress=not args.no_progress,
            )
        )
    except KeyboardInterrupt:
        print("breeze-stream replay: interrupted", file=sys.stderr)
        return None
    if all(log.t_ready is None for log in logs):
        print(f"breeze-stream replay: {logs[0].failure}", file=sys.stderr)
        return False
    analyses = [analyze_stream(log, plan.spans) for log in logs]
    summary = summarize(plan, analyses, server_rtf(before, after))
    config = {
        "url": args.url,
        "inputs": list(args.inputs),
        "concurrency": args.concurrency,
        "stagger": args.stagger,
        "speed": args.speed,
        "gap": args.gap,
        "frame_ms": args.frame_ms,
        "language": language,
        "started": started,
        "sessions": [{"session": log.session, "model": log.model, "language": log.language} for log in logs],
        "metrics_before": before,
        "metrics_after": after,
    }
    print(_headline(summary) if args.quiet else format_summary(summary, config))
    if plot:
        plot_latencies(plan, analyses, summary, plot)
    return summary, build_report(plan, logs, analyses, summary, config)


def main(argv: list[str] | None = None) -> int:
    from .options import add_replay_arguments

    parser = argparse.ArgumentParser(prog="breeze-stream replay", description=__doc__.split("\n\n")[0])
    add_replay_arguments(parser)
    return run_replay(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
