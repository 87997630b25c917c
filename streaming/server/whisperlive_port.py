"""The WhisperLive listener (streaming.protocols.whisperlive) on a port of its own (`serve
--whisperlive-port`): any path, the server's upgrade checks and keepalive."""

from __future__ import annotations

from typing import TYPE_CHECKING

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from ..protocols.whisperlive import Seats, WhisperLiveConfig, WhisperLiveSession
from .auth import WHISPERLIVE

if TYPE_CHECKING:
    from .app import Server

CLOSE_TIMEOUT = 2.0


class WhisperLiveListener:
    """The listener's socket; its sessions share the server's checks, limits and keepalive, and one
    `Seats` (for WAIT)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config: WhisperLiveConfig = server.config.whisperlive
        self.seats = Seats(self.config)
        self._ws: WebSocketServer | None = None

    @property
    def port(self) -> int:
        return self._ws.sockets[0].getsockname()[1]

    async def start(self) -> None:
        max_size = 4 * self.server.config.session.max_frame_bytes
        # close_timeout: websocket-client (the stock clients) answers the closing handshake but keeps
        # its TCP socket open, which would hold each finished session (and shutdown) for 10 s
        self._ws = await serve(
            self._handle,
            self.server.config.host,
            self.config.port,
            process_request=self._http,
            max_size=max_size,
            compression=None,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=None,  # the server's serve_connection runs streaming.server.keepalive
            ssl=self.server.ssl_context,
            reuse_port=self.server.config.reuse_port,
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
