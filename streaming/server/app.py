"""The server: WebSocket sessions and plain HTTP on one port, one engine shared by all sessions.

`process_request` answers the HTTP side before any WebSocket handshake: `GET /healthz` (200 once
the model is loaded, 503 before), `GET /metrics` (Prometheus text), and the files of `web/`
(`/` is `index.html`). WebSocket paths are looked up in streaming.protocols.routes (`/v1/stream`
is the native protocol, `/v1/realtime` OpenAI Realtime transcription, `/v1/twilio` Twilio Media
Streams, `/v1/calls/{callSid}` the transcripts of calls); anything else is 404. A WhisperLive-compatible listener runs on a port of its own when
`ServerConfig.whisperlive.port` is set.

The socket listens before the model is loaded (loading takes seconds to minutes), so health
checks see 503 rather than a refused connection; WebSocket handshakes get 503 until then too.
`GET /readyz` is 200 while the server takes new sessions, 503 while loading, draining, at
`--max-sessions`, above the measured capacity (streaming.server.admission) or with the engine worker
down (load balancers route by it); `GET /healthz` reports the engine worker (alive, restarts
after crashes, the last error) and the capacity estimate, and is 503 only when the process
should be replaced. Keepalive pings are the server's own (streaming.server.keepalive): a session the
server pushes back on is not timed out for a pong it has not read yet.

Every WebSocket upgrade, on every endpoint, goes through `Gate` (streaming.server.gate): API keys,
allowed origins, and the session and per-client limits; sessions then get the session limits
(duration, idle, frame size, queued audio, send queue; streaming.protocols.base). Optional TLS:
`--certfile`/`--keyfile` (the WhisperLive listener too).

Shutdown (SIGINT/SIGTERM) drains: new upgrades get 503 and `/readyz` 503 (the listener stays up
for probes), every session flushes its open segment, sends its final and `end` (`"reason":
"shutdown"`), and closes with 1001; whatever is still open at `--drain-timeout` is closed then,
so the process exits within it. A second signal closes everything at once.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from engines.backend import Backend, create_engine
from engines.config import EngineConfig

from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..metrics import Metrics
from ..protocols.base import ProtocolSession, SessionConfig, SessionContext
from ..protocols.calls import CallConfig, CallHub
from ..protocols.routes import WEBSOCKET_PATHS, find_route
from ..protocols.whisperlive import WhisperLiveConfig
from .admission import Admission, AdmissionConfig
from .auth import (
    Endpoint,
    select_subprotocol,
    tls_context,
)
from .background import in_daemon_thread, within
from .gate import AuthConfig, Gate, Limits
from .http import WEB_ROOT, json_response, not_found, respond, static_file
from .keepalive import close_or_abort, keepalive
from .whisperlive_port import WhisperLiveListener
from .workers import EngineAddress, RemoteEngine

log = logging.getLogger(__name__)


FORCE_CLOSE_TIMEOUT = 1.0  # seconds a connection still open at the drain timeout gets for its close handshake
FRAME_SLACK = 4  # the WebSocket layer cuts frames over FRAME_SLACK x the limit without reading them
PUBLISH_INTERVAL = 1.0  # seconds between updates of the admission gauges


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    engine: EngineConfig = field(default_factory=EngineConfig)  # which backend, model, device (engines/backend.py)
    session: SessionConfig = field(default_factory=SessionConfig)
    web_root: Path = WEB_ROOT
    whisperlive: WhisperLiveConfig = field(default_factory=WhisperLiveConfig)
    calls: CallConfig = field(default_factory=CallConfig)
    limits: Limits = field(default_factory=Limits)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    certfile: str | None = None
    """TLS certificate chain (PEM); with keyfile, the server speaks wss:// and https://."""
    keyfile: str | None = None
    engine_address: EngineAddress | None = None
    """A front-end worker of `serve --workers N`: the engine runs in the process at this address."""
    reuse_port: bool = False  # SO_REUSEPORT: the workers of `serve --workers N` share one port
    workers: int = 0  # `serve --workers N`: front-end processes (0: this process serves and runs the engine)


class Server:
    """`async with Server(config, engine=...) as server:` listens on `server.port` (0 picks a free one).

    Without an engine it loads `config.engine` in a thread after the socket is listening.
    """

    def __init__(self, config: ServerConfig = ServerConfig(), engine: Backend | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = Metrics()
        self.metrics.watch_engine(lambda: self.engine)
        # new sessions by measured capacity; a worker of `serve --workers N` takes its share
        self.admission = Admission(
            config.admission, self.metrics.load, workers=config.workers if config.engine_address is not None else 1
        )
        if engine is not None:
            self.admission.device = str(engine.device).split(":")[0]
        self._publishing: asyncio.Task[None] | None = None
        self.gate = Gate(config.limits, config.auth, self.metrics, self.admission)
        self.ssl_context = tls_context(config.certfile, config.keyfile)
        self._expiring: dict[ProtocolSession, asyncio.Task[None]] = {}
        self._closing: asyncio.Future[None] | None = None
        self._force = asyncio.Event()
        self.calls = CallHub(config.calls)  # transcripts of Twilio calls, to subscribers, webhook and log
        self.whisperlive: WhisperLiveListener | None = None
        self._sessions: set[ProtocolSession] = set()
        self._loading: asyncio.Future[Backend] | None = None
        self._load_error: Exception | None = None
        self._ws: WebSocketServer | None = None

    @property
    def port(self) -> int:
        assert self._ws is not None, "the server is not started"
        port: int = self._ws.sockets[0].getsockname()[1]
        return port

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def draining(self) -> bool:
        return self.gate.draining

    async def start(self) -> None:
        max_size = FRAME_SLACK * self.config.session.max_frame_bytes
        self._ws = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._http,
            max_size=max_size,
            compression=None,  # PCM barely compresses; deflate costs CPU
            ping_interval=None,  # serve_connection runs streaming.server.keepalive instead
            ssl=self.ssl_context,
            select_subprotocol=select_subprotocol,
            reuse_port=self.config.reuse_port,
        )
        if self.config.whisperlive.port is not None:
            self.whisperlive = WhisperLiveListener(
                self,
                self.config.whisperlive,
                self.config.host,
                max_size,
                self.ssl_context,
                self.config.reuse_port,
            )
            try:
                await self.whisperlive.start()
            except OSError:
                self._ws.close()
                raise
        if self.engine is None:
            self._loading = in_daemon_thread(self._load, "breeze-load")  # exit never waits for a load
        self._publishing = asyncio.ensure_future(self._publish_capacity())

    def _load(self) -> Backend:
        started = time.perf_counter()
        if self.config.engine_address is not None:  # a worker of `serve --workers N`
            try:
                remote = RemoteEngine.connect(self.config.engine_address)
            except Exception as exc:
                log.error("%s", exc)
                self._load_error = exc
                raise
            self.admission.device = str(remote.device).split(":")[0]
            self.engine = remote
            log.info("engine process ready: model %s on %s", remote.name, remote.device)
            return remote
        try:
            engine = create_engine(self.config.engine)
        except Exception as exc:
            log.error("loading the model %r failed: %s", self.config.engine.model, exc)
            self._load_error = exc
            raise
        self.admission.device = str(engine.device).split(":")[0]
        self.engine = engine  # one reference assignment: safe to publish from this thread
        log.info("model %s loaded on %s in %.1f s", engine.name, engine.device, time.perf_counter() - started)
        return engine

    async def wait_ready(self) -> Backend:
        """The engine, once loaded; raises what loading raised."""
        if self._loading is not None:
            return await asyncio.shield(self._loading)
        assert self.engine is not None  # given to the constructor
        return self.engine

    async def close(self) -> None:
        """Drain: refuse new sessions, let open ones flush their finals and close (up to the drain
        timeout), then close what is left, the listener and the engine (if this server loaded it)."""
        if self._ws is None:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    def force_close(self) -> None:
        """Stop waiting for sessions to flush (a second SIGINT/SIGTERM)."""
        self._force.set()

    async def _close(self) -> None:
        ws = self._ws
        assert ws is not None  # close() returns early unless started
        timeout = self.config.limits.drain_timeout
        deadline = time.monotonic() + timeout
        self.gate.start_draining()
        self.metrics.draining.set(1)
        if self.whisperlive is not None:
            self.whisperlive.close()
        drain = asyncio.ensure_future(self._drain())
        force = asyncio.ensure_future(self._force.wait())
        budget = max(timeout / 2, timeout - 2 * FORCE_CLOSE_TIMEOUT)  # room left to cut what is still open
        await asyncio.wait({drain, force}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not drain.done():
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
            connections = list(ws.all_connections) + (self.whisperlive.connections() if self.whisperlive else [])
            log.warning("%d connections still open %.1f s into the drain; closing them", len(connections), budget)
            await asyncio.gather(
                *(
                    close_or_abort(c, CloseCode.GOING_AWAY, "server shutting down", FORCE_CLOSE_TIMEOUT)
                    for c in connections
                )
            )
        ws.close()
        if self._publishing is not None:
            self._publishing.cancel()
        await within(ws.wait_closed(), deadline)
        if self.whisperlive is not None:
            await within(self.whisperlive.wait_closed(), deadline)
        await self.calls.aclose(timeout=max(0.5, min(10.0, deadline - time.monotonic())))  # queued webhook posts
        if self._loading is not None:  # we loaded the engine, so we stop it
            if not self._loading.done():
                log.warning("shutting down while the model is still loading")
            elif self._loading.exception() is None:
                await within(in_daemon_thread(self._loading.result().close, "breeze-engine-close"), deadline)

    async def _publish_capacity(self) -> None:
        """Keeps the admission gauges current (with several workers, a scrape reads every worker's)."""
        while True:
            self.metrics.publish(self.admission.report(self.gate.active))
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def _drain(self) -> None:
        await asyncio.gather(*(session.shutdown() for session in list(self._sessions)), return_exceptions=True)
        await self.gate.wait_idle()  # every connection's handler is done: its close went out
        if self.whisperlive is not None:
            await self.whisperlive.wait_closed()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- WebSocket ------------------------------------------------------------------------------

    @property
    def context(self) -> SessionContext:
        """What sessions see of this server (the engine is loaded: upgrades wait for it)."""
        assert self.engine is not None
        return SessionContext(self.engine, self.metrics, self.config.session, self.calls)

    async def _handle(self, connection: ServerConnection) -> None:
        assert connection.request is not None  # the handshake is done
        route = find_route(urlsplit(connection.request.path).path)
        assert route is not None  # _http refused the upgrade of every other path
        await self.serve_connection(connection, route.endpoint, lambda c: route.session(c, self.context))

    def check_upgrade(self, connection: ServerConnection, request: Request, endpoint: Endpoint) -> Response | None:
        """None to go on with a WebSocket handshake, else the HTTP refusal (the WhisperLive listener's too)."""
        if self.engine is None:
            self.metrics.rejected.labels("loading").inc()
            why = (
                "failed to load (see the server log)"
                if self._load_error is not None
                else "is still loading; connect again when GET /healthz answers 200"
            )
            return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"the model {why}\n")
        return self.gate.check(connection, request, endpoint)

    async def serve_connection(
        self, connection: ServerConnection, endpoint: Endpoint, factory: Callable[[ServerConnection], ProtocolSession]
    ) -> None:
        """Admits a connection (limits, a key in its first message) and runs its session, with
        keepalive pings that a session the server pushes back on survives (streaming.server.keepalive)."""
        limits = self.config.limits
        pings = (
            asyncio.ensure_future(keepalive(connection, limits.ping_interval, limits.ping_timeout))
            if limits.ping_interval
            else None
        )
        try:
            await self.gate.serve(connection, endpoint, lambda c: self.run_session(factory(c)))
        finally:
            if pings is not None:
                pings.cancel()
                await asyncio.gather(pings, return_exceptions=True)

    async def run_session(self, session: ProtocolSession) -> None:
        """Runs a session to its end, within the maximum duration; shutdown flushes it."""
        self._sessions.add(session)
        self.metrics.load.session_opened()
        limit = self.config.limits.max_session_seconds
        loop = asyncio.get_running_loop()
        timer = loop.call_later(limit, self._expire, session, limit) if limit else None
        if self.draining:  # it got in as the drain began
            loop.call_soon(self._expire, session, 0.0)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self.metrics.load.session_closed()
            if timer is not None:
                timer.cancel()
            task = self._expiring.pop(session, None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _expire(self, session: ProtocolSession, limit: float) -> None:
        """The session reached the maximum duration (0: the server is draining): flush it and end it."""
        if session not in self._sessions or session in self._expiring:
            return
        if limit:
            log.info("a session reached the maximum duration of %g s; ending it", limit)
            ending = session.expire(limit)
        else:
            ending = session.shutdown()
        self._expiring[session] = asyncio.ensure_future(ending)

    # --- HTTP -----------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        route = find_route(path)
        if route is not None:
            return self.check_upgrade(connection, request, route.endpoint)
        if path == "/healthz":
            return self._health()
        if path == "/readyz":
            return self._ready()
        if path == "/metrics":
            health = self.engine_health()
            if health is not None:
                self.metrics.engine_restarts.set(health.get("restarts", 0))
            return respond(http.HTTPStatus.OK, self.metrics.render(), METRICS_CONTENT_TYPE)
        return self._static(path)

    def engine_health(self) -> dict[str, Any] | None:
        """The engine worker's state (engines.backend.Backend.health), once an engine is loaded."""
        return None if self.engine is None else self.engine.health()

    def _health(self) -> Response:
        """Liveness: 503 while loading, after a failed load, or with the engine worker dead."""
        if self.engine is not None:
            engine = self.engine_health()
            alive = engine is None or engine.get("alive", True)
            status = "ok" if alive else "engine_down"  # engine.restarts counts recoveries from crashes
            body = {
                "status": status,
                "model": self.engine.name,
                "sessions": self.session_count,
                "draining": self.draining,
                "engine": engine,
                "capacity": self.admission.report(self.gate.active),
            }
            code = http.HTTPStatus.OK if alive else http.HTTPStatus.SERVICE_UNAVAILABLE
            return json_response(code, body)
        if self._load_error is not None:
            body = {"status": "failed", "error": f"loading the model failed: {self._load_error}"}
        else:
            body = {"status": "loading"}
        return json_response(http.HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _ready(self) -> Response:
        """Readiness: 200 while new sessions are taken; 503 loading, draining, full, overloaded (above the
        measured capacity, streaming.server.admission) or engine down."""
        engine = self.engine_health() if self.engine is not None else None
        capacity = self.admission.report(self.gate.active)
        if self.engine is None:
            status = "failed" if self._load_error is not None else "loading"
        elif self.draining:
            status = "draining"
        elif engine is not None and not engine.get("alive", True):
            status = "engine_down"
        elif self.gate.full:
            status = "full"
        elif not capacity["admitting"]:
            status = "overloaded"
        else:
            status = "ready"
        body = {
            "status": status,
            "sessions": self.session_count,
            "connections": self.gate.active,
            "max_sessions": self.config.limits.max_sessions or None,
            "capacity": capacity,
        }
        code = http.HTTPStatus.OK if status == "ready" else http.HTTPStatus.SERVICE_UNAVAILABLE
        return json_response(code, body)

    def _static(self, path: str) -> Response:
        return static_file(self.config.web_root, path) or not_found(path, WEBSOCKET_PATHS)
