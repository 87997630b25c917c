"""Load and soak run (issue 8): N concurrent real-time streams for S seconds against the real
command-line server in a subprocess; not a CI test (it takes minutes), a benchmark.

    .venv/bin/python -m bench.soak --streams 30 --seconds 120 --json out/load.json

Each client streams, at real-time pace in 100 ms pcm_s16le frames, a whole number of phrases (a
voiced buzz of 1.2 s between pauses: one VAD segment each) that fill the time, then `stop`, and
waits for `end`. Reported: finals expected (one per phrase) against received, so lost finals;
the server's resident memory (VmRSS) sampled every second, with the growth between minute 1
and minute 2; how long after `stop` the last `end` came (the run is bounded in time); client-side
final latency (arrival minus when the audio at the final's `end` was sent); the server's counters;
and that the active-sessions gauge is back to 0 and the server exits 0 on SIGTERM.

`--model tiny` (the default) is the rigged tiny Whisper of the tests (bench/tiny.py),
so the run measures the server (sockets, VAD, resampling, scheduling, memory), not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.cli_server import CliServer, rss_bytes
from bench.clips import RATE, pcm16, phrases
from bench.tiny import save_tiny_model

FRAME = 0.1  # seconds of audio per frame
PHRASE = phrases(1)  # 0.3 s silence, 1.2 s voiced, 0.8 s silence: one segment


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        match = re.match(r"^(breeze_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


async def client(port: int, index: int, repeats: int, result: dict) -> None:
    audio = pcm16(np.tile(PHRASE, repeats))
    frame = int(FRAME * RATE) * 2
    finals, latencies, partials = [], [], 0
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        t0 = time.monotonic()
        ended = asyncio.Event()

        async def read() -> None:
            nonlocal partials
            try:
                async for message in ws:
                    event = json.loads(message)
                    if event["type"] == "final":
                        finals.append(event["segment"])
                        latencies.append(time.monotonic() - (t0 + event["end"]))
                    elif event["type"] == "partial":
                        partials += 1
                    elif event["type"] == "end":
                        ended.set()
                    elif event["type"] == "error":
                        result.setdefault("errors", []).append(event)
            except ConnectionClosed:
                pass

        reader = asyncio.ensure_future(read())
        for i in range(0, len(audio), frame):
            await asyncio.sleep(max(0.0, t0 + (i // frame) * FRAME - time.monotonic()))
            await ws.send(audio[i : i + frame])
        stopped = time.monotonic()
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(ended.wait(), 60)
        result["stop_to_end"] = max(result.get("stop_to_end", 0.0), time.monotonic() - stopped)
        await reader
        result["close_codes"] = result.get("close_codes", []) + [ws.close_code]
    result["expected"] = result.get("expected", 0) + repeats
    result["finals"] = result.get("finals", 0) + len(finals)
    result["duplicate_or_unordered"] = result.get("duplicate_or_unordered", 0) + (finals != sorted(set(finals)))
    result["partials"] = result.get("partials", 0) + partials
    result.setdefault("latencies", []).extend(latencies)


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_model(Path(tmp) / "tiny.pt")) if args.model == "tiny" else args.model
        env = dict(item.split("=", 1) for item in args.server_env)
        server = CliServer(
            "--model",
            model,
            "--device",
            "cpu",
            "--max-connections-per-client",
            "0",
            "--max-sessions",
            str(args.streams + 10),
            "--drain-timeout",
            "30",
            env=env,
        )
        try:
            await asyncio.to_thread(server.start, 300)
            pid = server.proc.pid
            repeats = max(1, round(args.seconds / (len(PHRASE) / RATE)))
            result: dict = {}
            rss: list[tuple[float, int]] = []
            started = time.monotonic()

            async def sample() -> None:
                while True:
                    rss.append((time.monotonic() - started, rss_bytes(pid)))
                    await asyncio.sleep(1.0)

            sampler = asyncio.ensure_future(sample())
            clients = [asyncio.ensure_future(client(server.port, i, repeats, result)) for i in range(args.streams)]
            await asyncio.wait_for(asyncio.gather(*clients), args.seconds + 120)
            wall = time.monotonic() - started
            sampler.cancel()
            await asyncio.sleep(1.0)
            counters = metrics(server.port)
            server.signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(server.wait, 60)
        finally:
            server.kill()

    def rss_at(t: float) -> int:
        return min(rss, key=lambda s: abs(s[0] - t))[1]

    minute1, minute2 = rss_at(60.0), rss_at(min(120.0, rss[-1][0]))
    latencies = np.array(result.pop("latencies", [0.0]))
    return {
        "streams": args.streams,
        "seconds_of_audio_each": round(repeats * len(PHRASE) / RATE, 1),
        "wall_s": round(wall, 1),
        "finals_expected": result["expected"],
        "finals_received": result["finals"],
        "lost_finals": result["expected"] - result["finals"],
        "duplicate_or_unordered_streams": result["duplicate_or_unordered"],
        "partials": result["partials"],
        "error_events": result.get("errors", []),
        "close_codes": sorted(set(result["close_codes"])),
        "max_stop_to_end_s": round(result["stop_to_end"], 2),
        "final_latency_s": {
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "p95": round(float(np.percentile(latencies, 95)), 3),
            "max": round(float(latencies.max()), 3),
        },
        "rss_mib": {
            "start": round(rss[0][1] / 2**20, 1),
            "minute_1": round(minute1 / 2**20, 1),
            "minute_2": round(minute2 / 2**20, 1),
            "max": round(max(r for _, r in rss) / 2**20, 1),
        },
        "rss_growth_minute_1_to_2": round((minute2 - minute1) / minute1, 4),
        "rss_mib_every_10_s": [round(rss_at(t) / 2**20, 1) for t in np.arange(0.0, rss[-1][0] + 0.1, 10.0)],
        "server": {
            k: v
            for k, v in counters.items()
            if k.split("{")[0]
            in (
                "breeze_sessions_active",
                "breeze_sessions_total",
                "breeze_segments_total",
                "breeze_finals_total",
                "breeze_partials_total",
                "breeze_errors_total",
                "breeze_final_latency_seconds_count",
                "breeze_final_latency_seconds_sum",
            )
            and (v or k == "breeze_sessions_active")
        },
        "server_exit_code": exit_code,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--model", default="tiny", help="'tiny' (rigged, bench/tiny.py) or a --model spec")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the server process, e.g. MALLOC_ARENA_MAX=2",
    )
    args = parser.parse_args()
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    ok = (
        report["lost_finals"] == 0
        and not report["error_events"]
        and report["rss_growth_minute_1_to_2"] < 0.10
        and report["server"].get("breeze_sessions_active", 0) == 0
        and report["server_exit_code"] == 0
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
