"""Replay harness: play audio clips to a running server as a live stream and measure it.

`breeze-stream replay (MANIFEST | WAV...) --url ws://HOST:PORT/v1/stream` concatenates the clips
of each session language (a clip's manifest ``lang``, unless ``--language`` names one for all) into
one stream (``--gap`` seconds of silence before the first clip, between clips and after the
last one, so the last segment closes on its own before ``stop``), converts it to pcm_s16le 16 kHz
and sends it over the native protocol (docs/architecture.md) in ``--frame-ms`` frames at real-time pace
times ``--speed``. Frame k is sent at ``t0 + k * frame / speed`` on the monotonic clock (an
absolute schedule: a late frame does not delay the ones after it). The harness records the time
each frame was handed to the socket and the arrival time of every event, and computes
(docs/architecture.md, Measuring):

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
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from .analysis import analyze_stream, fetch_metrics, metrics_url, server_rtf, summarize
from .pacing import (
    Clip,
    ReplayInputError,
    StreamLog,
    StreamPlan,
    audio_send_time,
    build_stream,
    clock,
    load_clip_audio,
    read_inputs,
    run_stream,
)
from .report import build_report, format_summary, plot_latencies, show_number, show_percent


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
    parts = [f"final latency p50 {show_number(fl['p50'], '{:.2f}')} s p95 {show_number(fl['p95'], '{:.2f}')} s"]
    if "cer_zh_mix" in acc:
        parts.append(f"CER {show_percent(acc['cer_zh_mix']['rate'])}")
    if "wer_en" in acc:
        parts.append(f"WER {show_percent(acc['wer_en']['rate'])}")
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
        audios = [load_clip_audio(clip.path) for clip in clips]
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
