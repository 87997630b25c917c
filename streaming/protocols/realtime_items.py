"""The items of an OpenAI Realtime transcription session (streaming.protocols.realtime): what each
committed turn holds, the append-only text deltas sent for it, and the client events as JSON."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..audio.hypothesis_text import join_text
from .realtime_settings import ClientError


@dataclass
class Item:
    """One user item: a VAD turn or a commit, made of the segments the transcriber found in it."""

    id: str
    start: int  # stream samples
    end: int = 0
    segments: list[int] = field(default_factory=list)
    finals: dict[int, str] = field(default_factory=dict)
    resolved: set[int] = field(default_factory=set)
    sent: dict[int, str] = field(default_factory=dict)  # per segment: text already sent as deltas
    committed: bool = False

    def text(self, segment: int, text: str) -> str:
        """The item's text with `text` as the segment's: earlier segments' finals (or what they sent)."""
        earlier = [self.finals.get(s, self.sent.get(s, "")) for s in self.segments if s < segment]
        return join_text([*earlier, text])

    def delta(self, segment: int, text: str) -> str | None:
        """What `text` adds to what this segment already sent (and is now sent), or None where it does
        not extend it: nothing new, or a correction that only `.completed` can carry."""
        sent = self.sent.get(segment, "")
        if len(text) <= len(sent) or not text.startswith(sent):
            return None
        delta = text[len(sent) :]
        if not sent:  # a later segment's first text: a space between two Latin words, as join_text does
            earlier = [s for s in self.segments if s < segment and self.sent.get(s)]
            last = self.sent[earlier[-1]].rstrip()[-1:] if earlier else ""
            if last.isascii() and last.isalnum() and delta[:1].isascii() and delta[:1].isalnum():
                delta = " " + delta
        self.sent[segment] = text
        return delta


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def item_view(item: Item, transcript: str | None) -> dict[str, Any]:
    return {
        "id": item.id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }


def error_body(
    kind: str, code: str, message: str, param: str | None = None, event_id: str | None = None
) -> dict[str, Any]:
    """The `error` object of an `error` event (kind: invalid_request_error or server_error)."""
    return {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}


def parse_event(message: str | bytes, max_frame_bytes: int) -> dict[str, Any]:
    """A client event: a JSON object with a string type, or the ClientError that says what is wrong."""
    if isinstance(message, bytes):
        raise ClientError(
            "invalid_message",
            "binary frames are not part of the Realtime protocol; send audio as "
            '{"type": "input_audio_buffer.append", "audio": "<base64>"} text frames',
        )
    if len(message) > max_frame_bytes:
        raise ClientError(
            "message_too_large",
            f"an event of {len(message)} bytes is over this server's limit of "
            f"{max_frame_bytes} bytes; append audio in chunks of 20-500 ms",
            metric="frame_too_large",
        )
    try:
        event = json.loads(message)
    except ValueError as exc:
        raise ClientError(
            "invalid_json", f"the event is not valid JSON ({exc}); send one JSON object per text frame"
        ) from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ClientError("invalid_event", 'an event must be a JSON object with a string "type"', "type")
    return event
