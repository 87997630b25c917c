"""The WhisperLive listener (streaming.protocols.whisperlive) on a port of its own (`serve
--whisperlive-port`): any path, the server's upgrade checks and keepalive."""

from __future__ import annotations

from collections.abc import Callable
from ssl import SSLContext
from typing import Protocol

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from ..protocols.base import ProtocolSession, SessionContext
from ..protocols.whisperlive import Seats, WhisperLiveConfig, WhisperLiveSession
from .auth import WHISPERLIVE, Endpoint

CLOSE_TIMEOUT = 2.0


class Host(Protocol):
    """What the listener uses of its server (streaming.server.app.Server)."""

    @property
    def context(self) -> SessionContext: ...

    def check_upgrade(self, connection: ServerConnection, request: Request, endpoint: Endpoint) -> Response | None: ...

    async def serve_connection(
        self, connection: ServerConnection, endpoint: Endpoint, factory: Callable[[ServerConnection], ProtocolSession]
    ) -> None: ...


class WhisperLiveListener:
    """The listener's socket; its sessions share the server's checks, limits and keepalive, and one
    `Seats` (for WAIT)."""

    def __init__(
        self,
        server: Host,
        config: WhisperLiveConfig,
        host: str,
        max_size: int,
        ssl: SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.server = server
        self.config = config
        self.seats = Seats(config)
        self._host, self._max_size, self._ssl, self._reuse_port = host, max_size, ssl, reuse_port
        self._ws: WebSocketServer | None = None

    @property
    def port(self) -> int:
        assert self._ws is not None, "the listener is not started"
        port: int = self._ws.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        # close_timeout: websocket-client (the stock clients) answers the closing handshake but keeps
        # its TCP socket open, which would hold each finished session (and shutdown) for 10 s
        self._ws = await serve(
            self._handle,
            self._host,
            self.config.port,
            process_request=self._http,
            max_size=self._max_size,
            compression=None,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,  # the server's serve_connection runs streaming.server.keepalive
            ssl=self._ssl,
            reuse_port=self._reuse_port,
        )

    def close(self) -> None:
        """Stops accepting; the server's shutdown flushes the sessions."""
        if self._ws is not None:
            self._ws.close(close_connections=False)

    async def wait_closed(self) -> None:
        if self._ws is not None:
            await self._ws.wait_closed()

    def connections(self) -> list[ServerConnection]:
        """Every connection, those whose close handshake has begun too (a drain must cut those)."""
        return list(self._ws.all_connections) if self._ws is not None else []

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """The server's checks (model loaded, keys, origins, limits; streaming.server.gate)."""
        return self.server.check_upgrade(connection, request, WHISPERLIVE)

    async def _handle(self, connection: ServerConnection) -> None:
        await self.server.serve_connection(
            connection, WHISPERLIVE, lambda c: WhisperLiveSession(c, self.server.context, self.seats)
        )
