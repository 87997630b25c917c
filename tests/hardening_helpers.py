"""Helpers of the hardening tests, the fuzz tests and the load script (tests/load_soak.py).

- `tiny_pt(path)`: conftest's rigged tiny Whisper (it answers TINY_TEXT for any segment) as an
  OpenAI-format .pt, so that `breeze-stream serve --model tiny.pt` runs it in a subprocess;
- `CliServer`: the real command-line server as a subprocess (port from its log line);
- `FakeConnection`: a ServerConnection stand-in for driving sessions in-process;
- audio and client helpers shared by the tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

REPO = Path(__file__).resolve().parents[1]
RATE = 16000


# --- the tiny rigged model as a file ---------------------------------------------------------------


def tiny_pt(path: Path) -> Path:
    """conftest.tiny_model() (it answers TINY_TEXT for any segment) saved as an OpenAI-format .pt."""
    from conftest import TINY_DIMS, tiny_model

    torch.save({"dims": asdict(TINY_DIMS), "model_state_dict": tiny_model().state_dict()}, path)
    return path


# --- audio ---------------------------------------------------------------------------------------


def voiced(seconds: float, f0: float = 140.0, peak: float = 0.3) -> np.ndarray:
    """A harmonic-rich, syllable-modulated buzz that webrtcvad takes for speech (tests/test_server.py's)."""
    t = np.arange(round(seconds * RATE)) / RATE
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / RATE
    x = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (peak * x / np.abs(x).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def phrases(n: int, speech: float = 1.2, pause: float = 0.8) -> np.ndarray:
    """n phrases of voiced buzz between pauses: n segments, so n finals from the tiny model."""
    parts = [silence(0.3)]
    for i in range(n):
        parts += [voiced(speech, f0=120.0 + 10 * (i % 5)), silence(pause)]
    return np.concatenate(parts)


# --- in-process connections ----------------------------------------------------------------------


class FakeConnection:
    """What sessions use of a ServerConnection: recv (the given messages, then the client's close),
    send, close, transport.abort, request, remote_address, id."""

    def __init__(
        self,
        messages: list[str | bytes] = (),
        *,
        path: str = "/v1/stream",
        headers: dict | None = None,
        block_send: bool = False,
        end: str = "close",
    ) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        for message in messages:
            self.incoming.put_nowait(message)
        if end == "close":
            self.incoming.put_nowait(None)  # the client goes away after its last message
        self.sent: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.aborted = False
        self._block = asyncio.Event() if block_send else None
        self.remote_address = ("10.0.0.1", 40000)
        self.request = SimpleNamespace(path=path, headers=Headers(headers or {}))
        self.transport = SimpleNamespace(abort=self._abort)
        self.id = SimpleNamespace(hex="0123456789abcdef")

    def _closed(self) -> Exception:
        if self.aborted:
            return ConnectionClosedError(None, None)
        return ConnectionClosedOK(Close(self.close_code or 1000, ""), None)

    def _abort(self) -> None:
        self.aborted = True
        self.incoming.put_nowait(None)
        if self._block is not None:
            self._block.set()

    async def recv(self, decode: bool | None = None) -> str | bytes:
        if self.aborted or self.close_code is not None:
            raise self._closed()
        message = await self.incoming.get()
        if message is None:
            self.incoming.put_nowait(None)
            raise ConnectionClosedOK(Close(1000, ""), None) if not self.aborted else self._closed()
        return message

    async def send(self, message: str | bytes) -> None:
        if self._block is not None:
            await self._block.wait()
        if self.aborted or self.close_code is not None:
            raise self._closed()
        self.sent.append(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is None and not self.aborted:
            self.close_code, self.close_reason = code, reason

    def events(self) -> list[dict]:
        return [json.loads(m) for m in self.sent]


# --- the CLI server as a subprocess --------------------------------------------------------------


class CliServer:
    """`python -m breeze_stream serve ...` in a subprocess; `port` from its 'listening on' log line."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.args = [sys.executable, "-m", "breeze_stream", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.port: int | None = None

    def _read_until(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(self.lines)}")

    def start(self, timeout: float = 120.0) -> CliServer:
        self.port = int(self._read_until(r"listening on \w+://[\d.]+:(\d+)/", timeout).group(1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out or "")
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
