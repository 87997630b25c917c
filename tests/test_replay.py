"""Replay harness: latency arithmetic on a synthetic log, pacing, clip assignment, and the whole
client against a tiny fake native-protocol server over a real socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import numpy as np
import pytest
import soundfile

from bench import analysis, pacing, replay, report
from bench.analysis import analyze_stream, assign_clip, parse_prometheus, server_rtf, stats
from bench.options import add_replay_arguments
from bench.pacing import ClipSpan, StreamLog, audio_send_time, frame_schedule, paced_send

SR = 16000
FRAME = 640  # 40 ms
approx = lambda x: pytest.approx(x, abs=1e-9)  # noqa: E731


# ----------------------------------------------------------------------------- helpers


def test_stats_linear_percentiles():
    s = stats([0.8, 0.4, 0.6])
    assert s["n"] == 3
    assert s["p50"] == approx(0.6)
    assert s["p95"] == approx(0.78)  # rank 1.9: 0.6 + 0.9 * (0.8 - 0.6)
    assert s["p99"] == approx(0.796)  # rank 1.98
    assert s["max"] == approx(0.8)
    assert stats([])["p50"] is None
    assert stats([math.nan, 1.0])["n"] == 1


def test_frame_schedule_is_absolute():
    assert frame_schedule(5, 0.04, speed=2.0, t0=10.0) == pytest.approx([10.0, 10.02, 10.04, 10.06, 10.08])
    # frame k is due at exactly t0 + k * frame / speed, no accumulated rounding
    sched = frame_schedule(100_000, 0.04, speed=1.0)
    assert sched[-1] == approx(99_999 * 0.04)


def test_audio_send_time_maps_start_and_end_to_frames():
    sends = np.arange(100) * 0.04 + 10.0
    # an end at a frame boundary means the last sample before it: the previous frame
    assert audio_send_time(sends, FRAME, 1.20, SR, "end") == approx(11.16)
    assert audio_send_time(sends, FRAME, 1.21, SR, "end") == approx(11.20)
    assert audio_send_time(sends, FRAME, 1.20, SR, "start") == approx(11.20)
    # clamped to the stream
    assert audio_send_time(sends, FRAME, 99.0, SR, "end") == approx(10.0 + 99 * 0.04)
    assert audio_send_time(sends, FRAME, 0.0, SR, "end") == approx(10.0)


async def test_paced_send_keeps_an_absolute_schedule():
    """Virtual clock: each send takes 60% of the interval and frame 5 stalls for 3 intervals; the
    frames after the stall go out at once until they are back on schedule, then exactly on it."""
    clock = [100.0]
    n, interval = 20, 0.04

    async def sleep(d):
        clock[0] += d

    async def send(k):
        clock[0] += 3 * interval if k == 5 else 0.6 * interval

    scheduled, sent = np.full(n, math.nan), np.full(n, math.nan)
    assert await paced_send(n, interval, send, lambda: clock[0], scheduled, sent, sleep=sleep) == n
    assert scheduled == pytest.approx(100.0 + np.arange(n) * interval)
    late = sent - scheduled
    assert late[:6] == pytest.approx(np.zeros(6))
    # frame 5 ends at 0.20 + 0.12 = 0.32 s: frame 6 (due 0.24) goes at 0.32, frame 7 (due 0.28) at
    # 0.344, frame 8 (due 0.32) at 0.368, frame 9 (due 0.36) at 0.392, frame 10 (due 0.40) at 0.416,
    # frame 11 (due 0.44) on time again
    assert late[6:11] == pytest.approx([0.08, 0.064, 0.048, 0.032, 0.016])
    assert late[11:] == pytest.approx(np.zeros(n - 11), abs=1e-9)


async def test_paced_send_real_clock():
    n, interval = 25, 0.02
    scheduled, sent = np.full(n, math.nan), np.full(n, math.nan)

    async def slow_send(k):  # each send takes 60% of the interval
        await asyncio.sleep(0.012)

    assert await paced_send(n, interval, slow_send, time.monotonic, scheduled, sent) == n
    assert np.all(sent >= scheduled - 1e-6)
    # accumulating sleeps would end near 25 * 0.032 = 0.8 s; the schedule ends at 0.48 s
    assert sent[-1] - scheduled[0] < (n - 1) * interval + 0.2


async def test_paced_send_stops_early():
    scheduled, sent = np.full(10, math.nan), np.full(10, math.nan)
    calls = []

    async def send(k):
        calls.append(k)

    count = await paced_send(10, 0.001, send, time.monotonic, scheduled, sent, stop=lambda: len(calls) >= 4)
    assert count == 4 and calls == [0, 1, 2, 3]
    assert np.isnan(sent[4:]).all()


SPANS = [ClipSpan(0, "a", 8000, 24000, "你好", "zh"), ClipSpan(1, "b", 32000, 72000, "今天天气很好", "zh")]


def test_assign_clip_by_largest_overlap():
    assert assign_clip(0.4, 1.6, SPANS) == 0
    assert assign_clip(1.4, 2.6, SPANS) == 1  # 0.1 s on clip 0, 0.6 s on clip 1
    assert assign_clip(1.0, 3.0, SPANS) == 1  # 0.5 vs 1.0
    assert assign_clip(1.0, 2.5, SPANS) == 0  # tie 0.5 / 0.5: the earlier clip
    assert assign_clip(1.6, 1.9, SPANS) is None  # only silence
    assert assign_clip(1.5, 2.0, SPANS) is None  # touching both ends, no overlap
    assert assign_clip(1.0, 1.0, SPANS) == 0  # zero-length inside clip 0
    assert assign_clip(5.0, 6.0, SPANS) is None


# ----------------------------------------------------------------------------- synthetic event log


def synthetic_log() -> StreamLog:
    """5 s stream, 40 ms frames, frame k sent at exactly 0.04 k. For an `end` on a 40 ms boundary
    the audio was sent at end - 0.04, for a `start` on a boundary at start itself."""
    n = 125
    sends = np.arange(n) * 0.04
    ev = lambda kind, seg, start, end, text="": {  # noqa: E731
        "type": kind,
        "segment": seg,
        "start": start,
        "end": end,
        "text": text,
    }
    events = [
        (-0.10, {"type": "ready", "session": "s1", "model": "fake", "sample_rate": 16000}),
        (0.60, ev("final", 2, 0.08, 0.24, "嗯")),  # over the leading silence: latency 0.40
        (0.86, ev("partial", 0, 0.48, 0.80, "你")),  # lag 0.10, first partial 0.86 - 0.48 = 0.38
        (1.46, ev("partial", 0, 0.48, 1.20, "你好")),  # lag 0.30
        (2.08, ev("final", 0, 0.48, 1.52, "你好")),  # latency 0.60; clip 0 ends in frame 37 (1.48)
        (2.56, ev("partial", 1, 1.96, 2.40, "今天")),  # lag 0.20, first partial 2.56 - 1.96 = 0.60
        (3.16, ev("partial", 1, 1.96, 2.80, "今天天")),  # lag 0.40
        (3.66, ev("partial", 1, 1.96, 3.20, "今天天氣")),  # lag 0.50
        (4.11, ev("partial", 1, 1.96, 4.00, "今天天氣很")),  # lag 0.15
        (5.28, ev("final", 1, 1.96, 4.52, "今天天氣很好")),  # latency 0.80; clip 1 ends in frame 112 (4.48)
        (5.40, {"type": "end"}),
    ]
    return StreamLog(0, FRAME, SR, sends.copy(), sends.copy(), events, t_ready=-0.1, t_stop=5.0, t_end=5.40)


def test_latencies_on_synthetic_log():
    a = analyze_stream(synthetic_log(), SPANS)
    assert sorted(a["final_latency"]) == pytest.approx([0.40, 0.60, 0.80])
    assert sorted(a["partial_lag"]) == pytest.approx([0.10, 0.15, 0.20, 0.30, 0.40, 0.50])
    assert sorted(a["first_partial_latency"]) == pytest.approx([0.38, 0.60])
    assert a["clip_end_latency"] == pytest.approx([0.60, 0.80])

    fl = stats(a["final_latency"])
    assert (fl["p50"], fl["p95"], fl["max"]) == (approx(0.60), approx(0.78), approx(0.80))
    pl = stats(a["partial_lag"])  # ranks 2.5 and 4.75 of [.1 .15 .2 .3 .4 .5]
    assert (pl["p50"], pl["p95"], pl["max"]) == (approx(0.25), approx(0.475), approx(0.50))
    fp = stats(a["first_partial_latency"])
    assert (fp["p50"], fp["p95"], fp["max"]) == (approx(0.49), approx(0.589), approx(0.60))

    # cadence only over segment 1 (2.56 s long); segment 0 is 1.04 s
    assert a["partial_gaps"] == pytest.approx([0.60, 0.50, 0.45])
    assert a["partial_gaps_audio"] == pytest.approx([0.40, 0.40, 0.80])

    clips = a["clips"]
    assert [c["finals"] for c in clips] == [1, 1]
    assert [c["hypothesis"] for c in clips] == ["你好", "今天天氣很好"]
    c = a["counts"]
    assert c["finals"] == 3 and c["partials"] == 6 and c["segments"] == 3
    assert c["finals_outside_clips"] == 1
    assert c["lost_finals"] == c["finals_after_end"] == c["duplicate_finals"] == c["errors"] == 0
    assert c["clips_without_final"] == 0
    assert a["completed"] and a["stop_to_end"] == approx(0.40)


def test_summary_scores_and_checks():
    a = analyze_stream(synthetic_log(), SPANS)
    plan = pacing.StreamPlan(np.zeros(80000, np.int16), SPANS)
    s = analysis.summarize(plan, [a, a], rtf=None)  # two identical streams pool their values
    assert s["final_latency"]["n"] == 6 and s["final_latency"]["p50"] == approx(0.60)
    assert s["accuracy"]["cer_zh_mix"] == {"rate": 0.0, "errors": 0, "ref_tokens": 16, "clips": 2}
    assert s["per_clip"][1]["error_rate"] == 0.0  # simplified reference, traditional hypothesis
    assert s["ok"]
    text = report.format_summary(s, {"speed": 1.0, "frame_ms": 40, "gap": 1.5, "url": "ws://x/v1/stream"})
    assert "final latency (segment end)" in text and "checks: all passed" in text


def test_contract_counters():
    log = synthetic_log()
    log.events[-1:] = [
        (4.70, {"type": "partial", "segment": 7, "start": 4.6, "end": 4.7, "text": "啊"}),  # never finalised
        (4.80, {"type": "error", "code": "internal", "message": "boom"}),
        (4.90, {"type": "final", "segment": 1, "start": 1.96, "end": 4.52, "text": "again"}),  # duplicate
        (5.40, {"type": "end"}),
        (5.50, {"type": "final", "segment": 8, "start": 2.0, "end": 2.4, "text": "late"}),  # after end
    ]
    a = analyze_stream(log, SPANS)
    c = a["counts"]
    assert c["lost_finals"] == 1 and a["lost_segments"] == [7]
    assert c["errors"] == 1 and c["duplicate_finals"] == 1 and c["finals_after_end"] == 1
    plan = pacing.StreamPlan(np.zeros(80000, np.int16), SPANS)
    s = analysis.summarize(plan, [a], rtf=None)
    assert not s["ok"]
    assert not s["checks"]["no_lost_finals"] and not s["checks"]["no_errors"]


def test_every_clip_needs_a_final():
    log = synthetic_log()
    log.events = [e for e in log.events if e[1].get("segment") != 0]
    a = analyze_stream(log, SPANS)
    assert [c["finals"] for c in a["clips"]] == [0, 1]
    assert a["counts"]["clips_without_final"] == 1
    assert a["counts"]["lost_finals"] == 0  # segment 0 had no partials left either


def test_a_retracted_segment_is_not_a_lost_final():
    """The server retracts the partials of a segment whose final has no speech with a blank partial."""
    log = synthetic_log()
    log.events[-1:] = [
        (4.70, {"type": "partial", "segment": 7, "start": 4.6, "end": 4.7, "text": "水"}),
        (4.80, {"type": "partial", "segment": 7, "start": 4.6, "end": 4.8, "text": ""}),
        (5.40, {"type": "end"}),
    ]
    assert analyze_stream(log, SPANS)["counts"]["lost_finals"] == 0
    log.events.insert(-1, (4.90, {"type": "partial", "segment": 7, "start": 4.6, "end": 4.9, "text": "水"}))
    assert analyze_stream(log, SPANS)["lost_segments"] == [7]


def test_metrics_parsing_and_rtf():
    text = """# HELP breeze_encoder_seconds_total x
# TYPE breeze_encoder_seconds_total counter
breeze_encoder_seconds_total 3.0
breeze_decoder_seconds_total{device="cuda", note="a b"} 1.0
breeze_decoder_seconds_total{device="cpu"} 1.0
breeze_audio_seconds_total 10.0
breeze_final_latency_seconds_bucket{le="+Inf"} 4
"""
    before = parse_prometheus(text)
    assert before["breeze_decoder_seconds_total"] == 2.0
    assert before['breeze_decoder_seconds_total{device="cpu"}'] == 1.0
    assert before["breeze_final_latency_seconds_bucket"] == 4
    after = dict(
        before, breeze_encoder_seconds_total=6.0, breeze_decoder_seconds_total=3.0, breeze_audio_seconds_total=30.0
    )
    rtf = server_rtf(before, after)
    assert rtf["rtf"] == approx(0.2) and rtf["encoder_rtf"] == approx(0.15) and rtf["decoder_rtf"] == approx(0.05)
    assert server_rtf(None, after) is None and server_rtf(before, before) is None
    assert analysis.metrics_url("ws://127.0.0.1:8765/v1/stream") == "http://127.0.0.1:8765/metrics"
    assert analysis.metrics_url("wss://h/v1/stream?x=1") == "https://h/metrics"


def test_build_stream_layout():
    clips = [pacing.Clip("a", "a.wav", "x", "zh"), pacing.Clip("b", "b.wav", "y", "en")]
    plan = pacing.build_stream(clips, [np.full(16000, 0.5, np.float32), np.full(8000, -0.5, np.float32)], gap_s=0.5)
    assert len(plan.pcm) == 8000 + 16000 + 8000 + 8000 + 8000
    assert [(s.start, s.end) for s in plan.spans] == [(8000, 24000), (32000, 40000)]
    assert plan.pcm[:8000].max() == 0 and plan.pcm[8000] == round(0.5 * 32767) and plan.pcm[-1] == 0


# ----------------------------------------------------------------------------- end to end, fake server


class FakeServer:
    """A native-protocol server with an energy 'VAD': a segment opens on a loud 40 ms frame, sends a
    partial every 3 frames, and closes after 5 quiet frames with a final whose text is 你好; stop
    flushes the open segment, then `end`. /metrics counts audio and fake model seconds."""

    def __init__(self):
        self.metrics = {"audio": 0.0, "encoder": 0.0, "decoder": 0.0}
        self.sessions = 0
        self.fail_after_frames = None  # send an error and close after this many frames

    def process_request(self, connection, request):
        if request.path == "/metrics":
            m = self.metrics
            body = (
                f"breeze_audio_seconds_total {m['audio']}\nbreeze_encoder_seconds_total {m['encoder']}\n"
                f'breeze_decoder_seconds_total{{kind="x"}} {m["decoder"]}\n'
            )
            return connection.respond(200, body)
        return None

    async def handler(self, ws):
        start = json.loads(await ws.recv())
        assert start["type"] == "start" and start["encoding"] == "pcm_s16le" and start["sample_rate"] == 16000
        self.sessions += 1
        await ws.send(
            json.dumps({"type": "ready", "session": f"fake{self.sessions}", "model": "fake", "sample_rate": 16000})
        )
        buffer = np.zeros(0, np.int16)
        position = 0  # samples analysed
        segment, seg_start, last_voiced, quiet, frames_in_seg = -1, None, 0, 0, 0

        async def final():
            nonlocal seg_start
            await ws.send(
                json.dumps(
                    {
                        "type": "final",
                        "segment": segment,
                        "start": seg_start / SR,
                        "end": last_voiced / SR,
                        "text": "你好",
                    }
                )
            )
            seg_start = None

        async for message in ws:
            if isinstance(message, str):
                assert json.loads(message) == {"type": "stop"}
                if seg_start is not None:
                    await final()
                await ws.send(json.dumps({"type": "end"}))
                return
            if self.fail_after_frames is not None:
                self.fail_after_frames -= 1
                if self.fail_after_frames < 0:
                    await ws.send(json.dumps({"type": "error", "code": "internal", "message": "fake failure"}))
                    await ws.close(1011, "internal")
                    return
            chunk = np.frombuffer(message, "<i2")
            self.metrics["audio"] += len(chunk) / SR
            self.metrics["encoder"] += 0.1 * len(chunk) / SR
            self.metrics["decoder"] += 0.05 * len(chunk) / SR
            buffer = np.concatenate([buffer, chunk])
            while len(buffer) >= FRAME:
                frame, buffer = buffer[:FRAME], buffer[FRAME:]
                loud = np.abs(frame.astype(np.float32)).mean() > 1000
                if loud:
                    if seg_start is None:
                        segment += 1
                        seg_start, frames_in_seg = position, 0
                    last_voiced, quiet = position + FRAME, 0
                position += FRAME
                if seg_start is None:
                    continue
                frames_in_seg += 1
                quiet = 0 if loud else quiet + 1
                if quiet >= 5:
                    await final()
                elif frames_in_seg % 3 == 0:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "partial",
                                "segment": segment,
                                "start": seg_start / SR,
                                "end": position / SR,
                                "text": "你",
                                "stable": "",
                            }
                        )
                    )


@pytest.fixture
async def fake_server():
    from websockets.asyncio.server import serve

    fake = FakeServer()
    async with serve(fake.handler, "127.0.0.1", 0, process_request=fake.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}/v1/stream"
        yield fake


def write_clips(tmp_path):
    t = np.arange(SR * 3) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(tmp_path / "long.wav", tone[: int(2.6 * SR)], SR, subtype="PCM_16")
    soundfile.write(tmp_path / "short.wav", tone[: int(0.8 * SR)], SR, subtype="PCM_16")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"audio": "long.wav", "text": "你好", "lang": "zh"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"audio": "short.wav", "text": "你好嗎", "lang": "zh"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    return manifest


def parse(argv):
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    return parser.parse_args(argv)


async def test_end_to_end_against_fake_server(fake_server, tmp_path, capsys):
    manifest = write_clips(tmp_path)
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    args = parse(
        [
            str(manifest),
            "--url",
            fake_server.url,
            "--speed",
            "20",
            "--gap",
            "0.5",
            "--concurrency",
            "2",
            "--stagger",
            "0.05",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--no-progress",
        ]
    )
    code = await asyncio.to_thread(replay.run_replay, args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "checks: all passed" in printed and "server RTF 0.150" in printed

    report = json.loads(out_json.read_text(encoding="utf-8"))
    summary = report["summary"]
    assert summary["streams"] == 2 and summary["counts"]["finals"] == 4  # one final per clip per stream
    assert summary["accuracy"]["cer_zh_mix"]["errors"] == 2  # 嗎 missing in both streams
    assert summary["accuracy"]["cer_zh_mix"]["ref_tokens"] == 10
    assert [c["finals"] for c in report["per_clip"]] == [[1, 1], [1, 1]]
    assert report["per_clip"][0]["error_rate"] == 0.0
    assert summary["server_rtf"]["rtf"] == pytest.approx(0.15)
    assert summary["final_latency"]["n"] == 4 and summary["partial_lag"]["n"] > 0
    assert summary["partial_gap"]["n"] > 0  # the 2.6 s clip is one long segment
    assert summary["partial_gap_audio_max"] == pytest.approx(0.12)  # every 3rd 40 ms frame
    # final latency includes the 5-frame hangover: 0.2 s of audio, i.e. 0.01 s at speed 20, plus slack
    assert 0.0 < summary["final_latency"]["max"] < 0.5

    for stream in report["streams"]:
        sends = np.array(stream["frame_send_times"], float)
        sched = np.array(stream["frame_scheduled"], float)
        assert not np.isnan(sends).any() and np.all(np.diff(sends) >= 0)
        assert np.diff(sched) == pytest.approx(np.full(len(sched) - 1, 0.04 / 20), abs=1e-6)
        assert np.max(sends - sched) < 0.25  # kept to the schedule
        assert stream["t_stop"] >= sends[-1] and stream["t_end"] >= stream["t_stop"]
        types = [e["event"]["type"] for e in stream["events"]]
        assert types[0] == "ready" and types[-1] == "end"
        finals = [e for e in stream["events"] if e["event"]["type"] == "final"]
        assert [f["clip"] for f in finals] == [0, 1]
        assert all(f["latency"] > 0 for f in finals)
    assert stream["t_first_frame"] - report["streams"][0]["t_first_frame"] >= 0.025  # staggered by 0.05 s
    assert out_png.stat().st_size > 10_000


async def test_plain_wav_inputs_and_quiet(fake_server, tmp_path, capsys):
    write_clips(tmp_path)
    args = parse(
        [
            str(tmp_path / "short.wav"),
            "--url",
            fake_server.url,
            "--speed",
            "20",
            "--gap",
            "0.3",
            "--frame-ms",
            "20",
            "--no-progress",
            "--quiet",
        ]
    )
    code = await asyncio.to_thread(replay.run_replay, args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "checks ok" in out and "CER" not in out


def test_unreachable_server_and_bad_arguments(tmp_path, capsys):
    write_clips(tmp_path)
    wav = str(tmp_path / "short.wav")
    assert replay.run_replay(parse([wav, "--url", "ws://127.0.0.1:9/v1/stream", "--no-progress"])) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert replay.run_replay(parse([wav, "--frame-ms", "10"])) == 2
    assert replay.run_replay(parse([str(tmp_path / "missing.wav")])) == 2
    assert replay.run_replay(parse([wav, "--url", "http://x/"])) == 2


async def test_server_error_mid_stream(fake_server, tmp_path, capsys):
    manifest = write_clips(tmp_path)
    fake_server.fail_after_frames = 20
    out_json = tmp_path / "out.json"
    args = parse([str(manifest), "--url", fake_server.url, "--speed", "20", "--no-progress", "--json", str(out_json)])
    code = await asyncio.to_thread(replay.run_replay, args)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: the server closed the connection before all audio was sent (close code 1011: internal)" in out
    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["summary"]["counts"]["errors"] == 1
    assert not report["summary"]["checks"]["all_streams_completed"]
    assert report["streams"][0]["close_code"] == 1011


async def test_each_clip_streams_in_its_own_language(tiny_engine, tmp_path):
    """Without --language, zh and mix clips stream in zh sessions and en clips in an en session (the
    real server's ready events confirm it); --language en puts every clip in one en session."""
    from streaming.server.app import Server, ServerConfig

    write_clips(tmp_path)
    manifest = tmp_path / "languages.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(entry) + "\n"
            for entry in (
                {"audio": "long.wav", "text": "你好", "lang": "zh"},
                {"audio": "short.wav", "text": "hello", "lang": "en"},
                {"audio": "short.wav", "text": "你好 offer", "lang": "mix"},
            )
        ),
        encoding="utf-8",
    )
    out = tmp_path / "report.json"
    async with Server(ServerConfig(port=0), engine=tiny_engine) as server:
        common = [
            "--url",
            f"ws://127.0.0.1:{server.port}/v1/stream",
            "--speed",
            "4",
            "--gap",
            "0.3",
            "--no-progress",
            "--json",
            str(out),
        ]
        await asyncio.to_thread(replay.run_replay, parse([str(manifest), *common]))
        groups = json.loads(out.read_text(encoding="utf-8"))["groups"]
        assert [g["config"]["language"] for g in groups] == ["zh", "en"]
        assert [[s["language"] for s in g["config"]["sessions"]] for g in groups] == [["zh"], ["en"]]
        assert [[c["lang"] for c in g["clips"]] for g in groups] == [["zh", "mix"], ["en"]]

        await asyncio.to_thread(replay.run_replay, parse([str(manifest), *common, "--language", "en"]))
        report = json.loads(out.read_text(encoding="utf-8"))
        assert report["config"]["language"] == "en" and report["config"]["sessions"][0]["language"] == "en"
        assert len(report["clips"]) == 3


def test_histogram_quantiles_between_two_readings():
    def reading(counts: dict[str, int]) -> dict[str, float]:
        lines = [f'breeze_final_engine_seconds_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
        return parse_prometheus("\n".join(lines))

    before = reading({"0.1": 5, "0.2": 5, "0.5": 5, "+Inf": 5})
    # ten new observations: 4 under 0.1 s, 4 in (0.1, 0.2], 2 in (0.2, 0.5]
    after = reading({"0.1": 9, "0.2": 13, "0.5": 15, "+Inf": 15})
    assert before["breeze_final_engine_seconds_bucket"] == 20  # summed over label sets, as before
    assert analysis.histogram_quantile(before, after, "breeze_final_engine_seconds", 0.5) == approx(0.125)
    assert analysis.histogram_quantile(before, after, "breeze_final_engine_seconds", 0.95) == approx(0.425)
    assert analysis.histogram_quantile(before, before, "breeze_final_engine_seconds", 0.5) is None
    # an observation past the last finite bound answers that bound
    later = reading({"0.1": 9, "0.2": 13, "0.5": 15, "+Inf": 25})
    assert analysis.histogram_quantile(after, later, "breeze_final_engine_seconds", 0.5) == 0.5
