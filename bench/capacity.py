"""Capacity: N simulated real-time streams through the engine scheduler (not the socket server).

Each simulated stream speaks in segments (lengths drawn from the dev set's clip durations,
pauses of 0.3-1.0 s between them) in real time and follows the streaming policy of
streaming/audio/transcriber.py: a partial decode of the segment so far every 0.5 s of new speech on
a shortened encoder window (segment + 2 s), at most one partial in flight per stream, none
while the previous segment's final is pending; a final decode of the whole segment when it
ends (full 30 s window by default), with the last partial's tokens as its draft. Requests go
straight to `Engine.submit` from one asyncio thread; nothing goes over a socket, no VAD, no
audio decoding: this measures the engine's scheduler, batching, encoder and decoder.

Random weights never stop at a real end of speech, so every request's length is forced:
`<|endoftext|>` is suppressed and `max_new_tokens` = ceil(rate x seconds of audio in the
request), rate = Whisper tokens per second of speech measured on the dev references
(`--measure-rate`: 5.43 tokens/s over the Mandarin and code-switched clips, 4.42 CJK characters/s).
The decoder is rigged so that its output depends on the position and the previous tokens only
(cross-attention output projection scaled by 1e-4; the position embedding scaled up so that the
argmax changes from one position to the next and never loops): a partial's tokens are then a prefix of the
next decode's, as a real model's mostly are, so the previous-hypothesis draft is accepted;
`--draft-noise` replaces that fraction of draft tokens to lower the acceptance. Cost per
forward does not depend on the values, so timings are those of the real shape.

Final latency here = from the final's submission (the moment the segmenter closes the segment)
to its result; a client also sees the VAD hangover before it and the network after it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.engine import DTYPES
from bench.options import add_capacity_arguments
from engines.options import TOKENS_PER_SECOND
from engines.synthetic import random_engine

# durations (s) of the dev clips: the segment lengths a stream draws from
DEV_SEGMENTS = (
    4.2,
    2.0,
    1.8,
    17.2,
    4.4,
    4.6,
    4.4,
    1.7,
    2.7,
    2.8,
    4.1,
    3.5,
    4.2,
    3.5,
    10.0,
    10.4,
    12.9,
    9.5,
    21.0,
    16.4,
    11.9,
    10.0,
    13.8,
    11.0,
)


def measure_token_rate(manifest: Path) -> dict:
    """Whisper tokens (and CJK characters) per second of audio over a manifest's references,
    with the embedded model's tokenizer.json (needs the `tokenizers` package)."""
    import re

    from tokenizers import Tokenizer as HFTokenizer

    from engines.weights.checkpoints import default_files

    tok = HFTokenizer.from_file(str(default_files()[0]["tokenizer.json"]))
    totals = {"zh+mix": [0, 0, 0.0], "all": [0, 0, 0.0]}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = re.sub(r"\[S\d\]", "", row["text"])  # speaker tags are not speech
        tokens = len(tok.encode(text, add_special_tokens=False).ids)
        chars = len(re.findall(r"[\u3400-\u9fff]", text))
        for group in ("all",) + (("zh+mix",) if row["lang"] != "en" else ()):
            totals[group][0] += tokens
            totals[group][1] += chars
            totals[group][2] += row["duration_s"]
    return {
        group: {"tokens_per_s": t / d, "cjk_chars_per_s": c / d, "seconds": d, "tokens": t, "chars": c}
        for group, (t, c, d) in totals.items()
    }


@dataclass
class SimConfig:
    streams: int
    duration: float = 30.0  # seconds measured (finals submitted in [warmup, warmup + duration])
    warmup: float = 8.0
    rate: float = TOKENS_PER_SECOND
    partial_interval: float = 0.5
    partial_window: float | None = 2.0
    final_window: float | None = None  # None: the full 30 s window, as the transcriber does
    draft_noise: float = 0.0
    pause: tuple[float, float] = (0.3, 1.0)
    max_segment: float = 28.0
    drain: float = 20.0  # seconds to wait for outstanding requests after the last submission
    seed: int = 0


@dataclass(eq=False)  # streams are engine stream keys: hashed by identity
class _Stream:
    index: int
    rng: random.Random
    audio: np.ndarray
    seg_start: float = 0.0
    seg_len: float = 0.0
    decoded: float = 0.0  # seconds of the open segment already sent as a partial
    closed: bool = True
    tokens: list[int] | None = None
    partial_busy: bool = False
    final_busy: bool = False
    segments: int = 0


@dataclass
class _Stats:
    finals: list[dict] = field(default_factory=list)
    partials: list[float] = field(default_factory=list)
    dropped: int = 0
    partials_submitted: int = 0
    errors: list[str] = field(default_factory=list)


class _EngineProbe:
    """Wraps the engine's worker methods to time the encoder calls, admission to the batch and the
    decoder steps (with overlap_encoder the encoder calls run on their own thread)."""

    def __init__(self, engine):
        self.engine = engine
        self.reset()
        encode, begin, step = engine._encode, engine._begin, engine._step

        def timed_encode(group, frames):
            t0 = time.perf_counter()
            out = encode(group, frames)
            self.encode_s += time.perf_counter() - t0
            self.encodes += 1
            self.admitted += len(group)
            return out

        def timed_begin(group, frames, features):
            t0 = time.perf_counter()
            begin(group, frames, features)
            self.begin_s += time.perf_counter() - t0

        runner = engine.batch.runner
        timed = runner is not None and engine.device.type == "cuda"
        if timed:  # the step's forward on the GPU (CUDA events on the worker's stream) and the host work around it
            launch = runner.launch
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def timed_launch(key):
                self._launched = time.perf_counter()
                events[0].record()
                launch(key)
                events[1].record()

            runner.launch = timed_launch

        def timed_step():
            n = len(engine.batch.active)
            self._launched = None
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            self.step_s += t1 - t0
            self.steps += 1
            self.rows += n
            self.step_times.append(t1 - t0)
            if timed and self._launched is not None:  # step() synchronised the stream: the events are done
                self.before_launch_s += self._launched - t0
                self.after_launch_s += t1 - self._launched
                self.forward_gpu_s += events[0].elapsed_time(events[1]) / 1000
                self.timed_steps += 1

        engine._encode, engine._begin, engine._step = timed_encode, timed_begin, timed_step

    def reset(self) -> None:
        self.encode_s = self.begin_s = self.step_s = 0.0
        self.encodes = self.steps = self.rows = self.admitted = 0
        self.before_launch_s = self.after_launch_s = self.forward_gpu_s = 0.0
        self.timed_steps = 0
        runner = self.engine.batch.runner
        self.recorded0 = (
            (runner.stats.captures, runner.stats.eager, runner.stats.stand_ins) if runner is not None else (0, 0, 0)
        )
        self.step_times: list[float] = []

    def summary(self, wall: float) -> dict:
        runner = self.engine.batch.runner
        worker = self.begin_s + self.step_s + (0.0 if self.engine.overlap_encoder else self.encode_s)
        return {
            "wall_s": wall,
            "busy_fraction": worker / wall if wall else 0.0,
            "overlap_encoder": self.engine.overlap_encoder,
            "encoder_s": self.encode_s,
            "admission_s": self.begin_s,
            "encoder_calls": self.encodes,
            "requests_admitted": self.admitted,
            "steps": self.steps,
            "step_s": self.step_s,
            "mean_rows_per_step": self.rows / self.steps if self.steps else 0,
            "step_ms_p50": 1000 * statistics.median(self.step_times) if self.step_times else None,
            "step_ms_mean": 1000 * self.step_s / self.steps if self.steps else None,
            # decoder-step graphs recorded while measuring, and the steps of those new buckets run meanwhile
            # eagerly or in a larger recorded bucket
            "graph_recordings": runner.stats.captures - self.recorded0[0] if runner is not None else 0,
            "eager_steps": runner.stats.eager - self.recorded0[1]
            if runner is not None and runner.mode != "eager"
            else 0,
            "stand_in_steps": runner.stats.stand_ins - self.recorded0[2] if runner is not None else 0,
            # per step (CUDA): host work before the forward's launch (drafts, inputs), the forward's GPU time
            # (the encoder thread's kernels run beside it), and launch to the step's end (waiting, token rules)
            "step_phases_ms": {
                "before_launch": 1000 * self.before_launch_s / self.timed_steps,
                "forward_gpu": 1000 * self.forward_gpu_s / self.timed_steps,
                "launch_to_end": 1000 * self.after_launch_s / self.timed_steps,
            }
            if self.timed_steps
            else None,
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(values, q))


async def _simulate(engine, config: SimConfig, probe: _EngineProbe) -> dict:
    from engines.whisper.decoding import DecodingOptions

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end_submit = config.warmup + config.duration
    stats = _Stats()
    rng0 = np.random.default_rng(config.seed)
    voices = [(rng0.standard_normal(int(16000 * config.max_segment)) * 0.05).astype(np.float32) for _ in range(8)]
    streams = [
        _Stream(i, random.Random(config.seed * 1000 + i), voices[i % len(voices)]) for i in range(config.streams)
    ]
    outstanding: set = set()
    done_event = asyncio.Event()

    def now() -> float:
        return loop.time() - t0

    def post(fn, *args) -> None:
        """From the engine's thread onto the loop (a late result after the run is dropped)."""
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the run is over
            pass

    def options(seconds: float) -> DecodingOptions:
        return DecodingOptions(language="zh", max_new_tokens=max(1, math.ceil(config.rate * seconds)))

    def draft(s: _Stream) -> list[int] | None:
        if not s.tokens:
            return None
        if config.draft_noise <= 0:
            return list(s.tokens)
        return [t if s.rng.random() >= config.draft_noise else s.rng.randrange(50000) for t in s.tokens]

    def submit(s: _Stream, seconds: float, final: bool):
        window = config.final_window if final else config.partial_window
        fut = engine.submit(
            s.audio[: int(16000 * seconds)], options(seconds), window=window, previous=draft(s), final=final, stream=s
        )
        outstanding.add(fut)
        return fut

    def maybe_partial(s: _Stream) -> None:
        if s.closed or s.partial_busy or s.final_busy:
            return
        available = min(now() - s.seg_start, s.seg_len)
        if available - s.decoded >= config.partial_interval - 1e-6:
            s.decoded = available
            s.partial_busy = True
            stats.partials_submitted += 1
            sent = now()
            fut = submit(s, available, final=False)
            fut.add_done_callback(lambda f: post(partial_done, s, f, sent))
        else:
            at = s.seg_start + s.decoded + config.partial_interval
            if at < s.seg_start + s.seg_len:
                loop.call_at(t0 + at, maybe_partial, s)

    def partial_done(s: _Stream, fut, sent: float) -> None:
        outstanding.discard(fut)
        s.partial_busy = False
        if fut.cancelled():
            pass
        elif fut.exception() is not None:
            stats.errors.append(repr(fut.exception()))
        else:
            result = fut.result()
            if result is None:
                stats.dropped += 1
            else:
                stats.partials.append(now() - sent)
                if not s.closed:
                    s.tokens = result.tokens
        maybe_partial(s)
        _check_done()

    def start_segment(s: _Stream) -> None:
        if now() >= end_submit:
            return
        s.seg_start, s.seg_len = now(), min(config.max_segment, s.rng.choice(DEV_SEGMENTS))
        s.decoded, s.closed, s.tokens = 0.0, False, None
        s.segments += 1
        loop.call_at(t0 + s.seg_start + s.seg_len, close_segment, s)
        loop.call_at(t0 + s.seg_start + config.partial_interval, maybe_partial, s)

    def close_segment(s: _Stream) -> None:
        s.closed = True
        s.final_busy = True
        sent = now()
        fut = submit(s, s.seg_len, final=True)
        fut.add_done_callback(lambda f, seconds=s.seg_len: post(final_done, s, f, sent, seconds))
        loop.call_at(t0 + sent + s.rng.uniform(*config.pause), start_segment, s)

    def final_done(s: _Stream, fut, sent: float, seconds: float) -> None:
        outstanding.discard(fut)
        s.final_busy = False
        if fut.cancelled():
            pass
        elif fut.exception() is not None:
            stats.errors.append(repr(fut.exception()))
        else:
            t = fut.result()
            stats.finals.append(
                {
                    "sent": sent,
                    "latency": now() - sent,
                    "seconds": seconds,
                    "tokens": len(t.tokens),
                    "forwards": t.forwards,
                    "window_frames": t.window_frames,
                    "proposed": sum(t.draft_proposed.values()),
                    "accepted": sum(t.draft_accepted.values()),
                    "encoder_s": t.encoder_seconds,
                    "decoder_s": t.decoder_seconds,
                    "looped": t.looped,
                }
            )
        maybe_partial(s)  # the next segment's partials waited for this final
        _check_done()

    def _check_done() -> None:
        if now() >= end_submit and not outstanding:
            done_event.set()

    spread = min(4.0, config.warmup / 2)
    for s in streams:
        loop.call_at(t0 + s.rng.uniform(0, spread), start_segment, s)
    loop.call_at(t0 + config.warmup, probe.reset)
    measure_start = time.perf_counter() + config.warmup
    await asyncio.sleep(end_submit)
    wall = time.perf_counter() - measure_start
    engine_summary = probe.summary(wall)
    try:
        await asyncio.wait_for(done_event.wait(), timeout=config.drain)
    except asyncio.TimeoutError:  # overloaded: drop the backlog so the next run starts clean
        stats.errors.append(f"{len(outstanding)} requests still outstanding {config.drain:.0f} s after the end")
        for fut in list(outstanding):
            fut.cancel()
        for _ in range(100):
            if not engine.batch.active and not engine._queue:
                break
            await asyncio.sleep(0.1)
    finals = [f for f in stats.finals if config.warmup <= f["sent"] < end_submit]
    lat = [f["latency"] for f in finals]
    tokens = sum(f["tokens"] for f in finals)
    proposed = sum(f["proposed"] for f in finals)
    return {
        "streams": config.streams,
        "finals": len(finals),
        "final_latency_s": {
            "p50": _pct(lat, 50),
            "p95": _pct(lat, 95),
            "p99": _pct(lat, 99),
            "max": max(lat) if lat else None,
            "mean": statistics.fmean(lat) if lat else None,
        },
        "partial_latency_s": {"p50": _pct(stats.partials, 50), "p95": _pct(stats.partials, 95)},
        "partials_done": len(stats.partials),
        "partials_dropped": stats.dropped,
        "partials_submitted": stats.partials_submitted,
        "final_tokens_mean": tokens / len(finals) if finals else None,
        "final_forwards_mean": statistics.fmean(f["forwards"] for f in finals) if finals else None,
        "final_seconds_mean": statistics.fmean(f["seconds"] for f in finals) if finals else None,
        "final_draft_acceptance": (sum(f["accepted"] for f in finals) / proposed) if proposed else None,
        "looped_finals": sum(f["looped"] for f in finals),
        "engine": engine_summary,
        "errors": stats.errors[:5],
        "error_count": len(stats.errors),
        "config": {k: v for k, v in config.__dict__.items()},
    }


def simulate(engine, config: SimConfig) -> dict:
    probe = getattr(engine, "_capacity_probe", None)
    if probe is None:
        probe = engine._capacity_probe = _EngineProbe(engine)
    return asyncio.run(_simulate(engine, config, probe))


def run_capacity(args: argparse.Namespace) -> int:
    if args.measure_rate:
        print(json.dumps(measure_token_rate(Path(args.measure_rate)), indent=2))
        return 0
    import datetime

    from engines.engine import resolve_device
    from engines.gpu.cuda_graphs import GraphOptions

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    graphs = (
        False
        if args.no_graphs
        else GraphOptions(
            mode=args.graph_mode,
            cross_attention=args.cross_attention,
            row_kernels=False if args.no_row_kernels else None,
        )
    )
    t0 = time.perf_counter()
    engine = random_engine(
        args.shape,
        str(device),
        dtype,
        tokens_per_second=None,
        max_batch=args.max_batch,
        speculative=args.speculative,
        cuda_graphs=graphs,
        window_bucket=args.window_bucket,
        max_partials=args.max_partials,
        partials_per_round=args.partials_per_round,
        node_budget=args.node_budget,
        overlap_encoder=False if args.serial_encoder else None,
        prioritize_steps=not args.equal_priority,
    )
    report = {
        "what": "engine scheduler (engines/engine.py), simulated real-time streams; not the socket server",
        "command": "python -m bench.capacity " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "max_batch": args.max_batch,
        "speculative": args.speculative,
        "graphs": False if args.no_graphs else args.graph_mode,
        "max_partials": engine.admission.max_partials,
        "partials_per_round": engine.admission.partials_per_round,
        "node_budget": engine.node_budget,
        "overlap_encoder": engine.overlap_encoder,
        "prioritize_steps": engine.prioritize_steps,
        "row_kernels": not args.no_row_kernels,
        "build_s": round(time.perf_counter() - t0, 1),
        "runs": [],
    }
    warm_streams, warm_seconds = (float(x) for x in args.prewarm.split(":"))
    if warm_streams and warm_seconds:
        t1 = time.perf_counter()
        simulate(
            engine,
            SimConfig(
                streams=int(warm_streams),
                duration=warm_seconds,
                warmup=2.0,
                rate=args.rate,
                partial_window=args.partial_window,
                final_window=args.final_window,
                drain=10.0,
            ),
        )
        report["prewarm"] = {
            "streams": int(warm_streams),
            "seconds": warm_seconds,
            "wall_s": round(time.perf_counter() - t1, 1),
        }
        print(f"prewarm: {report['prewarm']}", flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    for n, seed in itertools.product([int(x) for x in args.streams.split(",")], seeds):
        result = _measure(engine, args, n, seed)
        report["runs"].append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        if result["error_count"] and not result["finals"]:
            print("stopping: the engine fails:", result["errors"][:2], flush=True)
            break
    if len(seeds) > 1:
        report["final_p95_s_by_streams"] = spread = {}
        for run in report["runs"]:
            spread.setdefault(run["streams"], []).append(run["final_latency_s"]["p95"])
        for n, values in spread.items():
            print(f"N={n:4d}: final p95 over {len(values)} seeds: " + " ".join(_ms(v) for v in values), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    engine.close()
    return 0


def _measure(engine, args: argparse.Namespace, n: int, seed: int) -> dict:
    """One measured run of `n` streams, printed as it ends."""
    config = SimConfig(
        streams=n,
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        seed=seed,
        partial_window=args.partial_window,
        final_window=args.final_window,
        draft_noise=args.draft_noise,
    )
    result = simulate(engine, config)
    result["seed"] = seed
    if engine.batch.runner is not None:
        st = engine.batch.runner.stats
        result["graphs"] = {
            "captured": st.captures,
            "capture_s": round(st.capture_seconds, 2),
            "replays": st.replays,
            "cross_attention": engine.batch.runner.cross_attention,
        }
    if hasattr(engine.encoder, "stats"):
        st = engine.encoder.stats
        result["encoder_graphs"] = {
            "captured": st.captures,
            "capture_s": round(st.capture_seconds, 2),
            "replays": st.replays,
            "eager": st.eager,
        }
    lat = result["final_latency_s"]
    e = result["engine"]
    print(
        f"N={n:4d} seed {seed}: finals {result['finals']:5d}  final p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} max {_ms(lat['max'])}"
        f"  partial p50 {_ms(result['partial_latency_s']['p50'])}  rows/step {e['mean_rows_per_step']:.1f}"
        f"  step {e['step_ms_mean'] or 0:.1f} ms  busy {e['busy_fraction']:.2f}  encoder {e['encoder_s']:.1f} s admit {e['admission_s']:.1f} s"
        f"  fwd/final {result['final_forwards_mean'] or 0:.1f}  accept {result['final_draft_acceptance'] or 0:.2f}"
        f"  errors {result['error_count']}",
        flush=True,
    )
    if e["step_phases_ms"]:
        print(
            "       step phases (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in e["step_phases_ms"].items()), flush=True
        )
    return result


def _ms(seconds: float | None) -> str:
    return "   -  " if seconds is None else f"{seconds * 1000:6.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    add_capacity_arguments(parser)
    return run_capacity(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
