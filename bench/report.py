"""How a replay run is shown and kept (bench.replay): the summary table, the JSON report with every
event and its times, and the latency plot."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import numpy as np

from .analysis import LONG_SEGMENT_S
from .pacing import StreamLog, StreamPlan

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


def show_number(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def show_percent(value: float | None) -> str:
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
        lines.append(
            f"{label:<34}{s['n']:>6}{show_number(s['p50']):>9}{show_number(s['p95']):>9}{show_number(s['max']):>9}"
        )
    if summary["partial_gap_audio_max"] is not None:
        lines.append(f"  (largest partial gap in stream audio: {summary['partial_gap_audio_max']:.2f} s)")
    lines.append("")
    acc = summary["accuracy"]
    parts = []
    if "cer_zh_mix" in acc:
        a = acc["cer_zh_mix"]
        parts.append(
            f"zh+mix CER {show_percent(a['rate'])} ({a['errors']}/{a['ref_tokens']} tokens, {a['clips']} clips)"
        )
    if "wer_en" in acc:
        a = acc["wer_en"]
        parts.append(f"en WER {show_percent(a['rate'])} ({a['errors']}/{a['ref_tokens']} words, {a['clips']} clips)")
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
                f"{show_number(fl['p50'], '{:.2f}'):>8}{show_number(fl['p95'], '{:.2f}'):>8}{show_number(fl['max'], '{:.2f}'):>8}"
                f"{show_number(s['stop_to_end'], '{:.2f}'):>11}  {status}"
            )
    lines.append("")
    lines.append(f"{'#':>3}  {_fit('clip', 30)} {'lang':<5}{'dur':>6}{'finals':>8}{'err%':>8}{'lat(s)':>8}  hypothesis")
    for row in summary["per_clip"]:
        finals = ",".join(str(n) for n in row["finals"])
        lat = [v for v in row["clip_end_latency"] if v is not None]
        hyp = row["hypotheses"][0] if row["hypotheses"] else ""
        lines.append(
            f"{row['index']:>3}  {_fit(row['name'], 30)} {(row['lang'] or '-'):<5}{row['duration']:>6.1f}"
            f"{finals:>8}{show_percent(row['error_rate']):>8}{show_number(max(lat) if lat else None, '{:.2f}'):>8}  "
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
