"""What a replayed stream's events say (bench.replay): latencies, cadence, streaming CER and the
contract checks of each stream, the server's real-time factor from `GET /metrics`, and the summary
over streams. The definitions are docs/architecture.md's (Measuring) and bench.replay's.
Percentiles are numpy's default (linear interpolation between closest ranks).
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .pacing import ClipSpan, StreamLog, StreamPlan, audio_send_time, sample_send_time

LONG_SEGMENT_S = 2.0
"""Partial cadence is measured on segments longer than this (issue 3: partials every <= 1 s)."""


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


# --------------------------------------------------------------------------- /metrics


def metrics_url(ws_url: str) -> str:
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/metrics", "", ""))


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value summed over its label sets; each labelled sample also under its own
    `NAME{LABELS}` key (as exported), and a histogram's buckets as `NAME_bucket:LE` (LE a float,
    inf included) for `histogram_quantile`."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels = ""
        if "{" in line:
            name, labels, rest = (
                line[: line.index("{")],
                line[line.index("{") : line.rindex("}")],
                line[line.rindex("}") + 1 :],
            )
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        name = name.strip()
        if not name or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
        if labels and not name.endswith("_bucket"):
            totals[f"{name}{labels}}}"] = totals.get(f"{name}{labels}}}", 0.0) + value
        le = re.search(r'le="([^"]+)"', labels) if name.endswith("_bucket") else None
        if le:
            key = f"{name}:{float(le.group(1))!r}"
            totals[key] = totals.get(key, 0.0) + value
    return totals


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """The q-quantile of histogram `name`'s observations between two readings, interpolated linearly
    within its bucket (as Prometheus' histogram_quantile); None without observations. Past the last
    finite bucket it answers that bucket's bound."""
    prefix = f"{name}_bucket:"
    bounds = sorted(float(k[len(prefix) :]) for k in after if k.startswith(prefix))
    counts = [after[f"{prefix}{b!r}"] - before.get(f"{prefix}{b!r}", 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == math.inf:
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


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
