"""Scale-out benchmark: breeze-stream replicas behind a real NGINX, on loopback (issue 10, item 4).

Two measurements, each run as its own subcommand:

``rolling``  A rolling restart under a steady load. N replicas (`breeze-stream serve`, one process
    group each) behind NGINX running deploy/nginx.conf (rendered for loopback by bench/nginx.py,
    as tests/test_scaleout.py renders it). S callers each stream replayed clips at real-time pace through
    NGINX, one session after another (K clips a session, bench.replay's pacing and event
    log). After a warm-up, every replica is restarted in turn: SIGTERM, wait for the process to
    exit (it drains: finals, `end` with reason "shutdown", close 1001), start it again on the same
    port, wait for /readyz 200, let the load settle, next. A caller whose session ends (drained or
    normally) connects again at once and goes on with the next clip of its playlist, as a client
    following docs/scaleout.md would; a refused connection (every replica busy or down) is retried
    after 0.5 s. At the end the callers stop after their current session. Counted over every
    session that got `ready`:

    - completed with `end` (normally, or drained with reason "shutdown");
    - an explicit close (a close frame with a code other than 1006) without `end`;
    - neither (no `end`, no close frame: 1006 or a client-side timeout) -- target 0;
    - finals lost in sessions that received `end` -- target 0, two ways: a segment with a
      non-blank partial and no final (bench.replay's "lost finals"), and a clip whose audio was
      sent in full before the drain began (the SIGTERM that preceded the `end`; for sessions that
      ended normally: every clip sent) without any final;
    - finals after `end`, duplicate finals, error events.

``scaling``  Throughput from 1 to N replicas on this machine. For each replica count R, R replicas
    (OMP_NUM_THREADS = max(1, cores // R): replicas x threads <= cores, as docs/scaleout.md
    advises) behind NGINX; then a ladder of loads: C concurrent streams, each playing the same
    Mandarin dev clips once at real-time pace (each stream starting at a different clip, starts
    staggered). Per step: server RTF summed over the replicas from /metrics ((encoder + decoder
    seconds) / audio seconds), the engines' busy fraction (encoder + decoder seconds per replica
    per wall second), the box's CPU use (/proc/stat), final latency p50/p95, clip-end latency
    p95, stop->end, lost finals, CER, and the CPU share of the replica processes themselves (to see
    other load on the machine). A step is *sustained* when every stream completes with no lost
    final, every replica's server RTF < 1 and p95 final latency <= --max-p95 (3 s); the ladder for
    R stops at the first step that is not, unless --keep-going.

Everything is on loopback; every process runs in its own process group and is killed with it at
the end. Needs Debian's `nginx`. Results: a JSON file (--json) and a short table on stdout.

    python -m bench.scaleout rolling --replicas 3 --streams 6 --json rolling.json
    python -m bench.scaleout rolling --replicas 3 --streams 6 --rounds 2 --settle 5 --nginx-server-params max_fails=0
    python -m bench.scaleout scaling --model default --replicas 1,2,3 --streams 1,2,3 --keep-going --json scaling.json

Results on the 2-core CPU box: BENCHMARKS.md, "Scale-out (CPU, loopback NGINX)"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench import replay
from bench.clips import DEV_DIR
from bench.nginx import DEPLOY, NGINX, SERVER_LINE, ProcessGroups, free_port, http_get, start_nginx
from bench.tiny import save_tiny_model

BREEZE = [sys.executable, "-m", "breeze_stream"]  # what the `breeze-stream` entry point runs

# Short read sentences (1.7-4.6 s) for the rolling restart; longer Mandarin clips for scaling.
ROLLING_CLIPS = [
    "hhchen-f05-read-0056",
    "hhchen-f05-read-0089",
    "hhchen-f05-read-0121",
    "hhchen-f05-read-0154",
    "hhchen-f05-read-0285",
    "hhchen-f05-read-0368",
    "hhchen-f05-read-0397",
    "hhchen-f05-read-0550",
    "hhchen-f05-read-0925",
    "fireredasr-BAC009S0764W0121",
    "fireredasr-IT0011W0001",
    "cosyvoice-zero_shot_prompt",
]
SCALING_CLIPS = [
    "fireredasr-BAC009S0764W0121",
    "hhchen-f05-read-0121",
    "kimiaudio-asr_example",
    "cosyvoice-zero_shot_prompt",
]  # 22.7 s of speech: a 30 s stream with the gaps


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def log(message: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class Replica:
    port: int
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """Replicas and NGINX; every process group is killed at close."""

    def __init__(self, tmp: Path, model: str, flags: list[str], threads: int, server_params: str | None = None) -> None:
        self.server_params = server_params  # replaces the upstream `server` line's parameters of deploy/nginx.conf
        self.tmp = tmp
        self.model = model
        self.flags = flags
        self.threads = threads
        self.groups = ProcessGroups()
        self.replicas: list[Replica] = []
        self.nginx_port: int | None = None
        self.nginx_prefix: Path | None = None

    def add_replicas(self, n: int) -> list[Replica]:
        for _ in range(n):
            port = free_port()
            args = [
                *BREEZE,
                "serve",
                "--model",
                self.model,
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *self.flags,
            ]
            env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            self.replicas.append(Replica(port, args, env, self.tmp / f"replica-{port}.log"))
        return self.replicas

    def start(self, replica: Replica) -> None:
        replica.proc = self.groups.spawn(replica.args, replica.log, replica.env)
        replica.starts += 1

    def wait_ready(self, replica: Replica, timeout: float = 180.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if replica.proc.poll() is not None:
                raise RuntimeError(f"replica :{replica.port} exited with {replica.proc.returncode}:\n{replica.tail()}")
            if http_get(replica.port, "/readyz", timeout=1)[0] == 200:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"replica :{replica.port} not ready within {timeout:g} s:\n{replica.tail()}")

    def start_all(self) -> None:
        for replica in self.replicas:
            self.start(replica)
        for replica in self.replicas:
            self.wait_ready(replica)

    def start_nginx(self) -> int:
        prefix = self.tmp / "nginx"

        def params(text: str) -> str:  # the upstream `server` lines' parameters, where --nginx-server-params gives them
            if self.server_params is None:
                return text
            return re.sub(r"^(\s*server 127\.0\.0\.1:\d+) .*;$", rf"\1 {self.server_params};", text, flags=re.M)

        self.nginx_port = start_nginx(self.groups, prefix, [r.port for r in self.replicas], params)
        self.nginx_prefix = prefix
        return self.nginx_port

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}/v1/stream"

    def access_log(self) -> list[str]:
        path = self.nginx_prefix / "nginx.out" if self.nginx_prefix else None
        return path.read_text(errors="replace").splitlines() if path and path.exists() else []

    def close(self) -> None:
        self.groups.close()


def nginx_sessions(lines: list[str], ports: list[int]) -> dict:
    """Per replica: WebSocket sessions NGINX handed over (status 101, by the last upstream tried),
    and upgrades it retried after a 503 or a refused connection."""
    per_port = {port: 0 for port in ports}
    retried = refused = 0
    for line in lines:
        if '"GET /v1/stream' not in line:
            continue
        status = re.search(r'" (\d{3}) ', line)
        upstream = re.search(r"upstream=(\S.*?) upstream_status=(\S.*?) session_s", line)
        if not status or not upstream:
            continue
        addrs = upstream.group(1).split(", ")
        if len(addrs) > 1:
            retried += 1
        if status.group(1) == "101":
            port = int(addrs[-1].rsplit(":", 1)[-1]) if ":" in addrs[-1] else None
            if port in per_port:
                per_port[port] += 1
        else:
            refused += 1
    return {
        "sessions_per_replica": per_port,
        "upgrades_retried_on_another_replica": retried,
        "upgrades_refused_to_client": refused,
    }


# --- audio ---------------------------------------------------------------------------------------


def load_clips(names: list[str]) -> list[tuple[replay.Clip, np.ndarray]]:
    manifest = DEV_DIR / "manifest.jsonl"
    by_name = {c.name: c for c in replay.read_inputs([str(manifest)])}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"{manifest}: no clips {missing}")
    return [(by_name[n], replay._load_audio(by_name[n].path)) for n in names]


def plan_of(clips: list[tuple[replay.Clip, np.ndarray]], gap: float) -> replay.StreamPlan:
    return replay.build_stream([c for c, _ in clips], [a for _, a in clips], gap)


# --- sessions --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    caller: int
    plan: replay.StreamPlan
    log: replay.StreamLog
    analysis: dict | None = None
    refused_at: float | None = None  # when the refused connect was answered (seconds since t_ref)

    @property
    def started(self) -> bool:
        return self.log.t_ready is not None

    @property
    def end_event(self) -> dict | None:
        return next((e for _, e in self.log.events if e.get("type") == "end"), None)

    def kind(self) -> str:
        if not self.started:
            return "refused" if self.log.t_open is None else "opened_without_ready"
        end = self.end_event
        if end is not None:
            return "drained" if end.get("reason") == "shutdown" else "completed"
        if self.log.close_code is not None and self.log.close_code != 1006:
            return "closed_without_end"
        return "neither"


def owed_clips_without_final(session: Session, drain_starts: list[float]) -> tuple[int, int]:
    """(clips owed a final, owed clips without one). Owed: every clip of a normally completed
    session; in a drained session, the clips whose last sample was sent before the drain began
    (the last SIGTERM before the `end` arrived)."""
    log_, analysis = session.log, session.analysis
    if session.kind() == "completed":
        cutoff = math.inf
    else:
        before = [t for t in drain_starts if t <= log_.t_end]
        cutoff = max(before) if before else -math.inf
    owed = missing = 0
    for span, clip in zip(session.plan.spans, analysis["clips"]):
        last = replay.sample_send_time(log_.send_times, log_.frame_samples, span.end - 1)
        if last is None or (isinstance(last, float) and math.isnan(last)) or last > cutoff:
            continue
        owed += 1
        missing += clip["finals"] == 0
    return owed, missing


# --- rolling restart -----------------------------------------------------------------------------


async def rolling(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    model = str(save_tiny_model(tmp / "tiny.pt")) if args.model == "tiny" else args.model
    flags = ["--drain-timeout", str(args.drain_timeout), "--max-connections-per-client", "0"]
    cluster = Cluster(tmp, model, flags, args.threads, args.nginx_server_params)
    clips = load_clips(ROLLING_CLIPS)
    t_ref = replay.clock()
    sessions: list[Session] = []
    drains: list[dict] = []
    drain_starts: list[float] = []
    stop = asyncio.Event()
    try:
        cluster.add_replicas(args.replicas)
        await asyncio.to_thread(cluster.start_all)
        await asyncio.to_thread(cluster.start_nginx)
        log(
            f"{args.replicas} replicas {[r.port for r in cluster.replicas]} behind NGINX :{cluster.nginx_port}; "
            f"{args.streams} callers"
        )
        url = cluster.url()
        per_session = args.clips_per_session

        async def caller(index: int) -> None:
            cursor = (index * 5) % len(clips)
            await asyncio.sleep(index * args.stagger)
            number = 0
            while not stop.is_set():
                chosen = [clips[(cursor + k) % len(clips)] for k in range(per_session)]
                plan = plan_of(chosen, args.gap)
                stream_log = await replay.run_stream(
                    url,
                    plan,
                    stream=index * 1000 + number,
                    t_ref=t_ref,
                    frame_ms=args.frame_ms,
                    speed=1.0,
                    end_timeout=60.0,
                )
                session = Session(index, plan, stream_log)
                if not session.started:
                    session.refused_at = replay.clock() - t_ref
                sessions.append(session)
                number += 1
                if not session.started:
                    await asyncio.sleep(0.5)
                    continue
                # go on with the next clip not sent in full (all of them when the session completed)
                sent = sum(
                    1
                    for span in plan.spans
                    if not math.isnan(
                        replay.sample_send_time(stream_log.send_times, stream_log.frame_samples, span.end - 1)
                    )
                )
                cursor += max(1, sent)

        callers = [asyncio.ensure_future(caller(i)) for i in range(args.streams)]
        await asyncio.sleep(args.warmup)
        for round_ in range(args.rounds):
            for replica in cluster.replicas:
                active = await asyncio.to_thread(replay.fetch_metrics, f"http://127.0.0.1:{replica.port}/metrics")
                t_signal = replay.clock() - t_ref
                drain_starts.append(t_signal)
                os.killpg(replica.proc.pid, signal.SIGTERM)
                rc = await asyncio.to_thread(replica.proc.wait, args.drain_timeout + 10)
                t_exit = replay.clock() - t_ref
                cluster.start(replica)
                ready_s = await asyncio.to_thread(cluster.wait_ready, replica)
                drains.append(
                    {
                        "round": round_ + 1,
                        "port": replica.port,
                        "sessions_open": int((active or {}).get("breeze_sessions_active", -1)),
                        "signal_at_s": round(t_signal, 2),
                        "drain_s": round(t_exit - t_signal, 2),
                        "exit_code": rc,
                        "restart_to_ready_s": round(ready_s, 2),
                    }
                )
                log(
                    f"round {round_ + 1}: replica :{replica.port} drained {(active or {}).get('breeze_sessions_active')} "
                    f"sessions in {t_exit - t_signal:.2f} s (exit {rc}), ready again after {ready_s:.1f} s"
                )
                await asyncio.sleep(args.settle)
        await asyncio.sleep(args.tail)
        stop.set()
        log("load stops after the current sessions")
        await asyncio.wait_for(asyncio.gather(*callers), 120)
        nginx = nginx_sessions(cluster.access_log(), [r.port for r in cluster.replicas])
    finally:
        cluster.close()
    t_total = replay.clock() - t_ref

    counts = {
        k: 0 for k in ("refused", "opened_without_ready", "completed", "drained", "closed_without_end", "neither")
    }
    lost_segments = owed = owed_missing = after_end = duplicates = errors = finals = flushed = 0
    close_codes: dict[str, int] = {}
    latencies: list[float] = []
    audio_s = 0.0
    problems = []
    for session in sessions:
        kind = session.kind()
        counts[kind] += 1
        if not session.started:
            continue
        session.analysis = replay.analyze_stream(session.log, session.plan.spans)
        c = session.analysis["counts"]
        finals += c["finals"]
        errors += c["errors"]
        audio_s += c["frames_sent"] * session.log.frame_samples / replay.SAMPLE_RATE
        close_codes[str(session.log.close_code)] = close_codes.get(str(session.log.close_code), 0) + 1
        latencies += session.analysis["final_latency"]
        if kind in ("completed", "drained"):
            lost_segments += c["lost_finals"]
            after_end += c["finals_after_end"]
            duplicates += c["duplicate_finals"]
            if kind == "drained":  # finals that arrived after the drain began: the flushed open segments
                signal_at = max((t for t in drain_starts if t <= session.log.t_end), default=-math.inf)
                flushed += sum(1 for t, e in session.log.events if e.get("type") == "final" and t >= signal_at)
            o, m = owed_clips_without_final(session, drain_starts)
            owed += o
            owed_missing += m
            if c["lost_finals"] or m or c["finals_after_end"]:
                problems.append(
                    {
                        "caller": session.caller,
                        "kind": kind,
                        "session": session.log.session,
                        "counts": c,
                        "owed": o,
                        "owed_missing": m,
                    }
                )
        else:
            problems.append(
                {
                    "caller": session.caller,
                    "kind": kind,
                    "session": session.log.session,
                    "failure": session.log.failure,
                    "close_code": session.log.close_code,
                }
            )
    started = sum(1 for s in sessions if s.started)
    # refused connects (NGINX answered 503: no replica it would try took the session), by the
    # restart they followed: seconds after that replica's SIGTERM
    # a drained caller's outage: from the `end` of its drained session to the `ready` of its next one
    reconnect = []
    for caller_index in range(args.streams):
        mine = [x for x in sessions if x.caller == caller_index]
        for k, session in enumerate(mine):
            if session.kind() == "drained":
                following = next((x for x in mine[k + 1 :] if x.started), None)
                if following is not None:
                    reconnect.append(following.log.t_ready - session.log.t_end)
    refused_times = sorted(s.refused_at for s in sessions if s.kind() == "refused" and s.refused_at is not None)
    by_restart = []
    for drain in drains:
        later = [d["signal_at_s"] for d in drains if d["signal_at_s"] > drain["signal_at_s"]]
        upto = min(later) if later else math.inf
        mine = [t for t in refused_times if drain["signal_at_s"] <= t < upto]
        by_restart.append(
            {
                "port": drain["port"],
                "round": drain["round"],
                "refused": len(mine),
                "first_s_after_signal": round(mine[0] - drain["signal_at_s"], 2) if mine else None,
                "last_s_after_signal": round(mine[-1] - drain["signal_at_s"], 2) if mine else None,
            }
        )
    return {
        "benchmark": "rolling",
        "date": now_utc(),
        "command": " ".join(sys.argv),
        "args": vars(args),
        "model": "tiny random (1+1 layers, width 64; tests/conftest.py's)" if args.model == "tiny" else args.model,
        "nginx_server_params": args.nginx_server_params
        or SERVER_LINE.search((DEPLOY / "nginx.conf").read_text()).group(2),
        "clips": ROLLING_CLIPS,
        "duration_s": round(t_total, 1),
        "audio_streamed_s": round(audio_s, 1),
        "restarts": drains,
        "sessions": {"started": started, **counts},
        "finals": finals,
        "finals_after_drain_signal": flushed,
        "close_codes": close_codes,
        "lost": {
            "segments_with_partial_no_final_in_sessions_with_end": lost_segments,
            "clips_owed_a_final": owed,
            "owed_clips_without_final": owed_missing,
            "finals_after_end": after_end,
            "duplicate_finals": duplicates,
            "error_events": errors,
        },
        "final_latency": replay.stats(latencies),
        "reconnect_after_drain_s": replay.stats(reconnect),
        "nginx": nginx,
        "refused_by_restart": by_restart,
        "refused_before_first_restart": sum(1 for t in refused_times if not drains or t < drains[0]["signal_at_s"]),
        "problems": problems[:50],
    }


def print_rolling(result: dict) -> None:
    s, lost = result["sessions"], result["lost"]
    print(
        f"\nrolling restart: {len(result['restarts'])} restarts in {result['duration_s']} s, "
        f"{result['audio_streamed_s']} s of audio streamed"
    )
    for r in result["restarts"]:
        print(
            f"  round {r['round']} :{r['port']}: {r['sessions_open']} open, drained in {r['drain_s']} s "
            f"(exit {r['exit_code']}), ready {r['restart_to_ready_s']} s after restart"
        )
    print(
        f"sessions started {s['started']}: completed {s['completed']}, drained with end {s['drained']}, "
        f"closed without end {s['closed_without_end']}, neither {s['neither']}; "
        f"refused connects {s['refused']}, opened without ready {s['opened_without_ready']}"
    )
    print(
        f"finals {result['finals']} ({result['finals_after_drain_signal']} in drained sessions after the SIGTERM); lost: {json.dumps(lost)}"
    )
    print(f"final latency: {json.dumps(result['final_latency'])}")
    print(f"reconnect after a drain (end -> next ready): {json.dumps(result['reconnect_after_drain_s'])}")
    print(f"nginx: {json.dumps(result['nginx'])}")
    print(
        f"refused connects by restart: {json.dumps(result['refused_by_restart'])}; "
        f"before the first restart: {result['refused_before_first_restart']}"
    )


# --- scaling -------------------------------------------------------------------------------------


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def own_cpu_seconds(cluster: Cluster) -> tuple[float, float]:
    """(CPU seconds of the replicas, of this client process)."""
    t = os.times()
    return sum(proc_cpu_seconds(r.proc.pid) for r in cluster.replicas), t.user + t.system


async def scaling_step(cluster: Cluster, clips, streams: int, args: argparse.Namespace) -> dict:
    ports = [r.port for r in cluster.replicas]
    own0 = own_cpu_seconds(cluster)
    before = [await asyncio.to_thread(replay.fetch_metrics, f"http://127.0.0.1:{p}/metrics") for p in ports]
    cpu0 = cpu_times()
    t_ref = replay.clock()
    plans = []
    for i in range(streams):
        start = i % len(clips)
        order = clips[start:] + clips[:start]
        plans.append(plan_of(order, args.gap))
    logs = await asyncio.gather(
        *(
            replay.run_stream(
                cluster.url(),
                plan,
                stream=i,
                t_ref=t_ref,
                frame_ms=args.frame_ms,
                speed=1.0,
                delay=i * args.stagger,
                end_timeout=120.0,
            )
            for i, plan in enumerate(plans)
        )
    )
    wall = replay.clock() - t_ref
    cpu1 = cpu_times()
    own1 = own_cpu_seconds(cluster)
    cores = os.cpu_count() or 1
    after = [await asyncio.to_thread(replay.fetch_metrics, f"http://127.0.0.1:{p}/metrics") for p in ports]
    analyses = [replay.analyze_stream(lg, plan.spans) for lg, plan in zip(logs, plans)]
    finals, clip_end, stop_end = [], [], []
    counts: dict[str, int] = {}
    errors = refs = 0
    from streaming import scoring

    for a, plan in zip(analyses, plans):
        finals += a["final_latency"]
        clip_end += a["clip_end_latency"]
        if a["stop_to_end"] is not None:
            stop_end.append(a["stop_to_end"])
        for k, v in a["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for span, clip in zip(plan.spans, a["clips"]):
            if span.reference:
                r = scoring.score(span.reference, clip["hypothesis"], span.lang)
                errors, refs = errors + r.errors, refs + r.ref_tokens
    per_replica = []
    enc = dec = audio = 0.0
    for port, b, a in zip(ports, before, after):
        rtf = replay.server_rtf(b, a)
        if rtf:
            enc, dec, audio = enc + rtf["encoder_s"], dec + rtf["decoder_s"], audio + rtf["audio_s"]
        per_replica.append(
            {
                "port": port,
                "audio_s": round(rtf["audio_s"], 1) if rtf else 0.0,
                "rtf": round(rtf["rtf"], 3) if rtf else None,
                "busy": round((rtf["encoder_s"] + rtf["decoder_s"]) / wall, 3) if rtf else 0.0,
            }
        )
    completed = sum(1 for a in analyses if a["completed"])
    p95 = replay.stats(finals).get("p95")
    sustained = (
        completed == streams
        and counts.get("lost_finals", 0) == 0
        and p95 is not None
        and p95 <= args.max_p95
        and max((p["rtf"] or 0) for p in per_replica) < 1.0
    )

    return {
        "streams": streams,
        "wall_s": round(wall, 1),
        "stream_audio_s": round(plans[0].duration_s, 1),
        "completed": completed,
        "sustained": sustained,
        "server_rtf": round((enc + dec) / audio, 3) if audio else None,
        "audio_s": round(audio, 1),
        "engine_seconds": round(enc + dec, 1),
        "cpu_busy": round((cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1]), 3),
        # shares of the box's CPU (all cores) over the step: the replicas, this client (NGINX and
        # anything else running on the machine make up the rest of cpu_busy)
        "cpu_replicas": round((own1[0] - own0[0]) / (wall * cores), 3),
        "cpu_client": round((own1[1] - own0[1]) / (wall * cores), 3),
        "per_replica": per_replica,
        "final_latency": replay.stats(finals),
        "clip_end_latency": replay.stats(clip_end),
        "stop_to_end_max": round(max(stop_end), 2) if stop_end else None,
        "cer": round(errors / refs, 4) if refs else None,
        "counts": {
            k: counts.get(k, 0)
            for k in ("finals", "lost_finals", "finals_after_end", "duplicate_finals", "errors", "clips_without_final")
        },
    }


async def scaling(args: argparse.Namespace) -> dict:
    clips = load_clips(SCALING_CLIPS)
    cores = os.cpu_count() or 1
    results = []
    deadline = time.monotonic() + args.budget if args.budget else math.inf
    for count in args.replicas:
        threads = args.threads or max(1, cores // count)
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-scaleout-{count}-"))
        model = str(save_tiny_model(tmp / "tiny.pt")) if args.model == "tiny" else args.model
        cluster = Cluster(tmp, model, ["--max-connections-per-client", "0", "--max-sessions", "0"], threads)
        steps = []
        try:
            cluster.add_replicas(count)
            t0 = time.monotonic()
            await asyncio.to_thread(cluster.start_all)
            await asyncio.to_thread(cluster.start_nginx)
            log(f"{count} replica(s) x {threads} thread(s) ready in {time.monotonic() - t0:.1f} s")
            # one unmeasured stream first: the first requests of a fresh engine are slow
            if args.warmup:
                await scaling_step(cluster, clips[:2], 1, args)
            for streams in args.streams:
                if time.monotonic() > deadline:
                    log("time budget spent: stopping the ladder")
                    break
                step = await scaling_step(cluster, clips, streams, args)
                steps.append(step)
                log(
                    f"R={count} C={streams}: rtf {step['server_rtf']} cpu {step['cpu_busy']} "
                    f"final p50 {step['final_latency'].get('p50')} p95 {step['final_latency'].get('p95')} "
                    f"completed {step['completed']}/{streams} sustained {step['sustained']}"
                )
                if not step["sustained"] and not args.keep_going:
                    break
        finally:
            cluster.close()
        best = max((s["streams"] for s in steps if s["sustained"]), default=0)
        results.append(
            {"replicas": count, "threads_per_replica": threads, "max_sustained_streams": best, "steps": steps}
        )
    return {
        "benchmark": "scaling",
        "date": now_utc(),
        "command": " ".join(sys.argv),
        "args": vars(args),
        "cores": cores,
        "clips": SCALING_CLIPS,
        "results": results,
    }


def _fmt(value, fmt="{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_scaling(result: dict) -> None:
    print(
        "\n| replicas x threads | streams | server RTF | engine busy per replica | CPU busy (replicas) | final p50 | p95 | "
        "clip-end p95 | stop->end max | completed | lost | CER | sustained |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["results"]:
        for s in r["steps"]:
            f, c = s["final_latency"], s["clip_end_latency"]
            busy = " / ".join(_fmt(p["busy"]) for p in s["per_replica"])
            print(
                f"| {r['replicas']} x {r['threads_per_replica']} | {s['streams']} | {_fmt(s['server_rtf'])} | {busy} | "
                f"{s['cpu_busy']:.0%} ({s.get('cpu_replicas', 0):.0%}) | {_fmt(f.get('p50'))} s | {_fmt(f.get('p95'))} s | {_fmt(c.get('p95'))} s | "
                f"{_fmt(s['stop_to_end_max'])} s | {s['completed']}/{s['streams']} | {s['counts']['lost_finals']} | "
                f"{_fmt(s['cer'], '{:.1%}')} | {'yes' if s['sustained'] else 'no'} |"
            )
    for r in result["results"]:
        print(f"{r['replicas']} replica(s): max sustained {r['max_sustained_streams']} streams")


# --- main ----------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("rolling", help="rolling restart of every replica under a steady load")
    p.add_argument("--model", default="tiny", help="'tiny' (a random tiny Whisper saved as .pt), 'default' or a path")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--streams", type=int, default=6, help="concurrent callers")
    p.add_argument("--clips-per-session", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per replica")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the first restart")
    p.add_argument(
        "--settle", type=float, default=8.0, help="seconds between a replica's readiness and the next restart"
    )
    p.add_argument("--tail", type=float, default=10.0, help="seconds of load after the last restart")
    p.add_argument("--rounds", type=int, default=1, help="restarts of every replica")
    p.add_argument("--stagger", type=float, default=1.7, help="seconds between the callers' first sessions")
    p.add_argument("--gap", type=float, default=1.5)
    p.add_argument("--frame-ms", type=float, default=40.0)
    p.add_argument(
        "--nginx-server-params",
        default=None,
        metavar="PARAMS",
        help="parameters of the upstream `server` lines instead of deploy/nginx.conf's (e.g. 'max_fails=0')",
    )
    p.add_argument("--json", default=None)
    p = sub.add_parser("scaling", help="streams sustained by 1..N replicas")
    p.add_argument("--model", default="default")
    p.add_argument("--replicas", type=int_list, default=[1, 2, 3])
    p.add_argument("--streams", type=int_list, default=[1, 2, 3, 4, 6, 8])
    p.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS per replica (0: cores // replicas, at least 1)"
    )
    p.add_argument(
        "--max-p95",
        type=float,
        default=3.0,
        help="sustained: every replica's server RTF < 1 and p95 final latency at most this (seconds)",
    )
    p.add_argument("--keep-going", action="store_true", help="run every load of the ladder, sustained or not")
    p.add_argument("--stagger", type=float, default=0.7)
    p.add_argument("--gap", type=float, default=1.5)
    p.add_argument("--frame-ms", type=float, default=40.0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument(
        "--budget", type=float, default=0, help="stop starting ladder steps after this many seconds (0: none)"
    )
    p.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if NGINX is None:
        print("nginx is not installed (Debian: apt-get install nginx)", file=sys.stderr)
        return 2
    if args.benchmark == "rolling":
        result = asyncio.run(rolling(args))
        print_rolling(result)
        ok = (
            result["sessions"]["neither"] == 0
            and result["lost"]["owed_clips_without_final"] == 0
            and result["lost"]["segments_with_partial_no_final_in_sessions_with_end"] == 0
        )
    else:
        result = asyncio.run(scaling(args))
        print_scaling(result)
        ok = True
    if args.json:
        Path(args.json).write_text(json.dumps(replay._jsonable(result), indent=1, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
