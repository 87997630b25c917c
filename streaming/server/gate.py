"""Admission control: authentication and the limits on connections, in front of every session.

Two steps, for every WebSocket endpoint (native, OpenAI Realtime, Twilio, call subscribers and
the WhisperLive listener):

- `Gate.check` runs on the HTTP upgrade request, before any WebSocket handshake, and answers
  with an HTTP status where it can: 503 while the model loads, while draining, at
  `max_sessions`, or above the measured capacity (streaming.server.admission; with Retry-After); 429 past `max_per_client` connections from one address;
  403 for an Origin not in `--allowed-origins`; 401 for a missing or wrong key (streaming.server.auth
  says when a browser is upgraded instead, to be told by an error event).
- `Gate.serve` runs the connection after the upgrade: it counts it, checks the limits again (a
  burst of upgrades can pass the HTTP check together; the loser gets the protocol's `overloaded`
  error and close 1013), takes the token from the first message where the endpoint waits for
  one, and then runs the session.

The counts are of connections that hold a handler (sessions and connections still waiting for
their first message), per server and per client address. Behind a load balancer every peer is
the balancer: with `trusted_proxies` a peer in those networks is looked past, to the last address
in X-Forwarded-For that is not a trusted proxy (the one the client's own first proxy recorded).
`/readyz` reports 503 while draining, at `max_sessions` or above the measured capacity, so a load
balancer sends new streams elsewhere. Call subscribers (`/v1/calls/`) cost the engine nothing and
are not refused for capacity.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import math
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ..metrics import Metrics
from .admission import Admission
from .auth import (
    FIRST_MESSAGES,
    SUBSCRIBER,
    Endpoint,
    KeyRing,
    NeedMore,
    Replay,
    handshake_token,
    origin_allowed,
    without_token,
)
from .http import json_response

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REFUSAL_TIMEOUT = 2.0  # seconds a refused client gets to read its error event before the close


async def discard_incoming(connection: ServerConnection) -> None:
    """Reads and drops what a client still sends after its session stopped reading.

    The WebSocket library stops reading the socket once `max_queue` frames wait unread (that is
    what pushes back on fast senders), so a client that goes on sending after an error would hold
    its close frame behind them and keep the connection for the whole close timeout. Run this
    while the close goes out; it ends with the connection (or at once if someone else reads)."""
    try:
        while True:
            await connection.recv()
    except Exception:  # noqa: BLE001 - ConnectionClosed, or ConcurrencyError when the session still reads
        pass


async def closing(connection: ServerConnection, close: Awaitable[None]) -> None:
    """Awaits `close` (a close handshake under way) while discarding what the client still sends."""
    discard = asyncio.ensure_future(discard_incoming(connection))
    try:
        await close
    finally:
        discard.cancel()
        await asyncio.gather(discard, return_exceptions=True)


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 256
    """WebSocket connections at once, all endpoints together (0: no limit)."""
    max_per_client: int = 32
    """Connections at once from one client address (0: no limit; behind a proxy every client
    has the proxy's address unless the proxy is in `trusted_proxies`)."""
    max_session_seconds: float = 4 * 3600.0
    """A session's longest life; then its finals are flushed and it ends (0: no limit)."""
    auth_timeout: float = 10.0
    """Seconds a client that owes its token in the first message has to send it."""
    drain_timeout: float = 30.0
    """On SIGTERM/SIGINT: seconds open sessions get to flush their finals before the server exits."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks (CIDR) of load balancers whose X-Forwarded-For names the client."""
    ping_interval: float = 20.0
    """Seconds between the server's keepalive pings (0: none; streaming.server.keepalive)."""
    ping_timeout: float = 20.0
    """Seconds of reading the socket without the pong before the connection is closed with 1011
    (time the server does not read a client it pushes back on does not count)."""

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_per_client, self.max_session_seconds, self.ping_interval) < 0:
            raise ValueError("session limits and --ping-interval must be >= 0 (0: no limit, no pings)")
        if self.ping_timeout <= 0:
            raise ValueError("--ping-timeout must be > 0")
        if self.auth_timeout <= 0 or self.drain_timeout <= 0:
            raise ValueError("--drain-timeout and the auth timeout must be > 0")
        proxy_networks(self.trusted_proxies)  # ValueError naming a malformed network, at start


@dataclass(frozen=True)
class AuthConfig:
    api_key_file: str | None = None
    """One key per line; None: no authentication."""
    allowed_origins: tuple[str, ...] | None = None
    """Browser origins allowed to open WebSockets (normalised, see auth.parse_origins); None: any."""


@dataclass
class _Admission:
    authorized: bool
    reason: str = ""  # why not, for the client


def proxy_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)
    except ValueError as exc:
        raise ValueError(f"--trusted-proxies: {exc} (give networks like 10.0.0.0/8 or 127.0.0.1)") from None


def client_address(
    connection: ServerConnection, headers: Headers | None = None, proxies: tuple[Network, ...] = ()
) -> str:
    """The client's address: the peer's, or behind trusted proxies the last X-Forwarded-For hop
    that is not one of them (hops further left are the client's word, not a proxy's)."""
    address = connection.remote_address
    peer = str(address[0]) if address else "?"
    if not proxies or headers is None or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for value in headers.get_all("X-Forwarded-For") for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return str(hop)
    return hops[0] if hops else peer


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (a garbled header): never a proxy, so it is the client's own word
        return False
    return any(ip in network for network in proxies)


class Gate:
    """The auth and connection limits of one server; `metrics.rejected` counts refusals by reason."""

    def __init__(self, limits: Limits, auth: AuthConfig, metrics: Metrics, capacity: Admission | None = None) -> None:
        self.limits = limits
        self.capacity = capacity
        self.auth = auth
        self.keys = KeyRing(auth.api_key_file) if auth.api_key_file else None
        self._metrics = metrics
        self.active = 0
        self._per_client: Counter[str] = Counter()
        self._proxies = proxy_networks(limits.trusted_proxies)
        self._admissions: weakref.WeakKeyDictionary[ServerConnection, _Admission] = weakref.WeakKeyDictionary()
        self._waiting: set[ServerConnection] = set()  # connections waiting for a first message with their token
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def full(self) -> bool:
        return bool(self.limits.max_sessions) and self.active >= self.limits.max_sessions

    def _refuse_http(
        self,
        reason: str,
        status: http.HTTPStatus,
        message: str,
        headers: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Response:
        self._metrics.rejected.labels(reason).inc()
        log.info("refused an upgrade (%s): %s", reason, message)
        return json_response(status, {"error": error or reason, "message": message}, headers)

    def _beyond_capacity(self, endpoint: Endpoint, sessions: int) -> bool:
        """Whether one more session would exceed the measured capacity (streaming.server.admission)."""
        return self.capacity is not None and endpoint is not SUBSCRIBER and not self.capacity.admits(sessions)

    def _capacity_message(self) -> str:
        assert self.capacity is not None  # refusals for capacity need an estimate
        return (
            f"the server is at its measured capacity ({self.capacity.capacity:.0f} sessions in real time); "
            "retry later or connect to another instance"
        )

    # --- before the upgrade ------------------------------------------------------------------------

    def check(self, connection: ServerConnection, request: Request, endpoint: Endpoint) -> Response | None:
        """None to go on with the handshake, or the HTTP response that refuses it."""
        if self.draining:
            return self._refuse_http(
                "draining",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "the server is shutting down; connect to another instance or retry shortly",
                {"Retry-After": "5"},
            )
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, self.auth.allowed_origins):
            return self._refuse_http(
                "origin",
                http.HTTPStatus.FORBIDDEN,
                f"the origin {origin} is not allowed to connect (see --allowed-origins)",
            )
        if self.full:
            return self._refuse_http(
                "overloaded",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server is at its limit of {self.limits.max_sessions} sessions; retry later "
                "or connect to another instance",
                {"Retry-After": "5"},
            )
        if self._beyond_capacity(endpoint, self.active):
            return self._refuse_http(
                "capacity",
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                self._capacity_message(),
                {"Retry-After": str(max(1, math.ceil(self.capacity.config.hold if self.capacity else 1)))},
                "overloaded",
            )
        limit = self.limits.max_per_client
        if limit and self._per_client[self._client(connection, request)] >= limit:
            return self._refuse_http(
                "per_client",
                http.HTTPStatus.TOO_MANY_REQUESTS,
                f"{limit} connections from your address are open already; close one first",
                {"Retry-After": "5"},
            )
        if self.keys is None:
            return None
        token = handshake_token(request.headers, request.path)
        request.path = without_token(request.path)  # sessions and logs never see a key
        browser = origin is not None
        if token is not None:
            if self.keys.check(token):
                return None
            if not browser:
                return self._unauthorized("the API key is not valid")
            self._admissions[connection] = _Admission(False, "the API key in the request is not valid")
            return None
        if endpoint.takes_first_message(browser) or browser:
            self._admissions[connection] = _Admission(False)  # the first message must carry it
            return None
        return self._unauthorized(
            "this server needs an API key: send the header Authorization: Bearer KEY or add ?token=KEY to the URL"
        )

    def _unauthorized(self, message: str) -> Response:
        return self._refuse_http(
            "unauthorized", http.HTTPStatus.UNAUTHORIZED, message, {"WWW-Authenticate": 'Bearer realm="breeze-stream"'}
        )

    # --- after the upgrade ---------------------------------------------------------------------------

    async def serve(
        self, connection: ServerConnection, endpoint: Endpoint, run: Callable[[ServerConnection], Awaitable[None]]
    ) -> None:
        """Counts the connection while `run(connection)` serves it, unless limits or auth refuse it."""
        address = self._client(connection)
        self.active += 1
        self._per_client[address] += 1
        self._idle.clear()
        try:
            refusal = self._over_limits(address, endpoint)
            if refusal is not None:
                await self._refuse(connection, endpoint, *refusal)
                return
            admission = self._admissions.pop(connection, None)
            if admission is not None and not admission.authorized:
                replay = await self._first_message(connection, endpoint, admission)
                if replay is None:
                    return
                connection = replay
            await run(connection)
        finally:
            self.active -= 1
            self._per_client[address] -= 1
            if not self._per_client[address]:
                del self._per_client[address]
            if not self.active:
                self._idle.set()

    def _client(self, connection: ServerConnection, request: Request | None = None) -> str:
        """The client address this gate counts; `request`: the upgrade request, before the handshake."""
        request = request or getattr(connection, "request", None)
        return client_address(connection, None if request is None else request.headers, self._proxies)

    def _over_limits(self, address: str, endpoint: Endpoint) -> tuple[str, str, int] | None:
        if self.draining:
            return "overloaded", "the server is shutting down; connect to another instance", CloseCode.GOING_AWAY
        limits = self.limits
        if limits.max_sessions and self.active > limits.max_sessions:
            self._metrics.rejected.labels("overloaded").inc()
            return (
                "overloaded",
                f"the server is at its limit of {limits.max_sessions} sessions; retry later or "
                "connect to another instance",
                CloseCode.TRY_AGAIN_LATER,
            )
        if limits.max_per_client and self._per_client[address] > limits.max_per_client:
            self._metrics.rejected.labels("per_client").inc()
            return (
                "overloaded",
                f"{limits.max_per_client} connections from your address are open already; close one first",
                CloseCode.TRY_AGAIN_LATER,
            )
        if self._beyond_capacity(endpoint, self.active - 1):  # this one counted already
            self._metrics.rejected.labels("capacity").inc()
            return "overloaded", self._capacity_message(), CloseCode.TRY_AGAIN_LATER
        return None

    async def _first_message(
        self, connection: ServerConnection, endpoint: Endpoint, admission: _Admission
    ) -> ServerConnection | None:
        """The connection (replaying what was read) once its first message carried a valid key, else None."""
        browser = connection.request is not None and connection.request.headers.get("Origin") is not None
        if admission.reason or not endpoint.takes_first_message(browser):
            await self._refuse(
                connection,
                endpoint,
                "unauthorized",
                admission.reason or "this server needs an API key: add ?token=KEY to the URL",
                CloseCode.POLICY_VIOLATION,
            )
            return None
        read: list[str | bytes] = []
        self._waiting.add(connection)
        try:
            token = await asyncio.wait_for(self._read_token(connection, endpoint, read), self.limits.auth_timeout)
        except asyncio.TimeoutError:
            await self._refuse(
                connection,
                endpoint,
                "unauthorized",
                f"no API key within {self.limits.auth_timeout:g} s of connecting; send it in the first message",
                CloseCode.POLICY_VIOLATION,
            )
            return None
        except ConnectionClosed:
            return None
        finally:
            self._waiting.discard(connection)
        if token is None or self.keys is None or not self.keys.check(token):
            first = None
            try:
                first = json.loads(read[0]) if read else None
            except (ValueError, UnicodeDecodeError):
                pass
            why = (
                "the API key in the first message is not valid"
                if token
                else ('this server needs an API key: add "token": "KEY" to the first message, or ?token=KEY to the URL')
            )
            await self._refuse(
                connection,
                endpoint,
                "unauthorized",
                why,
                CloseCode.POLICY_VIOLATION,
                first if isinstance(first, dict) else None,
            )
            return None
        return cast(ServerConnection, Replay(connection, read))  # a stand-in: the messages read come first

    @staticmethod
    async def _read_token(connection: ServerConnection, endpoint: Endpoint, read: list[str | bytes]) -> str | None:
        """Reads messages (into `read`, the key taken out) until the one that should carry the key."""
        while len(read) < FIRST_MESSAGES:
            message = await connection.recv()
            try:
                token, message = endpoint.token(message)
            except NeedMore:
                read.append(message)
                continue
            read.append(message)
            return token
        return None

    async def _refuse(
        self,
        connection: ServerConnection,
        endpoint: Endpoint,
        code: str,
        message: str,
        close_code: int,
        first: dict[str, Any] | None = None,
    ) -> None:
        log.info("refused a %s connection from %s (%s): %s", endpoint.name, self._client(connection), code, message)
        if close_code != CloseCode.GOING_AWAY:
            self._metrics.errors.labels(code).inc()
        text = endpoint.error(code, message, first)
        try:
            await asyncio.wait_for(
                closing(connection, self._say_and_close(connection, text, close_code, code)), REFUSAL_TIMEOUT
            )
        except (asyncio.TimeoutError, ConnectionClosed):
            connection.transport.abort()

    @staticmethod
    async def _say_and_close(connection: ServerConnection, text: str | None, close_code: int, reason: str) -> None:
        if text is not None:
            await connection.send(text)
        await connection.close(close_code, reason)

    # --- drain ---------------------------------------------------------------------------------------

    def start_draining(self) -> None:
        """New upgrades get 503 from now on; connections still waiting for their key are closed."""
        self.draining = True
        for connection in list(self._waiting):
            connection.transport.abort()

    async def wait_idle(self) -> None:
        """Until no connection holds a handler."""
        await self._idle.wait()
