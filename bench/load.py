"""Load generator: many concurrent real-time streams against a running server, from one command.

`breeze-stream bench-load MANIFEST_OR_AUDIO... --url ws://HOST:PORT/v1/stream --streams N --duration S`
plays N streams over the native protocol (docs/architecture.md) at real-time pace. Each stream loops the
clips in its own seeded shuffle, with `--gap` seconds of silence before, between and after them,
until it holds `--duration` seconds of audio (whole clips only: the last one may run past), then
sends `stop` and waits for `end`. Stream i starts i * ramp / N seconds after the first (`--ramp`,
by default one mean clip plus its gap), so that segment ends do not all coincide; `--sync` starts
every stream at once with the clips in manifest order (the synchronized load of `replay`).

The streams are dealt round-robin to `--processes` spawned OS processes, each with its own event
loop (uvloop where installed). Each process times its streams on its own send clock with
`bench.replay.run_stream`, which also defines the latencies (docs/architecture.md, Measuring), and sends
their summaries back here to be merged:

- latency (s; n, p50, p95, p99, max, mean): final (arrival - send time of the audio at the final's
  `end`), final from the clip's own end, first partial (first partial of a segment - send time of
  its `start`), partial gap (between consecutive partials of segments longer than 2 s), partial lag;
- counts: clips sent whole, lost finals (a clip sent whole that got no final), finals, partials,
  segments whose partial text never got a final, errors by code, disconnects (closed after `ready`
  and before `end`) by close code, streams that never connected or got no `end` in time;
- accuracy: finals assigned to clips by time, scored by `streaming.scoring` (CER for zh and mix,
  WER for en), per language group and per language;
- server, from GET /metrics before, every second during, and after the run: RTF, finals, mean
  server-side final latency, and where the engine exports them (`breeze_engine_*`) decoder steps,
  rows per step (batch occupancy), mean step time, windows per encoder call, queue depth (end, max,
  mean of the samples); absent figures are reported as null;
- client: CPU seconds (user + sys) of each process over the run and per wall second, and how late
  frames went out against their schedule (a saturated client shows there first).

Output: one summary line on stdout, a progress line on stderr every few seconds (not with
`--quiet`), the whole report as JSON with `--json OUT`. Exit status: 0 when it measured, with
losses or without (they are in the summary line and the report; the caller decides), 1 when a
client process failed (its streams have no figures), 2 when nothing could be measured (bad
arguments or inputs, no stream got `ready`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import traceback
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import analyze_stream, fetch_metrics, histogram_quantile, metrics_url, score_group, server_rtf, stats
from .pacing import (
    SAMPLE_RATE,
    Clip,
    ReplayInputError,
    StreamLog,
    StreamPlan,
    build_stream,
    clock,
    load_clip_audio,
    read_inputs,
    run_stream,
    to_pcm16,
)
from .replay import check_stream_arguments

READY_TIMEOUT = 30.0
"""Seconds for a connection to open and answer `start` with `ready`."""
SPAWN_TIMEOUT = 120.0
"""Seconds for a client process to start and build its streams."""
START_MARGIN = 0.3
"""The common start lies this far after the processes are told it, so that each hears it in time."""
PROGRESS_INTERVAL = 2.0
"""Client processes report their progress this often (seconds)."""
PRINT_INTERVAL = 5.0
"""A progress line on stderr this often (seconds)."""
SAMPLE_INTERVAL = 1.0
"""GET /metrics this often during the run (queue depth, batch rows)."""
LATENCIES = {
    "final": "final_latency",
    "clip_end": "clip_end_latency",
    "first_partial": "first_partial_latency",
    "partial_gap": "partial_gaps",
    "partial_lag": "partial_lag",
}
"""Report name -> the list of `bench.replay.analyze_stream` that holds it."""


# --------------------------------------------------------------------------- what each stream plays


@dataclass
class StreamJob:
    """One stream: the clips it plays (indices into the clip list), its language, when it starts."""

    stream: int
    order: list[int]
    language: str
    offset: float  # seconds after the run's common start


def plan_streams(
    durations: list[float],
    groups: list[str | None],
    *,
    streams: int,
    duration: float,
    gap: float,
    ramp: float,
    seed: int,
    sync: bool,
    language: str,
) -> list[StreamJob]:
    """Each stream's clips: its own seeded permutation (manifest order with `sync`), repeated until
    the stream holds `duration` seconds; stream i starts at i * ramp / streams (0 with `sync`).

    `language` "clip" gives each stream the language group of its first clip (zh for zh and mix, en)
    and only clips of that group; otherwise every stream sends `language` and plays every clip.
    """
    jobs = []
    for stream in range(streams):
        rng = np.random.default_rng([seed, stream])
        pool = list(range(len(durations)))
        stream_language = language
        if language == "clip":
            first = pool[0] if sync else int(rng.integers(len(pool)))
            pool = [i for i in pool if groups[i] == groups[first]]
            stream_language = "en" if groups[first] == "en" else "zh"
        order: list[int] = []
        total = gap
        while total < duration:
            for index in pool if sync else rng.permutation(pool).tolist():
                if total >= duration:
                    break
                order.append(index)
                total += durations[index] + gap
        jobs.append(StreamJob(stream, order, stream_language, 0.0 if sync else stream * ramp / streams))
    return jobs


class ClipLoop:
    """The int16 pieces of one stream (silence, clip, silence, ...) read as one array without
    joining them: `len` and slices are all `run_stream` reads, and every stream of a process shares
    the clips' audio, so a long run at hundreds of streams costs no stream-sized copies."""

    def __init__(self, pieces: list[np.ndarray]) -> None:
        self.pieces = pieces
        self.starts = np.cumsum([0] + [len(piece) for piece in pieces])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a ClipLoop is read in contiguous slices")
        out = []
        piece = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            first = start - self.starts[piece]
            chunk = self.pieces[piece][first : stop - self.starts[piece]]
            out.append(chunk)
            start += len(chunk)
            piece += 1
        return np.concatenate(out) if out else np.zeros(0, np.int16)


# --------------------------------------------------------------------------- a client process


@dataclass
class WorkerJob:
    """Everything one client process needs (pickled to it when it is spawned)."""

    process: int
    url: str
    clips: list[Clip]
    pcms: list[np.ndarray]  # int16 16 kHz, one per clip
    streams: list[StreamJob]
    gap: float
    frame_ms: float
    end_timeout: float


def _work(conn: Connection, job: WorkerJob) -> None:
    """A client process: builds its streams, says ready, waits for the common start (a monotonic
    clock reading: one clock for every process of the machine), plays them, sends back summaries."""
    try:
        plans = [
            build_stream([job.clips[i] for i in s.order], [job.pcms[i] for i in s.order], job.gap, join=ClipLoop)
            for s in job.streams
        ]
        conn.send(("ready", None))
        t_ref = conn.recv()
        conn.send(("done", _run_loop(_play(job, plans, t_ref, conn))))
    except BaseException:  # noqa: BLE001 - the parent must hear of any failure rather than wait for results
        try:
            conn.send(("failed", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


def _run_loop(main: Coroutine[Any, Any, dict]) -> dict:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _play(job: WorkerJob, plans: list[StreamPlan], t_ref: float, conn: Connection) -> dict:
    """Plays this process's streams from their start offsets; reports progress every few seconds."""
    progress = {"audio_s": 0.0, "finals": 0, "errors": 0, "open": 0, "done": 0}

    def on_audio(seconds: float) -> None:
        progress["audio_s"] += seconds

    def on_event(log: StreamLog, t: float, event: dict) -> None:
        kind = event.get("type")
        if kind in ("final", "error"):
            progress[kind + "s"] += 1

    async def one(stream: StreamJob, plan: StreamPlan) -> StreamLog:
        await asyncio.sleep(max(0.0, t_ref + stream.offset - clock()))
        progress["open"] += 1
        try:
            return await run_stream(
                job.url,
                plan,
                stream=stream.stream,
                t_ref=t_ref,
                frame_ms=job.frame_ms,
                speed=1.0,
                language=stream.language,
                ready_timeout=READY_TIMEOUT,
                end_timeout=job.end_timeout,
                on_audio=on_audio,
                on_event=on_event,
            )
        finally:
            progress["open"] -= 1
            progress["done"] += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            conn.send(("progress", dict(progress)))

    reporter = asyncio.create_task(report())
    cpu = os.times()
    try:
        logs = await asyncio.gather(*(one(s, p) for s, p in zip(job.streams, plans)))
    finally:
        reporter.cancel()
    used, wall = os.times(), clock() - t_ref
    return {
        "process": job.process,
        "pid": os.getpid(),
        "streams": len(job.streams),
        "cpu_user_s": used.user - cpu.user,
        "cpu_system_s": used.system - cpu.system,
        "wall_s": wall,
        "stream_summaries": [
            stream_summary(log, plan, s, job.process) for log, plan, s in zip(logs, plans, job.streams)
        ],
    }


def stream_summary(log: StreamLog, plan: StreamPlan, job: StreamJob, process: int) -> dict[str, Any]:
    """What the merge needs of one stream: latencies (raw), counts, per-clip hypotheses, how it ended."""
    analysis = analyze_stream(log, plan.spans)
    late = log.send_times - log.scheduled
    connected = log.t_ready is not None
    return {
        "stream": job.stream,
        "process": process,
        "session": log.session,
        "model": log.model,
        "language": job.language,
        "offset": job.offset,
        "t_first_frame": log.t_first_frame,
        "t_stop": log.t_stop,
        "t_end": log.t_end,
        "connected": connected,
        "completed": analysis["completed"],
        "client_failed": False,
        "disconnected": connected and log.t_end is None and not log.end_timed_out,
        "end_timed_out": log.end_timed_out,
        "close_code": log.close_code,
        "failure": log.failure,
        "clips": [
            {
                "clip": job.order[row["index"]],
                "sent": not math.isnan(row["clip_end_sent"]),
                "finals": row["finals"],
                "hypothesis": row["hypothesis"],
            }
            for row in analysis["clips"]
        ],
        "errors": dict(Counter(str(event.get("code")) for event in analysis["errors"])),
        "counts": analysis["counts"],
        "latency": {name: analysis[key] for name, key in LATENCIES.items()},
        "stop_to_end": analysis["stop_to_end"],
        "pacing_late_max": float(np.nanmax(late)) if log.frames_sent else None,
        "pacing_late_p99": float(np.nanpercentile(late, 99)) if log.frames_sent else None,
    }


def failed_stream(job: StreamJob, process: int, why: str) -> dict[str, Any]:
    """The summary of a stream whose client process failed: no figures, counted apart."""
    return {
        "stream": job.stream,
        "process": process,
        "session": None,
        "model": None,
        "language": job.language,
        "offset": job.offset,
        "t_first_frame": None,
        "t_stop": None,
        "t_end": None,
        "connected": False,
        "completed": False,
        "client_failed": True,
        "disconnected": False,
        "end_timed_out": False,
        "close_code": None,
        "failure": why,
        "clips": [],
        "errors": {},
        "counts": {},
        "latency": {name: [] for name in LATENCIES},
        "stop_to_end": None,
        "pacing_late_max": None,
        "pacing_late_p99": None,
    }


# --------------------------------------------------------------------------- driving the processes


@dataclass
class RunResult:
    processes: list[dict]  # per process: pid, cpu, wall (failed ones: the failure)
    streams: list[dict]  # stream summaries, by stream index
    before: dict[str, float] | None
    after: dict[str, float] | None
    samples: list[dict[str, float]]  # /metrics during the run


def drive(workers: list[WorkerJob], url: str, *, total_audio_s: float, run_s: float, show_progress: bool) -> RunResult:
    """Spawns one process per job, starts them together, collects progress and results, samples
    /metrics meanwhile. A process that dies or overruns `run_s` is reported, not waited for."""
    context = multiprocessing.get_context("spawn")
    procs, conns = [], []
    murl = metrics_url(url)
    try:
        for job in workers:
            conn, child = context.Pipe()
            proc = context.Process(target=_work, args=(child, job), name=f"bench-load-{job.process}", daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(conn)
        for index, conn in enumerate(conns):
            if not conn.poll(SPAWN_TIMEOUT):
                raise RuntimeError(f"client process {index} did not start within {SPAWN_TIMEOUT:g} s")
            kind, payload = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"client process {index} failed to start:\n{payload}")
        before = fetch_metrics(murl)
        t_ref = clock() + START_MARGIN
        for conn in conns:
            conn.send(t_ref)
        done, failures, progress, samples = {}, {}, {}, []
        pending = {conn: index for index, conn in enumerate(conns)}
        next_sample, next_print = t_ref, t_ref + PRINT_INTERVAL
        while pending:
            for conn in wait(list(pending), timeout=SAMPLE_INTERVAL):
                index = pending[conn]
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    procs[index].join(1.0)
                    kind, payload = "failed", f"exited with code {procs[index].exitcode} without results"
                if kind == "progress":
                    progress[index] = payload
                    continue
                (done if kind == "done" else failures)[index] = payload
                del pending[conn]
            now = clock()
            if now >= next_sample and pending:
                metrics = fetch_metrics(murl, timeout=2.0)
                if metrics is not None:
                    samples.append(metrics)
                next_sample = now + SAMPLE_INTERVAL
            if show_progress and now >= next_print:
                print(
                    progress_line(now - t_ref, progress, total_audio_s, samples[-1] if samples else None),
                    file=sys.stderr,
                    flush=True,
                )
                next_print = now + PRINT_INTERVAL
            if now - t_ref > run_s:
                for index in pending.values():
                    failures[index] = f"no results {run_s:.0f} s after the start"
                break
        after = fetch_metrics(murl)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5.0)
    processes, streams = [], []
    for job in workers:
        if job.process in done:
            result = done[job.process]
            streams += result.pop("stream_summaries")
            processes.append(result)
        else:
            why = f"client process {job.process} failed: {failures[job.process]}"
            processes.append({"process": job.process, "streams": len(job.streams), "failure": why})
            streams += [failed_stream(s, job.process, why) for s in job.streams]
    return RunResult(processes, sorted(streams, key=lambda s: s["stream"]), before, after, samples)


def progress_line(elapsed: float, progress: dict[int, dict], total_audio_s: float, metrics: dict | None) -> str:
    total = Counter()
    for figures in progress.values():
        total.update(figures)
    line = (
        f"bench-load {elapsed:6.0f} s: {total['audio_s']:.0f}/{total_audio_s:.0f} s of audio sent, "
        f"{total['open']} streams open, {total['done']} done, {total['finals']} finals, {total['errors']} errors"
    )
    if metrics is not None:
        line += f"; server: {metrics.get('breeze_sessions_active', 0):.0f} sessions"
        if "breeze_engine_queue_depth" in metrics:
            line += (
                f", queue {metrics['breeze_engine_queue_depth']:.0f}, "
                f"batch {metrics.get('breeze_engine_batch_rows', 0):.0f} rows"
            )
    return line


# --------------------------------------------------------------------------- merging


def merge_streams(streams: list[dict], clips: list[Clip]) -> dict[str, Any]:
    """Latency stats over every stream, counts, errors, close codes of disconnects, accuracy."""
    pooled = {name: stats(v for s in streams for v in s["latency"][name]) for name in LATENCIES}
    counted = Counter()
    errors = Counter()
    for s in streams:
        counted.update(s["counts"])
        errors.update(s["errors"])
    sent = [c for s in streams for c in s["clips"] if c["sent"]]
    with_final = sum(1 for c in sent if c["finals"] > 0)
    counts = {
        "streams": len(streams),
        "completed": sum(s["completed"] for s in streams),
        "connect_failures": sum(not s["connected"] and not s["client_failed"] for s in streams),
        "client_failures": sum(s["client_failed"] for s in streams),
        "disconnects": sum(s["disconnected"] for s in streams),
        "end_timeouts": sum(s["end_timed_out"] for s in streams),
        "clips_sent": len(sent),
        "clips_with_final": with_final,
        "lost_finals": len(sent) - with_final,
        "finals": counted["finals"],
        "partials": counted["partials"],
        "segments": counted["segments"],
        "segments_without_final": counted["lost_finals"],  # partial text left on screen, never finalised
        "duplicate_finals": counted["duplicate_finals"],
        "finals_after_end": counted["finals_after_end"],
        "finals_outside_clips": counted["finals_outside_clips"],
        "errors": counted["errors"],
    }
    return {
        "latency": pooled,
        "stop_to_end": stats(s["stop_to_end"] for s in streams),
        "counts": counts,
        "errors_by_code": dict(errors),
        "disconnect_close_codes": dict(Counter(str(s["close_code"]) for s in streams if s["disconnected"])),
        "failures": dict(Counter(s["failure"] for s in streams if s["failure"])),
        "accuracy": score_streams(streams, clips),
    }


def score_streams(streams: list[dict], clips: list[Clip]) -> dict[str, Any]:
    """Corpus error rates of the finals of every clip sent whole (a lost final scores as deletions):
    by group (zh+mix CER, en WER) and by language, the convention of `streaming.scoring`."""
    from streaming.scoring import Score, corpus_score, score

    by_key: dict[str, list[Score]] = {}
    for s in streams:
        for row in s["clips"]:
            clip = clips[row["clip"]]
            group = score_group(clip.lang)
            if not row["sent"] or clip.reference is None or group is None:
                continue
            result = score(clip.reference, row["hypothesis"], clip.lang)
            by_key.setdefault("cer_zh_mix" if group == "zh" else "wer_en", []).append(result)
            by_key.setdefault(f"lang:{clip.lang}", []).append(result)
    accuracy: dict[str, Any] = {"by_lang": {}}
    for key, scores in sorted(by_key.items()):
        total = corpus_score(scores)
        figures = {
            "rate": total.errors / total.ref_tokens if total.ref_tokens else None,
            "errors": total.errors,
            "ref_tokens": total.ref_tokens,
            "clips": len(scores),
        }
        if key.startswith("lang:"):
            accuracy["by_lang"][key[5:]] = figures
        else:
            accuracy[key] = figures
    return accuracy


def server_figures(before: dict | None, after: dict | None, samples: list[dict]) -> dict[str, Any]:
    """What the server's /metrics say about the run: RTF, finals, its own final latency, and the
    engine's load where it exports it (None where it does not, or /metrics was not reachable)."""
    if not before or not after:
        return {"available": False, "rtf": None, "engine": None}

    def delta(name: str) -> float | None:
        return after[name] - before.get(name, 0.0) if name in after else None

    def ratio(numerator: float | None, denominator: float | None, scale: float = 1.0) -> float | None:
        return scale * numerator / denominator if numerator is not None and denominator else None

    def sampled(name: str) -> dict[str, float | None]:
        values = [m[name] for m in samples if name in m]
        return {
            "end": after.get(name),
            "max": max(values) if values else None,
            "mean": float(np.mean(values)) if values else None,
            "samples": len(values),
        }

    def quantiles(name: str) -> list[float | None]:
        return [histogram_quantile(before, after, name, q) for q in (0.5, 0.95)]

    figures: dict[str, Any] = {
        "available": True,
        "rtf": server_rtf(before, after),
        "finals": delta("breeze_finals_total"),
        "final_latency_mean": ratio(
            delta("breeze_final_latency_seconds_sum"), delta("breeze_final_latency_seconds_count")
        ),
        # the server's own view of a final: its latency from the segment's end reaching the server, and
        # the engine's share of it (request to transcript), so that a load run shows where the time goes
        "final_latency_p50_p95": quantiles("breeze_final_latency_seconds"),
        "final_engine_mean": ratio(
            delta("breeze_final_engine_seconds_sum"), delta("breeze_final_engine_seconds_count")
        ),
        "final_engine_p50_p95": quantiles("breeze_final_engine_seconds"),
        # a labelled counter appears with its first increment: absent beside its other label, it is 0
        "early_finals": {
            o: delta(f'breeze_early_finals_total{{outcome="{o}"}}')
            or (0.0 if "breeze_early_finals_total" in after else None)
            for o in ("used", "void")
        },
        "sessions_active": sampled("breeze_sessions_active"),
        "engine": None,
    }
    steps = delta("breeze_engine_steps_total")
    if steps is not None:
        figures["engine"] = {
            "steps": steps,
            "rows_per_step": ratio(delta("breeze_engine_step_rows_total"), steps),
            "step_ms": ratio(delta("breeze_engine_step_seconds_total"), steps, 1000.0),
            "encoder_calls": delta("breeze_engine_encoder_calls_total"),
            "windows_per_encoder_call": ratio(
                delta("breeze_engine_encoder_windows_total"), delta("breeze_engine_encoder_calls_total")
            ),
            "queue_depth": sampled("breeze_engine_queue_depth"),
            "batch_rows": sampled("breeze_engine_batch_rows"),
        }
    return figures


def client_figures(processes: list[dict], streams: list[dict]) -> dict[str, Any]:
    """CPU the client processes used over the run, and the latest frame against its schedule."""
    for proc in processes:
        if "wall_s" in proc:
            proc["cpu_s"] = proc["cpu_user_s"] + proc["cpu_system_s"]
            proc["cores"] = proc["cpu_s"] / proc["wall_s"] if proc["wall_s"] > 0 else None
    measured = [p for p in processes if "wall_s" in p]
    wall = max((p["wall_s"] for p in measured), default=0.0)
    late_max = [s["pacing_late_max"] for s in streams if s["pacing_late_max"] is not None]
    late_p99 = [s["pacing_late_p99"] for s in streams if s["pacing_late_p99"] is not None]
    return {
        "processes": processes,
        "cpu_s": sum(p["cpu_s"] for p in measured),
        "wall_s": wall,
        "cores": sum(p["cpu_s"] for p in measured) / wall if wall > 0 else None,
        "busiest_process_cores": max((p["cores"] for p in measured if p["cores"] is not None), default=None),
        "pacing_late_max": max(late_max, default=None),
        "pacing_late_p99_max": max(late_p99, default=None),
    }


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(report: dict) -> str:
    """The one line on stdout: counts first, then latency, accuracy, server and client figures."""
    config, summary, server, client = report["config"], report["summary"], report["server"], report["client"]
    c, lat, acc = summary["counts"], summary["latency"], summary["accuracy"]
    parts = [
        f"streams={c['streams']}",
        f"dur={config['duration']:g}s",
        f"completed={c['completed']}/{c['streams']}",
        f"clips={c['clips_sent']}",
        f"finals={c['finals']}",
        f"lost={c['lost_finals']}",
        f"disconnects={c['disconnects']}",
        f"errors={c['errors']}",
    ]
    parts += [f"{key}={c[key]}" for key in ("connect_failures", "end_timeouts", "client_failures") if c[key]]
    final, first, gap = lat["final"], lat["first_partial"], lat["partial_gap"]
    parts.append(f"final p50={_fmt(final['p50'])} p95={_fmt(final['p95'])} p99={_fmt(final['p99'])} s")
    parts.append(f"first-partial p50={_fmt(first['p50'])} p95={_fmt(first['p95'])} s")
    parts.append(f"partial-gap p95={_fmt(gap['p95'])} s")
    for key, label in (("cer_zh_mix", "CER"), ("wer_en", "WER")):
        if key in acc:
            rate = acc[key]["rate"]
            parts.append(f"{label}={_fmt(None if rate is None else 100 * rate, '.1f')}%")
    parts.append(f"server_rtf={_fmt(server['rtf']['rtf'] if server.get('rtf') else None, '.3f')}")
    engine_p50, engine_p95 = server.get("final_engine_p50_p95") or (None, None)
    if engine_p95 is not None:
        parts.append(f"final-in-engine p50={_fmt(engine_p50)} p95={_fmt(engine_p95)} s")
    engine = server.get("engine")
    if engine:
        parts += [
            f"rows/step={_fmt(engine['rows_per_step'], '.1f')}",
            f"step={_fmt(engine['step_ms'], '.1f')}ms",
            f"queue_max={_fmt(engine['queue_depth']['max'], '.0f')}",
        ]
    else:
        parts.append("engine=n/a")
    parts.append(f"client_cpu={_fmt(client['cores'])} core (busiest process {_fmt(client['busiest_process_cores'])})")
    return " ".join(parts)


def _per_stream(s: dict) -> dict:
    """A stream's entry in the JSON report: its latency lists as stats."""
    return {
        **{k: v for k, v in s.items() if k != "latency"},
        "latency": {name: stats(values) for name, values in s["latency"].items()},
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------- CLI


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.streams < 1:
        return "--streams must be at least 1"
    if args.duration <= 0:
        return "--duration must be positive"
    if not 1 <= args.processes <= args.streams:
        return "--processes must be between 1 and --streams"
    if args.sync and args.ramp is not None:
        return "--sync starts every stream at once: it takes no --ramp"
    if args.ramp is not None and args.ramp < 0:
        return "--ramp must not be negative"
    if args.end_timeout <= 0:
        return "--end-timeout must be positive"
    return check_stream_arguments(args)


def run_load(args: argparse.Namespace) -> int:
    problem = check_arguments(args)
    if problem:
        print(f"breeze-stream bench-load: {problem}", file=sys.stderr)
        return 2
    try:
        clips = read_inputs(args.inputs)
        pcms = [to_pcm16(load_clip_audio(clip.path)) for clip in clips]
    except ReplayInputError as exc:
        print(f"breeze-stream bench-load: {exc}", file=sys.stderr)
        return 2
    durations = [len(pcm) / SAMPLE_RATE for pcm in pcms]
    ramp = 0.0 if args.sync else (args.ramp if args.ramp is not None else float(np.mean(durations)) + args.gap)
    jobs = plan_streams(
        durations,
        [score_group(clip.lang) for clip in clips],
        streams=args.streams,
        duration=args.duration,
        gap=args.gap,
        ramp=ramp,
        seed=args.seed,
        sync=args.sync,
        language=args.language or "clip",
    )
    workers = [
        WorkerJob(
            process, args.url, clips, pcms, jobs[process :: args.processes], args.gap, args.frame_ms, args.end_timeout
        )
        for process in range(args.processes)
    ]
    audio_s = [args.gap + sum(durations[i] + args.gap for i in job.order) for job in jobs]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        run = drive(
            workers,
            args.url,
            total_audio_s=sum(audio_s),
            show_progress=not args.quiet,
            run_s=ramp + max(audio_s) + 2 * READY_TIMEOUT + args.end_timeout + 30.0,
        )
    except RuntimeError as exc:
        print(f"breeze-stream bench-load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("breeze-stream bench-load: interrupted", file=sys.stderr)
        return 130
    if not any(s["connected"] or s["client_failed"] for s in run.streams):
        print(f"breeze-stream bench-load: no stream got 'ready': {run.streams[0]['failure']}", file=sys.stderr)
        return 2
    config = {
        "url": args.url,
        "inputs": list(args.inputs),
        "streams": args.streams,
        "duration": args.duration,
        "processes": args.processes,
        "sync": args.sync,
        "ramp": ramp,
        "frame_ms": args.frame_ms,
        "gap": args.gap,
        "language": args.language,
        "seed": args.seed,
        "end_timeout": args.end_timeout,
        "started": started,
        "clips": [
            {"name": c.name, "lang": c.lang, "duration": d, "reference": c.reference} for c, d in zip(clips, durations)
        ],
        "stream_audio_s": {"min": min(audio_s), "max": max(audio_s)},
        "models": sorted({s["model"] for s in run.streams if s["model"]}),
    }
    report = _clean(
        {
            "config": config,
            "summary": merge_streams(run.streams, clips),
            "server": {
                **server_figures(run.before, run.after, run.samples),
                "metrics_before": run.before,
                "metrics_after": run.after,
            },
            "client": client_figures(run.processes, run.streams),
            "streams": [_per_stream(s) for s in run.streams],
        }
    )
    print(summary_line(report), flush=True)
    for failure, streams in report["summary"]["failures"].items():
        print(f"breeze-stream bench-load: {streams} stream(s): {failure}", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False), encoding="utf-8"
        )
    return 1 if report["summary"]["counts"]["client_failures"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="breeze-stream bench-load", description=__doc__.split("\n\n")[0])
    from .options import add_load_arguments

    return run_load(add_load_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
