"""`breeze-stream bench-readme`: the live and memory parts against the real default server (the offline
part needs faster-whisper, a [bench] extra, and runs in the README's own measurement)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hardening_helpers import REPO

SENTENCES = {"one": "今天天氣很好，我們去公園散步吧。", "two": "請問火車站怎麼走？"}


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs espeak-ng for Mandarin speech (.ci/run installs it)"
)
def test_live_and_memory_figures(tmp_path: Path):
    """Two Mandarin sentences from espeak-ng, as a folder with their transcripts."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, text in SENTENCES.items():
        subprocess.run(
            ["espeak-ng", "-v", "cmn", "-w", str(folder / f"{name}.wav"), text], check=True, capture_output=True
        )
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "readme.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "breeze_stream",
            "bench-readme",
            str(folder),
            "--parts",
            "replay,memory",
            "--memory-streams",
            "2",
            "--memory-seconds",
            "3",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["machine_before"]["cores"] >= 1 and len(report["machine_after"]["load_average"]) == 3
    for key, streams in (("replay_1", 1), ("replay_3", 3)):
        figures = report[key]
        assert figures["streams"] == streams and figures["clip_plays"] == 2 * streams
        latency = figures["final_latency"]
        assert latency["n"] >= 1 and 0 < latency["p50"] <= latency["p95"] < 30  # the hangover at least, never negative
    memory = report["memory"]
    assert memory["completed_streams"] == 2
    assert 100 < memory["rss_before_mib"] <= memory["rss_peak_mib"]  # whisper-base alone is over 100 MiB
    assert "load average" in result.stdout and "server memory (VmRSS), 2 streams" in result.stdout
