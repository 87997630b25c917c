"""Who may connect: API keys, browser origins, TLS, and tokens that arrive in a first message.

With `--api-key-file` (one key per line; blank lines and lines starting with # are skipped; the
file is re-read when it changes, so keys rotate without a restart), every WebSocket endpoint
needs a key. A client presents it, in this order of preference:

1. `Authorization: Bearer KEY` on the upgrade request (the OpenAI SDK sends its api_key so);
2. `?token=KEY` in the URL (the demo page passes on its own `?token=`); the server removes it
   from the request path once checked, so sessions and logs never see it;
3. for OpenAI Realtime in a browser, the subprotocol `openai-insecure-api-key.KEY` (the server
   then selects the `realtime` subprotocol, as OpenAI's does);
4. in the first message, where a protocol has no other way: `"token"` in the native `start`
   message (browsers), `"token"` in WhisperLive's options message, and a `<Parameter
   name="token">` of Twilio's `<Stream>` (`customParameters.token` of the `start` event; Twilio
   cannot set headers or query strings). The token is removed before the session sees the
   message, so it never reaches call subscribers, webhooks or logs.

A request that presents a wrong key, or none where the endpoint cannot take one in its first
message, is answered HTTP 401 before the upgrade, except a browser's (it has an `Origin`
header): a page cannot read an HTTP status, so a browser upgrade is accepted and then answered
with the protocol's error event (`unauthorized`) and close 1008, which the page can show.
Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every key, so the time
taken says nothing about how much of a key matched or which key it was.

`--allowed-origins` (comma-separated, `*` for any): an upgrade whose `Origin` header is not in
the list gets HTTP 403. Requests without `Origin` (non-browser clients) are not affected. The
server's own demo page is a browser page too: list the origin it is served from.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.typing import Subprotocol

log = logging.getLogger(__name__)

TOKEN_PARAM = "token"
OPENAI_KEY_PROTOCOL = "openai-insecure-api-key."


class AuthConfigError(ValueError):
    """A key file or TLS file the server cannot use; the message says which and why."""


# --- keys -----------------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def read_keys(path: Path) -> list[bytes]:
    """Digests of the keys in `path` (one a line; blank lines and # comments skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read the API key file {path}: {exc}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise AuthConfigError(f"the API key file {path} holds no keys (one key per line)")
    short = [k for k in keys if len(k) < 16]
    if short:
        log.warning("%d API key(s) in %s are shorter than 16 characters: easy to guess", len(short), path)
    return [_digest(k) for k in keys]


class KeyRing:
    """The API keys of one key file, re-read when the file changes (rotation without a restart)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digests = read_keys(self.path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._digests = read_keys(self.path)
            log.info("API keys re-read from %s (%d keys)", self.path, len(self._digests))
        except AuthConfigError as exc:
            log.error("%s; keeping the %d keys read before", exc, len(self._digests))
        self._stamp = stamp

    def check(self, token: object) -> bool:
        """Whether `token` is one of the keys, in time that does not depend on where it differs."""
        if not isinstance(token, str) or not token:
            return False
        self._refresh()
        digest = _digest(token)
        ok = False
        for key in self._digests:  # every key, no early exit
            ok |= hmac.compare_digest(digest, key)
        return ok

    def __len__(self) -> int:
        return len(self._digests)


# --- what a request carries -----------------------------------------------------------------------


def handshake_token(headers: Headers, path: str) -> str | None:
    """The key a WebSocket upgrade request carries: Bearer header, ?token=, or the OpenAI subprotocol."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    for name, value in parse_qsl(urlsplit(path).query, keep_blank_values=True):
        if name == TOKEN_PARAM and value:
            return value
    for header in headers.get_all("Sec-WebSocket-Protocol"):
        for protocol in header.split(","):
            protocol = protocol.strip()
            if protocol.startswith(OPENAI_KEY_PROTOCOL) and len(protocol) > len(OPENAI_KEY_PROTOCOL):
                return str(protocol[len(OPENAI_KEY_PROTOCOL) :])
    return None


def without_token(path: str) -> str:
    """The request path with ?token= removed (sessions and logs never see the key)."""
    parts = urlsplit(path)
    if not parts.query:
        return path
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != TOKEN_PARAM]
    return urlunsplit(("", "", parts.path, urlencode(query), parts.fragment))


def select_subprotocol(connection: ServerConnection, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
    """websockets' subprotocol hook: OpenAI's browser clients offer `realtime` next to their key."""
    return Subprotocol("realtime") if "realtime" in subprotocols else None


def normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def parse_origins(value: str | None) -> tuple[str, ...] | None:
    """`--allowed-origins`: None (any origin) or the normalised list; `*` means any."""
    if value is None:
        return None
    origins = tuple(normalise_origin(o) for o in value.split(",") if o.strip())
    return None if not origins or "*" in origins else origins


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | None) -> bool:
    return origin is None or allowed is None or normalise_origin(origin) in allowed


# --- tokens in a first message --------------------------------------------------------------------


class NeedMore(Exception):
    """The token comes in a later message (Twilio: `connected` comes before `start`)."""


@dataclass(frozen=True)
class Endpoint:
    """How one WebSocket protocol takes a token in its messages and words its refusals.

    `first_message`: "never", "browser" (only upgrades with an Origin header wait for it) or
    "always". `token(message)` returns (token, the message without it) or raises NeedMore;
    `error(code, message, first)` is the text frame that tells a client why it is refused
    (None: the protocol has no way to say it), `first` the parsed first message if any.
    """

    name: str
    first_message: str
    token: Callable[[str | bytes], tuple[str | None, str | bytes]]
    error: Callable[[str, str, dict[str, Any] | None], str | None]

    def takes_first_message(self, browser: bool) -> bool:
        return self.first_message == "always" or (self.first_message == "browser" and browser)


def _json_object(message: str | bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _top_level_token(message: str | bytes) -> tuple[str | None, str | bytes]:
    """`{"token": ...}` in a JSON object message (native start, WhisperLive options)."""
    value = _json_object(message)
    if value is None or TOKEN_PARAM not in value:
        return None, message
    token = value.pop(TOKEN_PARAM)
    return (token if isinstance(token, str) else None), json.dumps(value, ensure_ascii=False)


def _twilio_token(message: str | bytes) -> tuple[str | None, str | bytes]:
    value = _json_object(message)
    if value is not None and value.get("event") == "connected":
        raise NeedMore
    start = value.get("start") if value is not None and value.get("event") == "start" else None
    parameters = start.get("customParameters") if isinstance(start, dict) else None
    if not isinstance(parameters, dict) or TOKEN_PARAM not in parameters:
        return None, message
    token = parameters.pop(TOKEN_PARAM)
    return (token if isinstance(token, str) else None), json.dumps(value, ensure_ascii=False)


def _no_token(message: str | bytes) -> tuple[str | None, str | bytes]:
    return None, message


def _native_error(code: str, message: str, first: dict[str, Any] | None) -> str:
    return json.dumps({"type": "error", "code": code, "message": message}, ensure_ascii=False)


def _realtime_error(code: str, message: str, first: dict[str, Any] | None) -> str:
    kind = "invalid_request_error" if code == "unauthorized" else "server_error"
    return json.dumps(
        {
            "type": "error",
            "event_id": None,
            "error": {"type": kind, "code": code, "message": message, "param": None, "event_id": None},
        }
    )


def _whisperlive_error(code: str, message: str, first: dict[str, Any] | None) -> str:
    uid = first.get("uid") if first else None
    if code == "overloaded":
        return json.dumps({"uid": uid, "status": "WAIT", "message": 1.0})  # minutes, WhisperLive's shape
    return json.dumps({"uid": uid, "status": "ERROR", "message": message}, ensure_ascii=False)


def _silent(code: str, message: str, first: dict[str, Any] | None) -> None:
    return None  # Twilio reads nothing the server sends back


NATIVE = Endpoint("native", "browser", _top_level_token, _native_error)
REALTIME = Endpoint("realtime", "never", _no_token, _realtime_error)
TWILIO = Endpoint("twilio", "always", _twilio_token, _silent)
SUBSCRIBER = Endpoint("calls", "never", _no_token, _native_error)
WHISPERLIVE = Endpoint("whisperlive", "always", _top_level_token, _whisperlive_error)
FIRST_MESSAGES = 4
"""Messages read at most while waiting for the one that carries the token (Twilio: connected, start)."""


class Replay:
    """A connection whose next `recv` returns messages already read (by the first-message check);
    everything else is the connection's own."""

    def __init__(self, connection: ServerConnection, messages: list[str | bytes]) -> None:
        self._connection = connection
        self._buffered = deque(messages)

    async def recv(self, decode: bool | None = None) -> str | bytes:
        if self._buffered:
            return self._buffered.popleft()
        message: str | bytes = await self._connection.recv(decode)
        return message

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while self._buffered:
            yield self._buffered.popleft()
        async for message in self._connection:
            yield message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


# --- TLS ------------------------------------------------------------------------------------------


def tls_context(certfile: str | Path | None, keyfile: str | Path | None) -> ssl.SSLContext | None:
    """A server TLS context of `--certfile` / `--keyfile` (None without them)."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None:
        raise AuthConfigError("--keyfile needs --certfile (the certificate chain, PEM)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certfile), None if keyfile is None else str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise AuthConfigError(f"cannot load the TLS certificate {certfile} / key {keyfile}: {exc}") from None
    return context
