"""`breeze-stream bench-readme`: every CPU figure README.md states, measured again on this machine.

One run, each figure beside its peer measured in the same run, so that a busy machine slows both:

1. offline speed and accuracy: faster-whisper int8 with its defaults (beam 1) and our engine
   (greedy: the full 30 s window computed in full, the defaults, the shortened window of
   `--window`) on the same clips and the same whisper-base weights, in this process, every clip
   through all four before the next (bench.offline); speed as the ratio of the times, not as
   absolute real-time factors;
2. live latency: the default server started as a subprocess (`breeze-stream serve`), the clips
   replayed to it at real-time pace by one stream, then by three streams at once (bench.replay:
   final latency from the segment's end, first-partial latency, streaming CER); three streams
   whose segments end at the same moments are the peer of one;
3. memory: the server's resident set (VmRSS) while `--memory-streams` streams play the first
   `--memory-seconds` of the clips at once: before the first session, peak, and after they end.

It prints a table with the machine's CPU model, cores and load average before and after (the
figures move with the load of other processes: compare ratios), and writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from streaming.options import CLIPS_HELP

from .cli_server import rss_bytes


def add_readme_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("clips", metavar="MANIFEST_OR_FOLDER", help=CLIPS_HELP)
    parser.add_argument(
        "--window",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="the shortened encoder window of the offline pass: clip + this much silence (default 2.0)",
    )
    parser.add_argument(
        "--memory-streams",
        type=int,
        default=10,
        metavar="N",
        help="streams at once while the server's memory is sampled (default 10)",
    )
    parser.add_argument(
        "--memory-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="audio each memory stream plays: the first clips up to this long (default 60)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N clips (a quick check)")
    parser.add_argument(
        "--parts", default="offline,replay,memory", help="which parts to run, among offline,replay,memory (default all)"
    )
    parser.add_argument("--json", metavar="OUT", help="write every figure and the machine here")


def machine() -> dict:
    """CPU model, cores, load average, date: what a figure on a shared machine needs beside it."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {
        "cpu": model.group(1) if model else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


# --- 1. offline ------------------------------------------------------------------------------------


def offline(clips, window: float) -> dict:
    """faster-whisper int8 and our engine (full window, defaults, shortened window) on the same clips."""
    import torch

    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise SystemExit(
            "bench-readme's offline part runs faster-whisper beside our engine: "
            "pip install -e '.[bench]' (or --parts replay,memory)"
        ) from None

    from engines.whisper.audio import load_audio

    from .offline import default_ct2_dir, error_rates, faster_whisper_step, interleaved, our_steps

    torch.set_num_threads(2)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # a line per clip otherwise
    audios = [load_audio(clip.audio) for clip in clips]
    seconds = sum(len(a) for a in audios) / 16000
    peer = WhisperModel(str(default_ct2_dir()), device="cpu", compute_type="int8", cpu_threads=2)
    ours, engines = our_steps("cpu", window)
    passes = interleaved({"peer": faster_whisper_step(peer, beam_size=1), **ours}, clips, audios)
    for engine in engines:
        engine.close()
    peer_rows, peer_time = passes.pop("peer")
    texts = lambda rows: [r["text"] for r in rows]  # noqa: E731
    report = {
        "audio_seconds": round(seconds, 2),
        "window": window,
        "faster_whisper_int8": {**error_rates(clips, texts(peer_rows)), "seconds": peer_time},
    }
    for name, (rows, spent) in passes.items():
        key = {"full": "full_window", "default": "default", "short": "short_window"}[name]
        report[f"ours_{key}"] = {**error_rates(clips, texts(rows)), "seconds": spent}
        report[f"speedup_{key}"] = peer_time / spent
    return report


# --- 2./3. the server -------------------------------------------------------------------------------


class ServerProcess:
    """`breeze-stream serve --port 0 --admission off` with the default model; its port from the
    'listening on' line. The figures are the engine's and the server's, not admission's: on a busy
    box admission would refuse part of the three-stream run."""

    def __init__(self) -> None:
        command = [
            sys.executable,
            "-m",
            "breeze_stream",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admission",
            "off",
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        port = None
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(r"listening on ws://[\d.]+:(\d+)/", line):
                port = int(match.group(1))
                break
        if port is None:
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.url = f"ws://127.0.0.1:{port}/v1/stream"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the server did not become ready:\n" + "".join(self.log))

    def rss_mib(self) -> float:
        return rss_bytes(self.proc.pid) / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def replay_figures(url: str, clips, audios, streams: int) -> dict:
    """`streams` streams of the clips at real-time pace, one session per language; pooled figures."""
    import asyncio

    from .analysis import analyze_stream, stats, summarize
    from .pacing import build_stream
    from .replay import language_groups, replay

    latencies, first_partials, errors, tokens, finals, clip_count = [], [], 0, 0, 0, 0
    for language, members in language_groups(clips, None):
        plan = build_stream([clips[i] for i in members], [audios[i] for i in members], 1.5)
        logs, _, _, _ = asyncio.run(replay(plan, url, concurrency=streams, language=language, progress=False))
        failed = [log.failure for log in logs if log.failure]
        if failed:
            raise RuntimeError(f"replay failed: {failed[0]}")
        analyses = [analyze_stream(log, plan.spans) for log in logs]
        summary = summarize(plan, analyses, None)
        for analysis in analyses:
            latencies += analysis["final_latency"]
            first_partials += analysis["first_partial_latency"]
        accuracy = summary["accuracy"].get("cer_zh_mix")
        if accuracy:
            errors, tokens = errors + accuracy["errors"], tokens + accuracy["ref_tokens"]
        finals += summary["counts"]["finals"]
        clip_count += len(members) * streams
    return {
        "streams": streams,
        "final_latency": stats(latencies),
        "first_partial_latency": stats(first_partials),
        "streaming_cer": errors / tokens if tokens else None,
        "finals": finals,
        "clip_plays": clip_count,
    }


def memory_figures(server: ServerProcess, url: str, clips, audios, streams: int, seconds: float) -> dict:
    """VmRSS before, at its peak while `streams` streams play the first `seconds` of audio, and after."""
    import asyncio

    from .pacing import build_stream
    from .replay import replay

    chosen, total = [], 0.0
    for clip, audio in zip(clips, audios):
        if total >= seconds:
            break
        chosen.append((clip, audio))
        total += len(audio) / 16000
    plan = build_stream([c for c, _ in chosen], [a for _, a in chosen], 1.0)
    before = server.rss_mib()
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(server.rss_mib())
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    logs, _, _, _ = asyncio.run(replay(plan, url, concurrency=streams, progress=False, end_timeout=600))
    done.set()
    sampler.join()
    return {
        "streams": streams,
        "audio_seconds_per_stream": round(plan.duration_s, 1),
        "rss_before_mib": before,
        "rss_peak_mib": max(samples),
        "rss_after_mib": server.rss_mib(),
        "completed_streams": sum(log.failure is None for log in logs),
    }


# --- the command -------------------------------------------------------------------------------------


def run_readme(args: argparse.Namespace) -> int:
    from streaming.manifest import read_clips

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"offline", "replay", "memory"}:
        print(f"error: --parts takes offline, replay, memory; got {args.parts}", file=sys.stderr)
        return 2
    try:
        clips = read_clips(Path(args.clips))[: args.limit]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report: dict = {"machine_before": machine(), "clips": len(clips), "command": " ".join(sys.argv)}
    if "offline" in parts:
        report["offline"] = offline(clips, args.window)
    if parts & {"replay", "memory"}:
        from .pacing import load_clip_audio, read_inputs

        replay_clips = read_inputs([args.clips])[: args.limit]
        audios = [load_clip_audio(clip.path) for clip in replay_clips]
        server = ServerProcess()
        try:
            if "memory" in parts:  # first, so that its 'before' is the freshly loaded server
                report["memory"] = memory_figures(
                    server, server.url, replay_clips, audios, args.memory_streams, args.memory_seconds
                )
            if "replay" in parts:
                report["replay_1"] = replay_figures(server.url, replay_clips, audios, 1)
                report["replay_3"] = replay_figures(server.url, replay_clips, audios, 3)
        finally:
            server.stop()
    report["machine_after"] = machine()
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


def format_table(report: dict) -> str:
    before, after = report["machine_before"], report["machine_after"]
    lines = [
        f"{before['cpu']}, {before['cores']} cores; load average {before['load_average']} before, "
        f"{after['load_average']} after; {before['date']}; {report['clips']} clips",
        "",
    ]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    sec = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    if "offline" in report:
        o = report["offline"]
        peer = o["faster_whisper_int8"]
        lines.append(
            f"offline, {o['audio_seconds']:.0f} s of audio   CER (zh+mix)  WER (en)  seconds  speed vs faster-whisper int8"
        )
        for name, label in (
            ("faster_whisper_int8", "faster-whisper int8 (beam 1)"),
            ("ours_full_window", "ours, 30 s window in full"),
            ("ours_default", "ours, defaults (padding sampled)"),
            ("ours_short_window", f"ours, clip + {o['window']:g} s window"),
        ):
            r = o[name]
            ratio = peer["seconds"] / r["seconds"]
            lines.append(f"  {label:<31}{pct(r['cer']):>12}{pct(r['wer_en']):>10}{r['seconds']:>9.1f}  {ratio:.2f}x")
        lines.append("")
    for key in ("replay_1", "replay_3"):
        if key in report:
            r = report[key]
            fl, fp = r["final_latency"], r["first_partial_latency"]
            lines.append(
                f"live replay, {r['streams']} stream(s) at real-time pace: final latency p50 {sec(fl['p50'])} s "
                f"p95 {sec(fl['p95'])} s (n {fl['n']}); first partial p50 {sec(fp['p50'])} s p95 {sec(fp['p95'])} s; "
                f"streaming CER {pct(r['streaming_cer'])}; {r['finals']} finals for {r['clip_plays']} clip plays"
            )
    if "memory" in report:
        m = report["memory"]
        lines.append(
            f"server memory (VmRSS), {m['streams']} streams of {m['audio_seconds_per_stream']:.0f} s at once: "
            f"{m['rss_before_mib']:.0f} MiB before, peak {m['rss_peak_mib']:.0f} MiB, "
            f"{m['rss_after_mib']:.0f} MiB after ({m['completed_streams']}/{m['streams']} streams completed)"
        )
    return "\n".join(lines)
