"""bench-load: the real server (tiny model) over real sockets, driven by spawned client processes;
a server killed mid-run; the stream planning and the engine's load metrics."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench import load as bench_load
from bench.cli_server import CliServer
from bench.clips import RATE, voiced
from bench.load import ClipLoop, plan_streams
from bench.tiny import TINY_TEXT, save_tiny_model
from streaming.metrics import Metrics
from streaming.server.app import Server, ServerConfig

CLIP_SECONDS = (1.0, 1.2, 1.4)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Three clips of voiced buzz (one segment each: the tiny model answers TINY_TEXT), with references."""
    lines = []
    for i, seconds in enumerate(CLIP_SECONDS):
        soundfile.write(tmp_path / f"clip{i}.wav", voiced(seconds, f0=120.0 + 15 * i), RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio": f"clip{i}.wav", "text": TINY_TEXT, "lang": "zh"}))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def server(tiny_engine):
    async with Server(ServerConfig(port=0), engine=tiny_engine) as srv:
        yield srv


async def bench(argv: list[str], capsys) -> tuple[int, str]:
    """bench-load in a thread (this loop runs the server), its exit status and its stdout."""
    code = await asyncio.to_thread(bench_load.main, argv)
    return code, capsys.readouterr().out


def first_frame_spread(report: dict) -> float:
    starts = [s["t_first_frame"] for s in report["streams"]]
    return max(starts) - min(starts)


async def test_staggered_streams_over_two_processes(server: Server, manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    code, stdout = await bench(
        [
            str(manifest),
            "--url",
            f"ws://127.0.0.1:{server.port}/v1/stream",
            "--streams",
            "4",
            "--processes",
            "2",
            "--duration",
            "6",
            "--gap",
            "1.0",
            "--ramp",
            "2.0",
            "--quiet",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out.read_text())
    counts = report["summary"]["counts"]
    line = stdout.strip()
    assert "\n" not in line and line.startswith("streams=4 dur=6s completed=4/4 ")
    assert f"clips={counts['clips_sent']} finals={counts['finals']} lost=0 disconnects=0 errors=0" in line

    # every clip of every stream was sent whole and got its final; nothing was lost or refused
    planned = sum(len(s["clips"]) for s in report["streams"])
    assert planned >= 4 * 2 and counts["clips_sent"] == counts["clips_with_final"] == planned
    assert counts["completed"] == 4 and counts["lost_finals"] == counts["disconnects"] == counts["errors"] == 0
    assert counts["finals"] >= planned and counts["segments_without_final"] == 0
    assert report["summary"]["accuracy"]["cer_zh_mix"]["rate"] == 0.0  # finals land on their clips, text 好
    assert report["summary"]["accuracy"]["cer_zh_mix"]["clips"] == planned

    latency = report["summary"]["latency"]
    assert latency["final"]["n"] == counts["finals"]
    for name in ("final", "first_partial"):
        figures = latency[name]
        assert figures["n"] > 0 and all(math.isfinite(figures[k]) for k in ("p50", "p95", "p99", "max"))
        assert 0 < figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"] < 10

    # the server's figures, with the engine's load metrics
    server_figures = report["server"]
    assert server_figures["available"] and server_figures["rtf"]["rtf"] > 0
    assert server_figures["finals"] == counts["finals"]
    # the engine's share of a final is part of the final's latency, which the client measures from its own clock
    engine_p50, engine_p95 = server_figures["final_engine_p50_p95"]
    assert 0 < engine_p50 <= engine_p95 and 0 < server_figures["final_engine_mean"] < latency["final"]["max"]
    assert "final-in-engine p50=" in line
    early = server_figures["early_finals"]  # every segment here ends in silence: its final started early
    assert early["used"] == counts["finals"] and early["void"] is not None
    engine = server_figures["engine"]
    assert engine["steps"] > 0 and engine["rows_per_step"] >= 1 and engine["step_ms"] > 0
    assert engine["encoder_calls"] > 0 and engine["windows_per_encoder_call"] >= 1
    assert engine["queue_depth"]["end"] == 0 and engine["queue_depth"]["samples"] > 0
    assert "rows/step=" in line and "queue_max=" in line

    # two client processes, each measured
    client = report["client"]
    pids = {p["pid"] for p in client["processes"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(p["streams"] == 2 and p["cpu_s"] > 0 and 0 < p["cores"] < 2 for p in client["processes"])
    assert 0 < client["cores"] and f"client_cpu={client['cores']:.2f} core" in line

    # staggered: starts spread over the ramp, a clip order of each stream's own
    assert [s["offset"] for s in report["streams"]] == [0.0, 0.5, 1.0, 1.5]
    assert first_frame_spread(report) > 1.0
    orders = [[c["clip"] for c in s["clips"]] for s in report["streams"]]
    assert len({tuple(o) for o in orders}) > 1


async def test_sync_starts_together_in_manifest_order(server: Server, manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    code, stdout = await bench(
        [
            str(manifest),
            "--url",
            f"ws://127.0.0.1:{server.port}/v1/stream",
            "--streams",
            "3",
            "--duration",
            "4",
            "--gap",
            "1.0",
            "--sync",
            "--quiet",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0 and "lost=0 disconnects=0" in stdout
    report = json.loads(out.read_text())
    assert report["config"]["ramp"] == 0 and all(s["offset"] == 0 for s in report["streams"])
    assert first_frame_spread(report) < 0.5
    assert all([c["clip"] for c in s["clips"]] == [0, 1] for s in report["streams"])


async def test_a_killed_server_is_reported_as_disconnects(manifest: Path, tmp_path: Path, capsys):
    """SIGKILL of the real CLI server mid-run: every stream is a disconnect (1006), no hang, no crash."""
    server = CliServer("--model", str(save_tiny_model(tmp_path / "tiny.pt")), "--device", "cpu")
    out = tmp_path / "report.json"
    try:
        await asyncio.to_thread(server.start, 60)
        run = asyncio.ensure_future(
            bench(
                [
                    str(manifest),
                    "--url",
                    f"ws://127.0.0.1:{server.port}/v1/stream",
                    "--streams",
                    "2",
                    "--duration",
                    "30",
                    "--gap",
                    "1.0",
                    "--quiet",
                    "--json",
                    str(out),
                ],
                capsys,
            )
        )
        deadline = time.monotonic() + 30
        while "breeze_sessions_active 2.0" not in _metrics(server.port):  # both streams are playing
            assert time.monotonic() < deadline and not run.done()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        server.kill()
        killed = time.monotonic()
        code, stdout = await asyncio.wait_for(run, 30)
        elapsed = time.monotonic() - killed
    finally:
        server.kill()
    assert code == 0 and elapsed < 10
    assert "completed=0/2" in stdout and "disconnects=2" in stdout and "engine=n/a" in stdout
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["counts"]["disconnects"] == 2 and summary["disconnect_close_codes"] == {"1006": 2}
    assert summary["counts"]["connect_failures"] == 0 and summary["counts"]["end_timeouts"] == 0
    assert report["server"]["available"] is False  # /metrics after the run: nobody answers


def _metrics(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_nothing_to_measure_exits_2(manifest: Path, capsys):
    assert bench_load.main([str(manifest), "--streams", "2", "--processes", "3"]) == 2
    assert "--processes must be between 1 and --streams" in capsys.readouterr().err
    assert bench_load.main([str(manifest), "--sync", "--ramp", "1"]) == 2
    assert bench_load.main([str(manifest.parent / "missing.jsonl")]) == 2
    with socket_nobody_listens_on() as port:
        assert (
            bench_load.main([str(manifest), "--url", f"ws://127.0.0.1:{port}/v1/stream", "--duration", "2", "--quiet"])
            == 2
        )
    assert "no stream got 'ready': cannot connect" in capsys.readouterr().err


class socket_nobody_listens_on:
    """A local port that refuses connections (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- planning, pieces, metrics


def test_plan_streams_orders_and_offsets():
    durations, groups = [2.0, 3.0, 1.0, 4.0], ["zh", "zh", "en", "zh"]
    jobs = plan_streams(
        durations, groups, streams=8, duration=20.0, gap=1.0, ramp=4.0, seed=7, sync=False, language="zh"
    )
    assert [j.offset for j in jobs] == [0.5 * i for i in range(8)]
    for job in jobs:  # whole clips until the stream holds the duration, each clip once per cycle
        held = 1.0 + sum(durations[i] + 1.0 for i in job.order)
        assert held >= 20.0 and held - durations[job.order[-1]] - 1.0 < 20.0
        assert sorted(job.order[:4]) == [0, 1, 2, 3]
    assert len({tuple(j.order) for j in jobs}) > 1
    assert jobs == plan_streams(
        durations, groups, streams=8, duration=20.0, gap=1.0, ramp=4.0, seed=7, sync=False, language="zh"
    )  # seeded
    synced = plan_streams(
        durations, groups, streams=3, duration=9.0, gap=1.0, ramp=0.0, seed=7, sync=True, language="zh"
    )
    assert all(j.order == [0, 1, 2] and j.offset == 0 for j in synced)
    by_clip = plan_streams(
        durations, groups, streams=12, duration=20.0, gap=1.0, ramp=0.0, seed=1, sync=False, language="clip"
    )
    for job in by_clip:
        assert {groups[i] for i in job.order} == {job.language}
    assert {j.language for j in by_clip} == {"zh", "en"}


def test_clip_loop_reads_like_the_joined_array():
    rng = np.random.default_rng(0)
    pieces = [
        np.zeros(5, np.int16),
        rng.integers(-99, 99, 7).astype(np.int16),
        np.zeros(0, np.int16),
        rng.integers(-99, 99, 3).astype(np.int16),
        np.zeros(5, np.int16),
    ]
    joined, loop = np.concatenate(pieces), ClipLoop(pieces)
    assert len(loop) == len(joined) == 20
    for start in range(0, 22):
        for stop in range(start, 23):
            assert np.array_equal(loop[start:stop], joined[start:stop])
    assert loop[0:4].dtype == np.int16


def test_engine_load_metrics_absent_without_figures(tiny_engine):
    """No engine yet, or one that keeps none of the figures (the TensorRT-LLM executor answers {}):
    no load names, no failure."""

    class NoFigures:
        def load_stats(self) -> dict:
            return {}

    for engine in (None, NoFigures()):
        metrics = Metrics()
        metrics.watch_engine(lambda engine=engine: engine)
        text = metrics.render().decode()
        assert "breeze_sessions_active" in text
        assert not any(name in text for name in ("breeze_engine_steps", "breeze_engine_queue_depth"))
    metrics = Metrics()
    metrics.watch_engine(lambda: tiny_engine)
    tiny_engine.transcribe(voiced(1.0))
    text = metrics.render().decode()
    stats = tiny_engine.load_stats()
    assert stats["steps"] > 0 and stats["step_rows"] >= stats["steps"] and stats["encoder_calls"] > 0
    assert "breeze_engine_steps_total" in text and "breeze_engine_queue_depth 0.0" in text
