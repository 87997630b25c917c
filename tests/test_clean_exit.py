"""Processes end without soxr's nanobind reference-leak report on stderr.

soxr's extension prints "nanobind: leaked N instances" when a resampler is still alive while the
interpreter tears the module down: a session still open at exit (a drain cut short, a task the loop
abandoned) holds one. streaming.audio.codecs frees every live decoder's resampler at exit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import soxr
from hardening_helpers import REPO
from websockets.asyncio.client import connect

from bench.cli_server import CliServer
from bench.clips import pcm16, phrases
from bench.tiny import save_tiny_model


def test_decoder_alive_at_exit_is_released():
    """A decoder that a daemon thread still holds when the interpreter exits: the worst case, made certain."""
    code = (
        "import threading, time\n"
        "from streaming.audio.codecs import AudioDecoder\n"
        "def hold():\n"
        "    decoder = AudioDecoder('pcm_s16le', 8000)\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=hold, daemon=True).start()\n"
        "time.sleep(0.5)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nanobind" not in result.stderr and "leaked" not in result.stderr, result.stderr


async def test_server_exits_without_leak_reports(tmp_path: Path):
    """The CLI server with resampling sessions open (native 8 kHz and a Twilio call), stopped by SIGINT."""
    server = CliServer(
        "--model", str(save_tiny_model(tmp_path / "tiny.pt")), "--device", "cpu", "--drain-timeout", "0.5"
    )
    try:
        await asyncio.to_thread(server.start, 60)
        audio = soxr.resample(phrases(3), 16000, 8000)
        native = await connect(f"ws://127.0.0.1:{server.port}/v1/stream")
        await native.send(json.dumps({"type": "start", "sample_rate": 8000}))
        assert json.loads(await native.recv())["type"] == "ready"
        await native.send(pcm16(audio))
        call = await connect(f"ws://127.0.0.1:{server.port}/v1/twilio")
        await call.send(
            json.dumps(
                {
                    "event": "start",
                    "streamSid": "MZ1",
                    "start": {
                        "callSid": "CA1",
                        "streamSid": "MZ1",
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
                    },
                }
            )
        )
        for _ in range(50):
            payload = np.full(160, 0xFF, np.uint8).tobytes()  # mu-law silence, 20 ms
            await call.send(
                json.dumps(
                    {
                        "event": "media",
                        "streamSid": "MZ1",
                        "media": {"track": "inbound", "payload": base64.b64encode(payload).decode()},
                    }
                )
            )
        await asyncio.sleep(1.0)
        server.signal(signal.SIGINT)
        code = await asyncio.to_thread(server.wait, 30)
        await native.close()
        await call.close()
    finally:
        server.kill()
    assert code == 0, server.output()
    assert "nanobind" not in server.output() and "leaked" not in server.output(), server.output()
