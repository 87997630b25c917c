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
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from engines.whisper.decoding import DecodingOptions

from ..audio.codecs import AudioDecoder
from ..audio.hypothesis_text import check_prompt
from ..audio.transcriber import Event, Failure, Final, Partial, StreamingTranscriber
from .base import WHISPER_LANGUAGES, Complaints, ProtocolSession, SessionContext
from .native import segment_event

log = logging.getLogger(__name__)

CALLS_PREFIX = "/v1/calls/"
MEDIA_ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
SUBSCRIBER_BACKLOG = 10000  # events queued for one subscriber before it is dropped as too slow


# --- the Twilio side --------------------------------------------------------------------------------


@dataclass
class _Track:
    name: str
    decoder: AudioDecoder
    transcriber: StreamingTranscriber


class TwilioSession(ProtocolSession):
    """One Media Streams connection: one stream of one call, with one transcriber per track."""

    label = "twilio"
    reads_after_finish = True  # media after stop is reported, not silently dropped

    def __init__(self, connection: ServerConnection, context: SessionContext) -> None:
        super().__init__(connection, context, connection.id.hex[:8], context.config.max_send_queue)
        self._hub = context.calls
        self._complain = Complaints(log, self.name)
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self._encoding = "mulaw"
        self._rate = 8000
        self._language: str | None = None
        self._prompt = ""
        self._tracks: dict[str, _Track] = {}
        self._sequence = -1
        self._stopped = False
        self._unsupported = False

    def _client_closed(self, exc: ConnectionClosed) -> None:
        if not self._stopped and self.call_sid is not None:
            log.info("%s: closed without stop (%s); flushing call %s", self.name, exc, self.call_sid)

    def _internal_error(self) -> None:
        """Twilio reads nothing the server sends: the log (streaming.protocols.base) is all."""

    async def _teardown(self) -> None:
        await self._finish(self._flush)  # a stream whose socket closed without stop is flushed all the same
        self._complain.summary()

    async def _drain(self) -> None:
        await self._finish(self._flush)

    async def _flush(self) -> None:
        """Flushes every track and ends the stream on the hub (stop, close or shutdown, once)."""
        if self.call_sid is None or self.stream_sid is None:
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
            self.name,
            self.call_sid,
            self.stream_sid,
            seconds,
        )

    async def _on_idle(self) -> bool:
        if self.call_sid is None or self._stopped:
            return False
        log.info(
            "%s: no messages for %g s; ending call %s stream %s",
            self.name,
            self.config.idle_timeout,
            self.call_sid,
            self.stream_sid,
        )
        self._stopped = True
        await self._finish(self._flush)
        self._out.close(CloseCode.NORMAL_CLOSURE, "idle timeout")
        return True

    async def _on_message(self, message: str | bytes) -> bool:
        if isinstance(message, bytes):
            self._complain("binary frame", f"{len(message)} bytes; Media Streams sends JSON text frames")
            return False
        if len(message) > self.config.max_frame_bytes:
            self._complain("oversized message", f"{len(message)} bytes, over {self.config.max_frame_bytes}")
            return False
        try:
            event = json.loads(message)
        except ValueError as exc:
            self._complain("invalid JSON", f"{exc}: {message[:60]!r}")
            return False
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            self._complain("message without an event", f"{message[:60]!r}")
            return False
        await self._dispatch(event)
        for track in list(self._tracks.values()):
            await track.transcriber.room()  # the engine is far behind: stop reading until it catches up
        return False

    async def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "media":
            self._media(event)
        elif kind == "start":
            self._start(event)
        elif kind == "connected":
            log.info("%s: connected (protocol %s, version %s)", self.name, event.get("protocol"), event.get("version"))
        elif kind == "stop":
            if self.call_sid is None:
                self._complain("stop before start", json.dumps(event)[:120])
            elif not self._stopped:
                self._stopped = True
                await self._finish(self._flush)
            else:
                self._complain("second stop", json.dumps(event)[:120])
        elif kind == "dtmf":
            dtmf = _object(event.get("dtmf"))
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

    def _start(self, event: dict[str, Any]) -> None:
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
        media = _object(start.get("mediaFormat"))
        encoding = MEDIA_ENCODINGS.get(media.get("encoding", "audio/x-mulaw"))
        rate, channels = media.get("sampleRate", 8000), media.get("channels", 1)
        try:
            if encoding is None:
                raise ValueError(f"encoding {media.get('encoding')!r} (use {', '.join(MEDIA_ENCODINGS)})")
            AudioDecoder(encoding, rate, channels)
        except ValueError as exc:
            log.error(
                "%s: call %s stream %s has an unsupported mediaFormat, %s: it will not be transcribed",
                self.name,
                call_sid,
                stream_sid,
                exc,
            )
            self._unsupported = True
        parameters = _object(start.get("customParameters"))
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
            self.name,
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

    def _media(self, event: dict[str, Any]) -> None:
        if self.call_sid is None:
            self._complain("media before start", "no stream is set up yet")
            return
        if self._stopped:
            self._complain("media after stop", f"call {self.call_sid}")
            return
        if self._finishing is not None:
            return  # the server is shutting down: the stream was flushed
        media = _object(event.get("media"))
        payload = media.get("payload")
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
            config = replace(self.config.transcriber, segmenter=self._hub.config.segmenter)
            transcriber = StreamingTranscriber(
                self._engine,
                DecodingOptions(language=self._language, prompt=self._prompt),
                partial(self._on_event, name),
                config=config,
                metrics=self._metrics,
            )
            track = self._tracks[name] = _Track(name, AudioDecoder(self._encoding, self._rate), transcriber)
        return track

    def _on_event(self, track: str, event: Event) -> None:
        call_sid = self.call_sid
        assert call_sid is not None  # tracks start with the stream
        ids = {"track": track, "call_sid": self.call_sid, "stream_sid": self.stream_sid}
        if isinstance(event, Partial):
            self._hub.publish(call_sid, {**segment_event(event), **ids})
        elif isinstance(event, Final):
            self._hub.publish(call_sid, {**segment_event(event), **ids})
        elif isinstance(event, Failure):
            self._metrics.errors.labels("internal").inc()
            log.error(
                "%s: transcription of call %s track %s failed; the track is no longer transcribed",
                self.name,
                self.call_sid,
                track,
            )
            self._hub.publish(
                call_sid,
                {
                    "type": "error",
                    "code": "internal",
                    "message": "transcription of this track failed on the server (the failure is logged)",
                    **ids,
                },
            )


def _object(value: object) -> dict[str, Any]:
    """A JSON object of Twilio's, or {} where the field is missing or of another type."""
    return value if isinstance(value, dict) else {}


def _track_name(value: object) -> str:
    name = value if isinstance(value, str) and value else "inbound"
    return name.removesuffix("_track")[:32]


# --- subscribers: /v1/calls/{callSid} ---------------------------------------------------------------


class CallSubscriber(ProtocolSession):
    """A server-to-client feed of one call's transcript; client messages are ignored."""

    label = "call subscriber"

    def __init__(self, connection: ServerConnection, context: SessionContext) -> None:
        super().__init__(connection, context, "", None)
        path = urlsplit(self.request.path).path
        self.id = call_sid = unquote(path[len(CALLS_PREFIX) :]) if path.startswith(CALLS_PREFIX) else ""
        self._hub = context.calls
        self.call_sid = call_sid
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._forwarder: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        if not self.call_sid or "/" in self.call_sid:
            message = "subscribe at /v1/calls/{callSid}, with the callSid of the Twilio call (for example /v1/calls/CA0123...)"
            log.warning("call subscriber: bad path %r", self.request.path)
            self._error("bad_request", message, CloseCode.POLICY_VIOLATION)
            return
        self._queue, status, history = self._hub.subscribe(self.call_sid)
        log.info("call subscriber from %s: call %s (%s)", self._ws.remote_address, self.call_sid, status)
        self._out.send({"type": "subscribed", "call_sid": self.call_sid, "status": status})
        for event in history:
            self._queue.put_nowait(event)  # what was said so far, before anything newer
        self._forwarder = asyncio.get_running_loop().create_task(self._forward())
        await self._receive_loop()

    def _idle_timeout(self) -> None:
        return None  # a subscriber only listens

    async def _on_message(self, message: str | bytes) -> bool:
        return False  # server-to-client: client messages are ignored

    def _client_closed(self, exc: ConnectionClosed) -> None:
        pass  # how a subscription ends

    def _error_message(self, code: str, message: str) -> dict[str, Any]:
        return {"type": "error", "code": code, "message": message}

    async def _teardown(self) -> None:
        if self._queue is not None:
            self._hub.unsubscribe(self.call_sid, self._queue)
        if self._forwarder is not None:
            self._forwarder.cancel()
            await asyncio.gather(self._forwarder, return_exceptions=True)

    async def _forward(self) -> None:
        queue = self._queue
        assert queue is not None  # subscribed before forwarding
        while True:
            event = await queue.get()
            if queue.qsize() > SUBSCRIBER_BACKLOG or self._out.backlog > SUBSCRIBER_BACKLOG:
                log.warning(
                    "call subscriber %s: too slow (%d events waiting); disconnecting it",
                    self.call_sid,
                    queue.qsize(),
                )
                self._error("overloaded", "this subscriber fell too far behind", CloseCode.TRY_AGAIN_LATER)
                return
            self._out.send(event)
            if event["type"] == "call_end" and self._hub.status(self.call_sid) == "ended":
                self._out.close(CloseCode.NORMAL_CLOSURE, "call ended")
                return

    async def _drain(self) -> None:
        """Server stopping: the call's own streams flush first; wait for its end, then go away."""
        if self._forwarder is not None and self._hub.status(self.call_sid) == "active":
            await asyncio.wait({self._forwarder}, timeout=25)
