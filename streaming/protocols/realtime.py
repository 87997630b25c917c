"""OpenAI Realtime transcription sessions at `ws://HOST:PORT/v1/realtime`, GA and beta.

The unmodified `openai` SDK connects with `OpenAI(base_url="http://HOST:PORT/v1", api_key=...)`:
GA `client.realtime.connect(extra_query={"intent": "transcription"})` or beta
`client.beta.realtime.connect(model=...)` (which adds `OpenAI-Beta: realtime=v1`). Any query
(`intent`, `model`) and any API key are accepted. The server opens with `session.created` (GA) or
`transcription_session.created` (beta); the client then configures the session:

- GA `session.update` with `session.type = "transcription"` and `audio.input.{format,
  transcription, turn_detection, noise_reduction}`, answered by `session.updated`;
- beta `transcription_session.update` (flat `input_audio_format`, `input_audio_transcription`,
  `turn_detection`), answered by `transcription_session.updated`; a `session.update` in the flat
  shape is taken too. Only the fields present change; `turn_detection: null` means manual commit.

Audio comes as `input_audio_buffer.append` (base64): `audio/pcm` (pcm16 little-endian at 24 kHz;
other rates from 8 to 48 kHz are taken too), `audio/pcmu` / `g711_ulaw`, `audio/pcma` /
`g711_alaw` (8 kHz). It is decoded and resampled to 16 kHz and fed to the same streaming
transcriber as the native protocol.

Items. Each VAD turn (server VAD) or each commit (turn_detection null) is one user item:

- server VAD: `input_audio_buffer.speech_started {item_id, audio_start_ms}` when a segment opens,
  `speech_stopped {item_id, audio_end_ms}`, `input_audio_buffer.committed {item_id,
  previous_item_id}` and `conversation.item.added` (GA) / `conversation.item.created` (beta)
  when it closes; `server_vad` maps `silence_duration_ms` to the silence hangover,
  `prefix_padding_ms` to the pre-roll, `threshold` to the webrtcvad mode (threshold x 4, so 0.5 is
  mode 2); `semantic_vad` maps eagerness to a hangover (low 1200 ms, medium/auto 800, high 500);
- manual (`turn_detection: null`): `input_audio_buffer.commit` closes the item: every speech
  segment since the last commit (webrtcvad still skips silence inside the buffer, so no
  hallucinated text from it) is one item; a commit of less than 100 ms of audio is an error.

Text. `conversation.item.input_audio_transcription.delta` carries only text that will not change
(the stable prefix of the partials, then the rest of the final when it extends what was sent), so
the deltas of an item are append-only; `.completed` carries the authoritative full transcript
(usage in seconds of audio) and is sent once per committed item, in item order, also when the
audio held no speech (empty transcript). GA clients also get `conversation.item.done`. A
connection opened with `?partials=true` also gets the revisable hypothesis as
`x.transcription.partial {item_id, content_index, text, stable}` (unknown types are harmless to
the SDK). If the engine fails, every open item gets `.failed`, then an `error` (server_error),
and the connection closes with 1011.

`input_audio_buffer.clear` drops uncommitted audio (and the open turn's text) and answers
`input_audio_buffer.cleared`. Protocol errors (bad JSON, unknown event types, malformed base64,
audio before the session is set up, bad session fields, an empty commit, binary frames, events
the transcription session does not support) get an OpenAI-style `error` event
`{type: "error", error: {type: "invalid_request_error", code, message, param, event_id}}`, are
logged, and the session goes on; nothing already accepted is lost.

Idle (no event for the idle timeout) closes the open turn under server VAD. On server shutdown
the buffer is committed and transcribed before the close (1001); at the server's maximum session
duration the same, then an `error` (`session_expired`) and a close (1008). A client that
disconnects ends its session at once.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from engines.whisper.decoding import DecodingOptions

from ..audio.codecs import AudioDecoder, AudioFormatError
from ..audio.hypothesis_text import join_text
from ..audio.segmenter import (
    SAMPLE_RATE,
    SegmentClosed,
    SegmentEvent,
    SegmentStarted,
)
from ..audio.transcriber import Event, Failure, Final, Partial, StreamingTranscriber
from ..audio.turns import TurnSegmenter
from .base import ProtocolSession, SessionContext
from .realtime_items import Item, error_body, item_view, new_id, parse_event
from .realtime_settings import (
    ClientError,
    Settings,
    beta_session,
    default_settings,
    ga_session,
    json_object,
    parse_beta,
    parse_ga,
    segmenter_config,
    short_json,
)

log = logging.getLogger(__name__)

MIN_COMMIT_MS = 100  # OpenAI's minimum for input_audio_buffer.commit
SETUP_EXAMPLE = (
    '{"type": "session.update", "session": {"type": "transcription", "audio": {"input": '
    '{"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": {"type": "server_vad"}}}}}'
)
UNSUPPORTED_EVENTS = (
    "response.create",
    "response.cancel",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.truncate",
    "conversation.item.retrieve",
    "output_audio_buffer.clear",
)


class RealtimeSession(ProtocolSession):
    """One `/v1/realtime` connection: a transcription session."""

    label = "realtime"

    def __init__(self, connection: ServerConnection, context: SessionContext) -> None:
        super().__init__(connection, context, new_id("sess"), context.config.max_send_queue)
        self._base = self.config.transcriber.segmenter
        self._beta = "realtime=v1" in self.request.headers.get("OpenAI-Beta", "")
        query = parse_qs(urlsplit(self.request.path).query)
        self._extension_partials = query.get("partials", ["false"])[-1].lower() in ("1", "true", "yes")
        self._settings = default_settings(self.config)
        self._configured = False
        self._segmenter: TurnSegmenter | None = None
        self._buffer_ms = 0.0  # audio appended since the last commit or clear
        self._fed = 0  # 16 kHz samples fed to the transcriber
        self._buffer_start = 0  # where the uncommitted buffer begins, in fed samples
        self._pending: Item | None = None  # the uncommitted item
        self._committed: deque[Item] = deque()  # committed, transcription not completed yet
        self._items: dict[int, Item] = {}  # segment index -> item of uncompleted items
        self._last_item: str | None = None
        self._committing = False
        self._failed = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        self._event("transcription_session.created" if self._beta else "session.created", session=self._view())
        log.info(
            "realtime %s: connected from %s (%s)", self.id, self._ws.remote_address, "beta" if self._beta else "GA"
        )
        await self._receive_loop()

    def _internal_error(self) -> None:
        self._server_error("the server failed on this session; reconnect and start again (the failure is logged)")
        self._out.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _drain(self) -> None:
        """Server stopping: commit the buffer and wait for its transcript (then the close, 1001)."""
        await self._finish(self._flush)

    async def expire(self, seconds: float) -> None:
        """The server's maximum session duration (streaming.server.gate): commit and transcribe the buffer,
        then OpenAI's `session_expired` error and a close (1008)."""
        await self._finish(self._flush)
        message = f"Your session hit the maximum duration of {seconds:g} seconds; connect again to go on."
        self._event("error", error=error_body("invalid_request_error", "session_expired", message))
        self._out.close(CloseCode.POLICY_VIOLATION, "session expired")

    async def _flush(self) -> None:
        if self._transcriber is None or self._failed:
            return
        assert self._decoder is not None
        self._feed(self._decoder.flush())
        self._cut()
        if self._pending is not None and self._pending.segments:
            self._commit_item(self._pending)
        await self._transcriber.finish()

    # --- receiving ----------------------------------------------------------------------------

    async def _on_idle(self) -> bool:
        if (
            self._transcriber is not None
            and self._vad
            and self._segmenter is not None
            and self._segmenter.open is not None
        ):
            log.info("realtime %s: no events for %g s; closing the open turn", self.id, self.config.idle_timeout)
            self._cut()
        return False

    async def _on_message(self, message: str | bytes) -> bool:
        event_id = None
        try:
            event = parse_event(message, self.config.max_frame_bytes)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            self._dispatch(event)
        except ClientError as exc:
            self._client_error(exc, event_id)
        if self._failed:
            return True
        if self._transcriber is not None:
            await self._transcriber.room()  # the engine is far behind: stop reading until it catches up
        return False

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "session.update":
            session = json_object(event.get("session"), "session")
            flat = (
                "type" not in session and "audio" not in session and any(k.startswith("input_audio") for k in session)
            )
            self._configure(
                parse_beta(session, self._settings, self._base)
                if flat
                else parse_ga(session, self._settings, self._base),
                "session.updated",
                beta=flat,
            )
        elif kind == "transcription_session.update":
            self._beta = True
            session = json_object(event.get("session"), "session")
            self._configure(parse_beta(session, self._settings, self._base), "transcription_session.updated", beta=True)
        elif kind == "input_audio_buffer.append":
            self._append(event)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self._clear()
        elif kind in UNSUPPORTED_EVENTS:
            raise ClientError(
                "unsupported_event",
                f"{kind} is not supported: this is a transcription session (it "
                "transcribes input audio and creates no responses)",
                "type",
            )
        else:
            raise ClientError(
                "invalid_event_type",
                f"Invalid value for 'type': {short_json(kind)}. A transcription session "
                "takes session.update, transcription_session.update, input_audio_buffer.append, "
                "input_audio_buffer.commit and input_audio_buffer.clear",
                "type",
            )

    def _configure(self, settings: Settings, reply: str, beta: bool) -> None:
        previous = self._settings
        new_format = (settings.encoding, settings.rate) != (previous.encoding, previous.rate)
        if new_format or self._decoder is None:
            try:
                decoder = AudioDecoder(settings.encoding, settings.rate)
            except AudioFormatError as exc:
                raise ClientError(
                    "invalid_value", str(exc), "session.audio.input.format.rate", metric=exc.code
                ) from None
            if self._decoder is not None:
                self._feed(self._decoder.flush())  # the old format's resampler tail
            self._decoder = decoder
        self._settings = settings
        if not self._configured:
            self._configured = True
            self._metrics.sessions.inc()
            log.info(
                "realtime %s: set up: %s at %d Hz, language %s, %s",
                self.id,
                settings.encoding,
                settings.rate,
                settings.language or "auto",
                (settings.turn_detection or {"type": "manual commit"})["type"],
            )
        if self._transcriber is not None and self._segmenter is not None:
            self._segmenter.reconfigure(segmenter_config(settings.turn_detection, self._base))
            if self._decoding(settings) != self._decoding(previous):  # from the next turn on
                self._transcriber.set_options(self._decoding(settings))
        self._event(
            reply,
            session=beta_session(settings, self.id, self._engine.name)
            if beta
            else ga_session(settings, self.id, self._engine.name),
        )

    def _decoding(self, settings: Settings) -> DecodingOptions:
        """The transcription settings as decoding options: the language, and the prompt (the
        server's `--prompt` where the session set none)."""
        prompt = self.config.prompt if settings.prompt is None else settings.prompt
        return DecodingOptions(language=settings.language, prompt=prompt)

    def _view(self) -> dict[str, Any]:
        return (beta_session if self._beta else ga_session)(self._settings, self.id, self._engine.name)

    @property
    def _vad(self) -> bool:
        return self._settings.turn_detection is not None

    def _append(self, event: dict[str, Any]) -> None:
        if not self._configured:
            raise ClientError(
                "session_not_configured",
                "input_audio_buffer.append before the session was set up; this "
                f"audio was not accepted. First send {SETUP_EXAMPLE} (beta: transcription_session.update)",
            )
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("invalid_type", "Invalid type for 'audio': expected a base64 string", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ClientError(
                "invalid_base64", f"'audio' is not valid base64 ({exc}); this chunk was not accepted", "audio"
            ) from None
        if self._transcriber is None:
            self._start()
        width = 2 if self._settings.encoding == "pcm_s16le" else 1
        self._buffer_ms += 1000 * len(data) / width / self._settings.rate
        assert self._decoder is not None  # set up with the session
        self._feed(self._decoder.decode(data))

    def _start(self) -> None:
        self._segmenter = TurnSegmenter(segmenter_config(self._settings.turn_detection, self._base), self._on_segment)
        self._transcriber = StreamingTranscriber(
            self._engine,
            self._decoding(self._settings),
            self._on_event,
            config=self.config.transcriber,
            metrics=self._metrics,
            segmenter=self._segmenter,
            on_resolved=self._on_resolved,
        )
        self._metrics.sessions_active.inc()

    def _feed(self, audio: np.ndarray) -> None:
        if audio.size and self._transcriber is not None:
            self._fed += audio.size
            self._transcriber.feed(audio)

    def _cut(self) -> None:
        assert self._transcriber is not None  # cuts come after audio
        self._committing = True
        try:
            self._transcriber.cut()
        finally:
            self._committing = False

    def _commit(self) -> None:
        if self._buffer_ms < MIN_COMMIT_MS and (self._pending is None or not self._pending.segments):
            raise ClientError(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms "
                f"of audio, but the buffer only has {self._buffer_ms:.2f} ms of audio",
            )
        assert self._decoder is not None  # a commit of audio comes after the setup
        self._feed(self._decoder.flush())
        self._cut()  # under server VAD an open turn commits itself here
        if self._pending is not None or self._buffer_ms >= MIN_COMMIT_MS:
            self._commit_item(self._pending or Item(new_id("item"), self._buffer_start))

    def _clear(self) -> None:
        if self._transcriber is not None and self._segmenter is not None:
            self._decoder = AudioDecoder(self._settings.encoding, self._settings.rate)  # drop the resampler's tail
            self._segmenter.clear()
            if self._pending is not None:  # its segments' events are dropped from now on
                for segment in self._pending.segments:
                    self._items.pop(segment, None)
                self._pending = None
        self._buffer_ms = 0.0
        self._buffer_start = self._fed
        self._event("input_audio_buffer.cleared")

    # --- segments, items and text -------------------------------------------------------------

    def _on_segment(self, event: SegmentEvent) -> None:
        """The segmenter's events, as the transcriber gets them (synchronously, in stream order)."""
        if isinstance(event, SegmentStarted):
            if self._pending is None:
                self._pending = Item(new_id("item"), event.start if self._vad else min(event.start, self._buffer_start))
            self._pending.segments.append(event.index)
            self._items[event.index] = self._pending
            if self._vad:
                self._event(
                    "input_audio_buffer.speech_started",
                    item_id=self._pending.id,
                    audio_start_ms=event.start * 1000 // SAMPLE_RATE,
                )
        elif isinstance(event, SegmentClosed):
            item = self._items.get(event.index)
            if item is None or item.committed or not self._vad:
                return
            item.end = event.end
            if not self._committing:
                self._event(
                    "input_audio_buffer.speech_stopped", item_id=item.id, audio_end_ms=event.end * 1000 // SAMPLE_RATE
                )
            self._commit_item(item)

    def _commit_item(self, item: Item) -> None:
        item.committed = True
        if not item.end:  # a commit, not a VAD turn: the item holds the whole buffer
            item.end = self._fed
        if self._pending is item:
            self._pending = None
        self._buffer_ms = 0.0
        self._buffer_start = item.end
        previous, self._last_item = self._last_item, item.id
        self._event("input_audio_buffer.committed", item_id=item.id, previous_item_id=previous)
        self._event(
            "conversation.item.created" if self._beta else "conversation.item.added",
            item=item_view(item, None),
            previous_item_id=previous,
        )
        self._committed.append(item)
        self._complete_ready()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Failure):
            self._fail(event.error)
            return
        item = self._items.get(event.segment)
        if item is None:  # cleared, or already completed
            return
        if isinstance(event, Partial):
            self._delta(item, event.segment, event.stable)
            if self._extension_partials:
                self._event(
                    "x.transcription.partial",
                    item_id=item.id,
                    content_index=0,
                    text=item.text(event.segment, event.text),
                    stable=item.text(event.segment, event.stable),
                )
        elif isinstance(event, Final):
            item.finals[event.segment] = event.text
            self._delta(item, event.segment, event.text)

    def _delta(self, item: Item, segment: int, text: str) -> None:
        """Sends what `text` adds to what this segment already sent, if it extends it."""
        delta = item.delta(segment, text)
        if delta is not None:
            self._event(
                "conversation.item.input_audio_transcription.delta", item_id=item.id, content_index=0, delta=delta
            )

    def _on_resolved(self, segment: int) -> None:
        item = self._items.get(segment)
        if item is not None:
            item.resolved.add(segment)
            self._complete_ready()

    def _complete_ready(self) -> None:
        """Completes committed items whose segments are all resolved, in item order."""
        while self._committed and all(s in self._committed[0].resolved for s in self._committed[0].segments):
            item = self._committed.popleft()
            transcript = join_text([item.finals[s] for s in item.segments if s in item.finals])
            seconds = round(max(0, item.end - item.start) / SAMPLE_RATE, 3)
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item.id,
                content_index=0,
                transcript=transcript,
                usage={"type": "duration", "seconds": seconds},
            )
            if not self._beta:
                self._event("conversation.item.done", item=item_view(item, transcript), previous_item_id=None)
            for s in item.segments:
                self._items.pop(s, None)

    def _fail(self, error: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        items = list(self._committed) + ([self._pending] if self._pending is not None else [])
        for item in items:
            self._event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item.id,
                content_index=0,
                error={
                    "type": "server_error",
                    "code": "transcription_failed",
                    "param": None,
                    "message": "transcription failed on the server (the failure is logged)",
                },
            )
        self._committed.clear()
        self._pending = None
        self._server_error("transcription failed on the server; reconnect and start again (the failure is logged)")
        self._out.close(CloseCode.INTERNAL_ERROR, "transcription failed")

    # --- sending ------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        self._out.send({"type": kind, "event_id": new_id("event"), **fields})

    def _client_error(self, exc: ClientError, event_id: str | None) -> None:
        log.warning("realtime %s: error %s: %s", self.id, exc.code, exc)
        self._metrics.errors.labels(exc.metric).inc()
        self._event("error", error=error_body("invalid_request_error", exc.code, str(exc), exc.param, event_id))

    def _server_error(self, message: str) -> None:
        self._metrics.errors.labels("internal").inc()
        self._event("error", error=error_body("server_error", "internal_error", message))
