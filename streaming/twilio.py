"""Twilio Media Streams at `ws://HOST:PORT/v1/twilio`, and the call transcripts they produce.

Twilio dials the server (TwiML `<Start><Stream url="wss://HOST/v1/twilio" track="both_tracks"/>`)
and sends text frames: `connected`, one `start` (callSid, streamSid, tracks, customParameters,
mediaFormat audio/x-mulaw 8000 Hz mono), `media` (base64 mu-law, 20 ms, one message per track),
`dtmf`, `mark`, and `stop`. Each track (inbound: the caller, outbound: the agent or bot) is its own
transcription stream, keyed by callSid, streamSid and track, decoded from mu-law (or A-law), resampled
to 16 kHz and segmented with VAD settings for phone audio (`PHONE_SEGMENTER`). A custom parameter
`language` (zh, en, auto or any Whisper code) overrides the server's default language; a custom
parameter `prompt` (TwiML `<Parameter name="prompt" value="..."/>` inside `<Stream>`) gives the
names and terms to expect on this call (the decoder's previous-text prompt; default `serve
--prompt`).

Twilio ignores what the server sends back, so transcripts go out of band (`CallHub`):

- to subscribers of `ws://HOST:PORT/v1/calls/{callSid}`: `subscribed`, then (replayed for late
  subscribers) `call_start` per stream with its tracks and customParameters, the native `partial`
  and `final` events with `track`, `call_sid` and `stream_sid` added, `dtmf`, and `call_end` when
  every stream of the call has stopped and its finals are out; then the server closes (1000).
  A subscriber may connect before the call starts; ended calls stay available for
  `CallConfig.retention` seconds;
- with `--call-webhook URL`, each final (with the stream's customParameters) and the `call_end` as
  a JSON POST, from a queue that never blocks audio, retried with exponential backoff on network
  errors, 408, 429 and 5xx, in order;
- with `--call-log DIR`, `call_start`, each final and `call_end` appended as JSON lines to
  `DIR/{callSid}.jsonl`.

Bad input (invalid JSON, unknown events, malformed base64, media before start or after stop,
a second start, out-of-order sequence numbers, unsupported media formats) is logged (the first
few of each kind per connection, then counted) and ignored; the connection stays up, and audio
already accepted is transcribed. A stream whose socket closes without `stop` is flushed all
the same, and so is every stream at server shutdown (then closed with 1001).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.whisper.decoding import DecodingOptions

from .adapters import WHISPER_LANGUAGES, Complaints, Outbox
from .codecs import AudioDecoder
from .segmenter import SegmenterConfig
from .transcriber import Event, Failure, Final, Partial, StreamingTranscriber, check_prompt

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

CALLS_PREFIX = "/v1/calls/"
MEDIA_ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
PHONE_SEGMENTER = SegmenterConfig(pre_roll_ms=450, end_padding_ms=300)
"""VAD and segment settings for 8 kHz phone audio (CallConfig.segmenter). Band-limited mu-law audio
loses the high-frequency energy of onsets and word-final fricatives, so webrtcvad finds speech
later and loses it sooner: a longer pre-roll and end padding keep those sounds. On the dev set sent
as 8 kHz mu-law calls (tests/protocol_cer.py, whisper-base) zh CER went from 15.8% with the
native settings to 14.8% (16 kHz native endpoint: 15.1%); webrtcvad mode 1 alone gave 14.9% but
15.6% with the longer padding, and mode 3 17.2%; a 600 ms hangover changed nothing but latency."""
SUBSCRIBER_BACKLOG = 10000  # events queued for one subscriber before it is dropped as too slow


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


# --- out-of-band delivery ---------------------------------------------------------------------------


class WebhookSender:
    """POSTs JSON payloads to one URL in order, from a queue; retries with exponential backoff."""

    def __init__(self, url: str, config: CallConfig) -> None:
        self.url = url
        self.config = config
        self._queue: deque[dict] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    def post(self, payload: dict) -> None:
        """Queues a payload; never waits."""
        if len(self._queue) >= self.config.webhook_queue:
            dropped = self._queue.popleft()
            self.failed += 1
            log.error(
                "call webhook %s: %d posts waiting; dropped the oldest (%s of call %s)",
                self.url,
                len(self._queue) + 1,
                dropped.get("type"),
                dropped.get("call_sid"),
            )
        self._queue.append(payload)
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def aclose(self, timeout: float) -> None:
        """Waits up to `timeout` for the queue to drain, then stops."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._queue:
            log.error("call webhook %s: %d posts not delivered at shutdown", self.url, len(self._queue))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._deliver(self._queue[0])
                if self._queue:
                    self._queue.popleft()

    async def _deliver(self, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        c = self.config
        for attempt in range(c.webhook_retries + 1):
            try:
                status = await asyncio.to_thread(self._post, data)
                why = f"HTTP {status}"
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections are OSErrors
                status, why = None, str(getattr(exc, "reason", exc))
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                return
            if status is not None and status not in (408, 429) and status < 500:
                break  # the receiver refuses it: retrying won't help
            if attempt < c.webhook_retries:
                delay = min(c.webhook_backoff * 2**attempt, 30.0)
                log.warning(
                    "call webhook %s: %s for %s of call %s; retry %d/%d in %.1f s",
                    self.url,
                    why,
                    payload.get("type"),
                    payload.get("call_sid"),
                    attempt + 1,
                    c.webhook_retries,
                    delay,
                )
                await asyncio.sleep(delay)
        self.failed += 1
        log.error(
            "call webhook %s: gave up on %s of call %s (%s)",
            self.url,
            payload.get("type"),
            payload.get("call_sid"),
            why,
        )

    def _post(self, data: bytes) -> int:
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "breeze-stream"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.webhook_timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class _Call:
    sid: str
    streams: set[str] = field(default_factory=set)
    history: list[dict] = field(
        default_factory=list
    )  # call_start, final, dtmf and call_end events, for late subscribers
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    parameters: dict[str, dict] = field(default_factory=dict)  # streamSid -> customParameters
    ended: float | None = None  # monotonic time of call_end

    @property
    def status(self) -> str:
        return "ended" if self.ended is not None else "active" if self.streams else "waiting"


class CallHub:
    """Calls by callSid: who listens, what was said; fans events out to subscribers, webhook and log."""

    def __init__(self, config: CallConfig) -> None:
        self.config = config
        self.calls: dict[str, _Call] = {}
        self.webhook = WebhookSender(config.webhook, config) if config.webhook else None
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

    def stream_started(self, call_sid: str, stream_sid: str, info: dict) -> None:
        call = self._call(call_sid)
        if call.ended is not None:  # a new stream on a call that had ended: it goes on
            call.ended = None
        call.streams.add(stream_sid)
        call.parameters[stream_sid] = info.get("custom_parameters", {})
        self._publish(call, {"type": "call_start", "call_sid": call_sid, "stream_sid": stream_sid, **info}, keep=True)

    def publish(self, call_sid: str, event: dict) -> None:
        """A partial, final or dtmf event of a stream of this call."""
        call = self._call(call_sid)
        kind = event["type"]
        self._publish(call, event, keep=kind in ("final", "dtmf"))
        if kind == "final" and self.webhook is not None:
            self.webhook.post({**event, "custom_parameters": call.parameters.get(event.get("stream_sid"), {})})

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

    def _publish(self, call: _Call, event: dict, keep: bool) -> None:
        if keep:
            call.history.append(event)
            self._log(call.sid, event)
        for queue in call.subscribers:
            queue.put_nowait(event)

    def _log(self, call_sid: str, event: dict) -> None:
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

    def subscribe(self, call_sid: str) -> tuple[asyncio.Queue, str, list[dict]]:
        """A queue of the call's events from now on, its status, and what was said so far."""
        call = self._call(call_sid)
        queue: asyncio.Queue = asyncio.Queue()
        call.subscribers.add(queue)
        return queue, call.status, list(call.history)

    def unsubscribe(self, call_sid: str, queue: asyncio.Queue) -> None:
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


# --- the Twilio side --------------------------------------------------------------------------------


def twilio_session(connection: ServerConnection, server: Server) -> TwilioSession:
    return TwilioSession(connection, server)


@dataclass
class _Track:
    name: str
    decoder: AudioDecoder
    transcriber: StreamingTranscriber


class TwilioSession:
    """One Media Streams connection: one stream of one call, with one transcriber per track."""

    def __init__(self, connection: ServerConnection, server: Server) -> None:
        self._ws = connection
        self._engine = server.engine
        self._metrics = server.metrics
        self._hub: CallHub = server.calls
        self.config = server.config.session
        self._calls = server.config.calls
        self._out = Outbox(connection, self.config.max_send_queue)
        self.id = f"twilio {connection.id.hex[:8]}"
        self._complain = Complaints(log, self.id)
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self._encoding = "mulaw"
        self._rate = 8000
        self._language: str | None = None
        self._prompt = ""
        self._tracks: dict[str, _Track] = {}
        self._sequence = -1
        self._stopped = False
        self._ending: asyncio.Future | None = None
        self._unsupported = False

    async def run(self) -> None:
        self._out.start()
        try:
            await self._serve()
        except ConnectionClosed as exc:
            if not self._stopped and self.call_sid is not None:
                log.info("%s: closed without stop (%s); flushing call %s", self.id, exc, self.call_sid)
        except Exception:
            log.exception("%s: internal error", self.id)
        finally:
            await self._end()
            self._complain.summary()
            self._out.close(CloseCode.NORMAL_CLOSURE)
            await self._out.wait()

    async def shutdown(self) -> None:
        await self._end()
        self._out.close(CloseCode.GOING_AWAY, "server shutting down")

    async def _end(self) -> None:
        """Flushes every track and ends the stream on the hub, once (stop, close or shutdown)."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._flush())
        await asyncio.shield(self._ending)

    async def _flush(self) -> None:
        if self.call_sid is None:
            return
        for track in self._tracks.values():
            track.transcriber.feed(track.decoder.flush())
        await asyncio.gather(*(track.transcriber.finish() for track in self._tracks.values()))
        seconds = {name: round(track.transcriber.seconds, 1) for name, track in self._tracks.items()}
        for track in self._tracks.values():
            await track.transcriber.aclose()
        if self._tracks:
            self._metrics.sessions_active.dec()
        self._hub.stream_ended(self.call_sid, self.stream_sid)
        log.info(
            "%s: call %s stream %s ended; seconds of audio by track: %s",
            self.id,
            self.call_sid,
            self.stream_sid,
            seconds,
        )

    async def _serve(self) -> None:
        idle = self.config.idle_timeout or None
        while True:
            try:
                message = await asyncio.wait_for(self._ws.recv(), idle)
            except asyncio.TimeoutError:
                if self.call_sid is not None and not self._stopped:
                    log.info(
                        "%s: no messages for %g s; ending call %s stream %s",
                        self.id,
                        idle,
                        self.call_sid,
                        self.stream_sid,
                    )
                    self._stopped = True
                    await self._end()
                    self._out.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
                    return
                continue
            if isinstance(message, bytes):
                self._complain("binary frame", f"{len(message)} bytes; Media Streams sends JSON text frames")
                continue
            if len(message) > self.config.max_frame_bytes:
                self._complain("oversized message", f"{len(message)} bytes, over {self.config.max_frame_bytes}")
                continue
            try:
                event = json.loads(message)
            except ValueError as exc:
                self._complain("invalid JSON", f"{exc}: {message[:60]!r}")
                continue
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                self._complain("message without an event", f"{message[:60]!r}")
                continue
            await self._dispatch(event)
            for track in list(self._tracks.values()):
                await track.transcriber.room()  # the engine is far behind: stop reading until it catches up

    async def _dispatch(self, event: dict) -> None:
        kind = event["event"]
        if kind == "media":
            self._media(event)
        elif kind == "start":
            self._start(event)
        elif kind == "connected":
            log.info("%s: connected (protocol %s, version %s)", self.id, event.get("protocol"), event.get("version"))
        elif kind == "stop":
            if self.call_sid is None:
                self._complain("stop before start", json.dumps(event)[:120])
            elif not self._stopped:
                self._stopped = True
                await self._end()
            else:
                self._complain("second stop", json.dumps(event)[:120])
        elif kind == "dtmf":
            dtmf = event.get("dtmf") if isinstance(event.get("dtmf"), dict) else {}
            if self.call_sid is not None and not self._stopped and isinstance(dtmf.get("digit"), str):
                self._hub.publish(
                    self.call_sid,
                    {
                        "type": "dtmf",
                        "call_sid": self.call_sid,
                        "stream_sid": self.stream_sid,
                        "track": _track_name(dtmf.get("track", "inbound")),
                        "digit": dtmf["digit"],
                    },
                )
        elif kind == "mark":
            pass  # echoes of marks a bidirectional stream queued: nothing to transcribe
        else:
            self._complain("unknown event", f"{kind!r}")

    def _start(self, event: dict) -> None:
        if self.call_sid is not None:
            self._complain("second start", f"this connection is call {self.call_sid} stream {self.stream_sid}")
            return
        start = event.get("start")
        if not isinstance(start, dict):
            self._complain("start without a start object", json.dumps(event)[:120])
            return
        call_sid, stream_sid = start.get("callSid"), start.get("streamSid", event.get("streamSid"))
        if (
            not isinstance(call_sid, str)
            or not call_sid
            or "/" in call_sid
            or not isinstance(stream_sid, str)
            or not stream_sid
        ):
            self._complain("start without callSid/streamSid", json.dumps(start)[:160])
            return
        media = start.get("mediaFormat") if isinstance(start.get("mediaFormat"), dict) else {}
        encoding = MEDIA_ENCODINGS.get(media.get("encoding", "audio/x-mulaw"))
        rate, channels = media.get("sampleRate", 8000), media.get("channels", 1)
        try:
            if encoding is None:
                raise ValueError(f"encoding {media.get('encoding')!r} (use {', '.join(MEDIA_ENCODINGS)})")
            AudioDecoder(encoding, rate, channels)
        except ValueError as exc:
            log.error(
                "%s: call %s stream %s has an unsupported mediaFormat, %s: it will not be transcribed",
                self.id,
                call_sid,
                stream_sid,
                exc,
            )
            self._unsupported = True
        parameters = start.get("customParameters") if isinstance(start.get("customParameters"), dict) else {}
        language = parameters.get("language", self.config.language)
        if language not in ("auto", "zh", "en") and (
            not isinstance(language, str) or language.lower() not in WHISPER_LANGUAGES
        ):
            self._complain(
                "custom parameter language", f"{language!r} is not a Whisper language; using {self.config.language}"
            )
            language = self.config.language
        try:
            prompt = check_prompt(parameters.get("prompt"), "custom parameter prompt") or self.config.prompt
        except ValueError as exc:
            self._complain("custom parameter prompt", f"{exc}; using the server's")
            prompt = self.config.prompt
        self.call_sid, self.stream_sid = call_sid, stream_sid
        self._prompt = prompt
        self._encoding, self._rate = encoding or "mulaw", rate
        self._language = None if language == "auto" else language.lower()
        tracks = start.get("tracks") if isinstance(start.get("tracks"), list) else ["inbound"]
        self._metrics.sessions.inc()
        log.info(
            "%s: call %s stream %s started, tracks %s, %s, prompt of %d characters",
            self.id,
            call_sid,
            stream_sid,
            tracks,
            media,
            len(prompt),
        )
        self._hub.stream_started(
            call_sid,
            stream_sid,
            {
                "account_sid": start.get("accountSid"),
                "tracks": tracks,
                "custom_parameters": parameters,
                "media_format": media,
            },
        )

    def _media(self, event: dict) -> None:
        if self.call_sid is None:
            self._complain("media before start", "no stream is set up yet")
            return
        if self._stopped:
            self._complain("media after stop", f"call {self.call_sid}")
            return
        if self._ending is not None:
            return  # the server is shutting down: the stream was flushed
        media = event.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._complain("media without a payload", json.dumps(event)[:120])
            return
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            self._complain("malformed base64", f"{exc}")
            return
        sequence = event.get("sequenceNumber")
        if isinstance(sequence, str) and sequence.isdigit():
            if int(sequence) <= self._sequence:
                self._complain("out-of-order message", f"sequenceNumber {sequence} after {self._sequence}")
                return
            self._sequence = int(sequence)
        if self._unsupported:
            return
        track = self._track(_track_name(media.get("track", "inbound")))
        track.transcriber.feed(track.decoder.decode(data))

    def _track(self, name: str) -> _Track:
        track = self._tracks.get(name)
        if track is None:
            if not self._tracks:
                self._metrics.sessions_active.inc()
            config = replace(self.config.transcriber, segmenter=self._calls.segmenter)
            transcriber = StreamingTranscriber(
                self._engine,
                DecodingOptions(language=self._language, prompt=self._prompt),
                lambda event, name=name: self._on_event(name, event),
                config=config,
                metrics=self._metrics,
            )
            track = self._tracks[name] = _Track(name, AudioDecoder(self._encoding, self._rate), transcriber)
        return track

    def _on_event(self, track: str, event: Event) -> None:
        ids = {"track": track, "call_sid": self.call_sid, "stream_sid": self.stream_sid}
        if isinstance(event, Partial):
            self._hub.publish(
                self.call_sid,
                {
                    "type": "partial",
                    "segment": event.segment,
                    "start": round(event.start, 3),
                    "end": round(event.end, 3),
                    "text": event.text,
                    "stable": event.stable,
                    **ids,
                },
            )
        elif isinstance(event, Final):
            self._hub.publish(
                self.call_sid,
                {
                    "type": "final",
                    "segment": event.segment,
                    "start": round(event.start, 3),
                    "end": round(event.end, 3),
                    "text": event.text,
                    **ids,
                },
            )
        elif isinstance(event, Failure):
            self._metrics.errors.labels("internal").inc()
            log.error(
                "%s: transcription of call %s track %s failed; the track is no longer transcribed",
                self.id,
                self.call_sid,
                track,
            )
            self._hub.publish(
                self.call_sid,
                {
                    "type": "error",
                    "code": "internal",
                    "message": "transcription of this track failed on the server (the failure is logged)",
                    **ids,
                },
            )


def _track_name(value: object) -> str:
    name = value if isinstance(value, str) and value else "inbound"
    return name.removesuffix("_track")[:32]


# --- subscribers: /v1/calls/{callSid} ---------------------------------------------------------------


def call_subscriber_session(connection: ServerConnection, server: Server) -> CallSubscriber:
    return CallSubscriber(connection, server)


class CallSubscriber:
    """A server-to-client feed of one call's transcript; client messages are ignored."""

    def __init__(self, connection: ServerConnection, server: Server) -> None:
        self._ws = connection
        self._hub: CallHub = server.calls
        self._metrics = server.metrics
        self._out = Outbox(connection)
        path = urlsplit(connection.request.path).path
        self.call_sid = unquote(path[len(CALLS_PREFIX) :]) if path.startswith(CALLS_PREFIX) else ""
        self._queue: asyncio.Queue | None = None
        self._forwarder: asyncio.Task | None = None

    async def run(self) -> None:
        self._out.start()
        if not self.call_sid or "/" in self.call_sid:
            message = "subscribe at /v1/calls/{callSid}, with the callSid of the Twilio call (for example /v1/calls/CA0123...)"
            log.warning("call subscriber: bad path %r", self._ws.request.path)
            self._metrics.errors.labels("bad_request").inc()
            self._out.send({"type": "error", "code": "bad_request", "message": message})
            self._out.close(CloseCode.POLICY_VIOLATION, "bad_request")
            await self._out.wait()
            return
        self._queue, status, history = self._hub.subscribe(self.call_sid)
        log.info("call subscriber from %s: call %s (%s)", self._ws.remote_address, self.call_sid, status)
        self._out.send({"type": "subscribed", "call_sid": self.call_sid, "status": status})
        for event in history:
            self._queue.put_nowait(event)  # what was said so far, before anything newer
        self._forwarder = asyncio.get_running_loop().create_task(self._forward())
        try:
            async for _ in self._ws:
                pass  # server-to-client: client messages are ignored
        except ConnectionClosed:
            pass
        finally:
            self._hub.unsubscribe(self.call_sid, self._queue)
            self._forwarder.cancel()
            await asyncio.gather(self._forwarder, return_exceptions=True)
            self._out.close(CloseCode.NORMAL_CLOSURE)
            await self._out.wait()

    async def _forward(self) -> None:
        while True:
            event = await self._queue.get()
            if self._queue.qsize() > SUBSCRIBER_BACKLOG or self._out.backlog > SUBSCRIBER_BACKLOG:
                log.warning(
                    "call subscriber %s: too slow (%d events waiting); disconnecting it",
                    self.call_sid,
                    self._queue.qsize(),
                )
                self._metrics.errors.labels("overloaded").inc()
                self._out.send(
                    {"type": "error", "code": "overloaded", "message": "this subscriber fell too far behind"}
                )
                self._out.close(CloseCode.TRY_AGAIN_LATER, "overloaded")
                return
            self._out.send(event)
            if event["type"] == "call_end" and self._hub.status(self.call_sid) == "ended":
                self._out.close(CloseCode.NORMAL_CLOSURE, "call ended")
                return

    async def shutdown(self) -> None:
        """Server stopping: the call's own streams flush first; wait for its end, then go away."""
        if self._forwarder is not None and self._hub.status(self.call_sid) == "active":
            await asyncio.wait({self._forwarder}, timeout=25)
        self._out.close(CloseCode.GOING_AWAY, "server shutting down")
