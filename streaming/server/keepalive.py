"""Keepalive pings that a session the server pushes back on survives.

The server pushes back on a client that sends audio faster than the engine transcribes it by
not reading its socket (streaming.audio.transcriber, `room()`); the websockets library then pauses
the transport once `max_queue` frames wait unread. A pong from that client sits unread behind
its audio, so the library's own keepalive (`serve(ping_interval=..., ping_timeout=...)`) would
fail a healthy session with 1011 "keepalive ping timeout" and lose its finals (issue 27).

So the server turns the library's keepalive off and runs `keepalive` on every connection: a ping
every `interval`, and a pong counts as late only after `timeout` seconds *during which the
server was reading the socket* (`transport.is_reading()`, asyncio's own transport API). A
paused session is never timed out by the server; a dead peer still is: it sends nothing, so
the session soon reads everything that was buffered, the transport reads again and the clock
runs. The close is the library's: 1011 "keepalive ping timeout" (the socket is cut if the
close handshake takes longer than the timeout: the peer is not answering).
"""

from __future__ import annotations

import asyncio
import logging

from websockets.asyncio.connection import Connection
from websockets.frames import CloseCode

log = logging.getLogger(__name__)

TICKS = 10  # checks of the transport's state per timeout: a pong is declared late within 1/TICKS of it


async def keepalive(connection: Connection, interval: float, timeout: float) -> None:
    """Pings `connection` every `interval` seconds until it closes; closes it with 1011 when a pong
    is more than `timeout` seconds late, counting only the time its transport was reading."""
    transport = connection.transport
    loop = asyncio.get_running_loop()
    tick = timeout / TICKS
    while True:
        await asyncio.sleep(interval)
        try:
            pong = asyncio.ensure_future(await connection.ping())  # the Future of the pong
        except Exception:  # noqa: BLE001 - ConnectionClosed: the connection is over
            return
        late = 0.0
        while not pong.done():
            reading, started = transport.is_reading(), loop.time()
            await asyncio.wait({pong}, timeout=tick)
            if reading and transport.is_reading():  # paused meanwhile: the pong may be behind unread audio
                late += loop.time() - started
            if not pong.done() and late >= timeout:
                log.warning(
                    "no pong from %s within %g s of reading its socket; closing the connection",
                    connection.remote_address,
                    timeout,
                )
                await close_or_abort(connection, CloseCode.INTERNAL_ERROR, "keepalive ping timeout", timeout)
                return
        if pong.cancelled() or pong.exception() is not None:  # the connection closed
            return


async def close_or_abort(connection: Connection, code: int, reason: str, timeout: float) -> None:
    """Closes with `code`; cuts the socket if the close handshake takes longer than `timeout`."""
    try:
        await asyncio.wait_for(connection.close(code, reason), timeout)
    except Exception:  # noqa: BLE001 - a timeout or a broken socket: cut it
        connection.transport.abort()
