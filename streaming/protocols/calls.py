"""The transcripts of Twilio calls (streaming.protocols.twilio), by callSid, out of band: Twilio ignores
what the server sends back, so `CallHub` fans each call's events out to the subscribers of
`/v1/calls/{callSid}`, the webhook (streaming.protocols.webhook) and the call log (JSON lines per call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..audio.segmenter import SegmenterConfig
from .webhook import WebhookSender

log = logging.getLogger(__name__)

PHONE_SEGMENTER = SegmenterConfig(pre_roll_ms=450, end_padding_ms=300)
"""VAD and segment settings for 8 kHz phone audio (CallConfig.segmenter). Band-limited mu-law audio
loses the high-frequency energy of onsets and word-final fricatives, so webrtcvad finds speech
later and loses it sooner: a longer pre-roll and end padding keep those sounds. On the dev set sent
as 8 kHz mu-law calls (bench/protocol_cer.py, whisper-base) zh CER went from 15.8% with the
native settings to 14.8% (16 kHz native endpoint: 15.1%); webrtcvad mode 1 alone gave 14.9% but
15.6% with the longer padding, and mode 3 17.2%; a 600 ms hangover changed nothing but latency."""


@dataclass(frozen=True)
class CallConfig:
    webhook: str | None = None
    """URL that gets each final (and call_end) as a JSON POST; None: off."""
    log_dir: Path | None = None
    """Directory of one JSONL transcript per call; None: off."""
    segmenter: SegmenterConfig = PHONE_SEGMENTER
    retention: float = 300.0
    """Seconds an ended call's transcript stays available to new subscribers."""
    webhook_retries: int = 5
    webhook_backoff: float = 0.5
    """Seconds before the first retry; doubles with each retry (at most 30 s)."""
    webhook_timeout: float = 10.0
    webhook_queue: int = 10000
    """Posts waiting at most; past that the oldest is dropped (and logged)."""


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class _Call:
    sid: str
    streams: set[str] = field(default_factory=set)
    history: list[dict[str, Any]] = field(
        default_factory=list
    )  # call_start, final, dtmf and call_end events, for late subscribers
    subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict[str, Any])  # streamSid -> customParameters
    ended: float | None = None  # monotonic time of call_end

    @property
    def status(self) -> str:
        return "ended" if self.ended is not None else "active" if self.streams else "waiting"


class CallHub:
    """Calls by callSid: who listens, what was said; fans events out to subscribers, webhook and log."""

    def __init__(self, config: CallConfig) -> None:
        self.config = config
        self.calls: dict[str, _Call] = {}
        self.webhook = (
            WebhookSender(
                config.webhook,
                config.webhook_retries,
                config.webhook_backoff,
                config.webhook_timeout,
                config.webhook_queue,
            )
            if config.webhook
            else None
        )
        if config.log_dir is not None:
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)

    def _call(self, sid: str) -> _Call:
        self._prune()
        call = self.calls.get(sid)
        if call is None:
            call = self.calls[sid] = _Call(sid)
        return call

    def _prune(self) -> None:
        now = time.monotonic()
        for sid in [
            s
            for s, c in self.calls.items()
            if c.ended is not None and now - c.ended > self.config.retention and not c.subscribers
        ]:
            del self.calls[sid]

    def stream_started(self, call_sid: str, stream_sid: str, info: dict[str, Any]) -> None:
        call = self._call(call_sid)
        if call.ended is not None:  # a new stream on a call that had ended: it goes on
            call.ended = None
        call.streams.add(stream_sid)
        call.parameters[stream_sid] = info.get("custom_parameters", {})
        self._publish(call, {"type": "call_start", "call_sid": call_sid, "stream_sid": stream_sid, **info}, keep=True)

    def publish(self, call_sid: str, event: dict[str, Any]) -> None:
        """A partial, final or dtmf event of a stream of this call."""
        call = self._call(call_sid)
        kind = event["type"]
        self._publish(call, event, keep=kind in ("final", "dtmf"))
        if kind == "final" and self.webhook is not None:
            self.webhook.post({**event, "custom_parameters": call.parameters.get(str(event.get("stream_sid")), {})})

    def stream_ended(self, call_sid: str, stream_sid: str) -> None:
        call = self._call(call_sid)
        call.streams.discard(stream_sid)
        if call.streams or call.ended is not None:
            return
        call.ended = time.monotonic()
        event = {"type": "call_end", "call_sid": call_sid}
        self._publish(call, event, keep=True)
        if self.webhook is not None:
            self.webhook.post(event)

    def _publish(self, call: _Call, event: dict[str, Any], keep: bool) -> None:
        if keep:
            call.history.append(event)
            self._log(call.sid, event)
        for queue in call.subscribers:
            queue.put_nowait(event)

    def _log(self, call_sid: str, event: dict[str, Any]) -> None:
        if self.config.log_dir is None:
            return
        path = Path(self.config.log_dir) / f"{_SAFE.sub('_', call_sid)[:128]}.jsonl"
        line = json.dumps(
            {**event, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}, ensure_ascii=False
        )
        try:
            with path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as exc:
            log.error("call log %s: %s", path, exc)

    def subscribe(self, call_sid: str) -> tuple[asyncio.Queue[dict[str, Any]], str, list[dict[str, Any]]]:
        """A queue of the call's events from now on, its status, and what was said so far."""
        call = self._call(call_sid)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        call.subscribers.add(queue)
        return queue, call.status, list(call.history)

    def unsubscribe(self, call_sid: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        call = self.calls.get(call_sid)
        if call is not None:
            call.subscribers.discard(queue)
            if call.status == "waiting" and not call.subscribers and not call.history:
                del self.calls[call_sid]

    def status(self, call_sid: str) -> str:
        call = self.calls.get(call_sid)
        return call.status if call is not None else "waiting"

    async def aclose(self, timeout: float = 10.0) -> None:
        if self.webhook is not None:
            await self.webhook.aclose(timeout)
