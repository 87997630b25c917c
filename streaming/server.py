"""The server: WebSocket sessions and plain HTTP on one port, one engine shared by all sessions.

`process_request` answers the HTTP side before any WebSocket handshake: `GET /healthz` (200 once
the model is loaded, 503 before), `GET /metrics` (Prometheus text), and the files of `web/`
(`/` is `index.html`). WebSocket paths are looked up in `Server.routes` (`/v1/stream` is the
native protocol, `/v1/realtime` OpenAI Realtime transcription, `/v1/twilio` Twilio Media Streams,
`/v1/calls/{callSid}` the transcripts of calls; a key ending in "/" matches every path under
it); anything else is 404. A WhisperLive-compatible listener runs on a port of its own when
`ServerConfig.whisperlive.port` is set.

The socket listens before the model is loaded (loading takes seconds to minutes), so health
checks see 503 rather than a refused connection; WebSocket handshakes get 503 until then too.
`GET /readyz` is 200 while the server takes new sessions, 503 while loading, draining, at
`--max-sessions`, above the measured capacity (streaming.admission) or with the engine worker
down (load balancers route by it); `GET /healthz` reports the engine worker (alive, restarts
after crashes, the last error) and the capacity estimate, and is 503 only when the process
should be replaced. Keepalive pings are the server's own (streaming.keepalive): a session the
server pushes back on is not timed out for a pong it has not read yet.

Every WebSocket upgrade, on every endpoint, goes through `Gate` (streaming.limits): API keys,
allowed origins, and the session and per-client limits; sessions then get the session limits
(duration, idle, frame size, queued audio, send queue; streaming.session). Optional TLS:
`--certfile`/`--keyfile` (the WhisperLive listener too).

Shutdown (SIGINT/SIGTERM) drains: new upgrades get 503 and `/readyz` 503 (the listener stays up
for probes), every session flushes its open segment, sends its final and `end` (`"reason":
"shutdown"`), and closes with 1001; whatever is still open at `--drain-timeout` is closed then,
so the process exits within it. A second signal closes everything at once.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import http
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from engines.backend import create_engine
from engines.config import EngineConfig
from engines.engine import Engine

from .admission import Admission, AdmissionConfig
from .auth import (
    NATIVE,
    REALTIME,
    SUBSCRIBER,
    TWILIO,
    Endpoint,
    parse_origins,
    read_keys,
    select_subprotocol,
    tls_context,
)
from .keepalive import close_or_abort, keepalive
from .limits import AuthConfig, Gate, Limits
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .options import SEGMENTER_FLAGS
from .realtime import realtime_session
from .segmenter import SegmenterConfig
from .session import NativeSession, SessionConfig
from .transcriber import TranscriberConfig, check_prompt
from .twilio import CALLS_PREFIX, CallConfig, CallHub, call_subscriber_session, twilio_session
from .whisperlive import WhisperLiveConfig, WhisperLiveListener
from .workers import EngineAddress, RemoteEngine, run_workers

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".txt": "text/plain; charset=utf-8",
}
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


class Session(Protocol):
    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...


SessionFactory = Callable[[ServerConnection, "Server"], Session]


def native_session(connection: ServerConnection, server: Server) -> NativeSession:
    return NativeSession(connection, server.engine, server.metrics, server.config.session)


class Server:
    """`async with Server(config, engine=...) as server:` listens on `server.port` (0 picks a free one).

    Without an engine it loads `config.engine` in a thread after the socket is listening.
    """

    def __init__(self, config: ServerConfig = ServerConfig(), engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = Metrics()
        self.metrics.watch_engine(lambda: self.engine)
        self.routes: dict[str, SessionFactory] = {
            "/v1/stream": native_session,
            "/v1/realtime": realtime_session,
            "/v1/twilio": twilio_session,
            CALLS_PREFIX: call_subscriber_session,
        }
        # how each route takes a key in its first message and words a refusal (streaming.auth)
        self.endpoints: dict[str, Endpoint] = {
            "/v1/stream": NATIVE,
            "/v1/realtime": REALTIME,
            "/v1/twilio": TWILIO,
            CALLS_PREFIX: SUBSCRIBER,
        }
        # new sessions by measured capacity; a worker of `serve --workers N` takes its share
        self.admission = Admission(
            config.admission, self.metrics.load, workers=config.workers if config.engine_address is not None else 1
        )
        if engine is not None:
            self.admission.device = str(engine.device).split(":")[0]
        self._publishing: asyncio.Task | None = None
        self.gate = Gate(config.limits, config.auth, self.metrics, self.admission)
        self.ssl_context = tls_context(config.certfile, config.keyfile)
        self._expiring: dict[Session, asyncio.Task] = {}
        self._closing: asyncio.Future | None = None
        self._force = asyncio.Event()
        self.calls = CallHub(config.calls)  # transcripts of Twilio calls, to subscribers, webhook and log
        self.whisperlive: WhisperLiveListener | None = None
        self._sessions: set[Session] = set()
        self._loading: asyncio.Future[Engine] | None = None
        self._load_error: Exception | None = None
        self._ws: WebSocketServer | None = None

    @property
    def port(self) -> int:
        return self._ws.sockets[0].getsockname()[1]

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
            ping_interval=None,  # serve_connection runs streaming.keepalive instead
            ssl=self.ssl_context,
            select_subprotocol=select_subprotocol,
            reuse_port=self.config.reuse_port,
        )
        if self.config.whisperlive.port is not None:
            self.whisperlive = WhisperLiveListener(self)
            try:
                await self.whisperlive.start()
            except OSError:
                self._ws.close()
                raise
        if self.engine is None:
            self._loading = _in_daemon_thread(self._load, "breeze-load")  # exit never waits for a load
        self._publishing = asyncio.ensure_future(self._publish_capacity())

    def _load(self) -> Engine:
        started = time.perf_counter()
        if self.config.engine_address is not None:  # a worker of `serve --workers N`
            try:
                engine = RemoteEngine.connect(self.config.engine_address)
            except Exception as exc:
                log.error("%s", exc)
                self._load_error = exc
                raise
            self.admission.device = str(engine.device).split(":")[0]
            self.engine = engine
            log.info("engine process ready: model %s on %s", engine.name, engine.device)
            return engine
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

    async def wait_ready(self) -> Engine:
        """The engine, once loaded; raises what loading raised."""
        if self._loading is not None:
            return await asyncio.shield(self._loading)
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
            connections = list(self._ws.all_connections) + (self.whisperlive.connections() if self.whisperlive else [])
            log.warning("%d connections still open %.1f s into the drain; closing them", len(connections), budget)
            await asyncio.gather(
                *(
                    close_or_abort(c, CloseCode.GOING_AWAY, "server shutting down", FORCE_CLOSE_TIMEOUT)
                    for c in connections
                )
            )
        self._ws.close()
        if self._publishing is not None:
            self._publishing.cancel()
        await _within(self._ws.wait_closed(), deadline)
        if self.whisperlive is not None:
            await _within(self.whisperlive.wait_closed(), deadline)
        await self.calls.aclose(timeout=max(0.5, min(10.0, deadline - time.monotonic())))  # queued webhook posts
        if self._loading is not None:  # we loaded the engine, so we stop it
            if not self._loading.done():
                log.warning("shutting down while the model is still loading")
            elif self._loading.exception() is None:
                await _within(_in_daemon_thread(self._loading.result().close, "breeze-engine-close"), deadline)

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

    def route_key(self, path: str) -> str | None:
        """The key of `routes` a WebSocket path goes to: itself, or the longest key ending in "/" above it."""
        if path in self.routes:
            return path
        prefixes = [key for key in self.routes if key.endswith("/") and path.startswith(key)]
        return max(prefixes, key=len) if prefixes else None

    def route(self, path: str) -> SessionFactory | None:
        """The session factory of a WebSocket path."""
        key = self.route_key(path)
        return None if key is None else self.routes[key]

    async def _handle(self, connection: ServerConnection) -> None:
        key = self.route_key(urlsplit(connection.request.path).path)
        await self.serve_connection(connection, self.endpoints.get(key, NATIVE), lambda c: self.routes[key](c, self))

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
        self, connection: ServerConnection, endpoint: Endpoint, factory: Callable[[ServerConnection], Session]
    ) -> None:
        """Admits a connection (limits, a key in its first message) and runs its session, with
        keepalive pings that a session the server pushes back on survives (streaming.keepalive)."""
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

    async def run_session(self, session: Session) -> None:
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

    def _expire(self, session: Session, limit: float) -> None:
        """The session reached the maximum duration (0: the server is draining): flush it and end it."""
        if session not in self._sessions or session in self._expiring:
            return
        expire = getattr(session, "expire", None)
        if limit and expire is not None:
            log.info("a session reached the maximum duration of %g s; ending it", limit)
            ending = expire(limit)
        else:
            ending = session.shutdown()
        self._expiring[session] = asyncio.ensure_future(ending)

    # --- HTTP -----------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        key = self.route_key(path)
        if key is not None:
            return self.check_upgrade(connection, request, self.endpoints.get(key, NATIVE))
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

    def engine_health(self) -> dict | None:
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
            return respond(code, json.dumps(body) + "\n", "application/json")
        if self._load_error is not None:
            body = {"status": "failed", "error": f"loading the model failed: {self._load_error}"}
        else:
            body = {"status": "loading"}
        return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body) + "\n", "application/json")

    def _ready(self) -> Response:
        """Readiness: 200 while new sessions are taken; 503 loading, draining, full, overloaded (above the
        measured capacity, streaming.admission) or engine down."""
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
        return respond(code, json.dumps(body) + "\n", "application/json")

    def _static(self, path: str) -> Response:
        """A file under web_root; nothing outside it, no dotfiles, no directory listings."""
        root = self.config.web_root.resolve()
        relative = unquote(path).lstrip("/")
        if relative == "" or relative.endswith("/"):
            relative += "index.html"
        parts = Path(relative).parts
        if "\0" in relative or any(part.startswith(".") for part in parts):
            return not_found(path)
        file = (root / relative).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return not_found(path)
        content_type = CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
        return respond(http.HTTPStatus.OK, file.read_bytes(), content_type)


def respond(status: http.HTTPStatus, body: str | bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode() if isinstance(body, str) else body
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def not_found(path: str) -> Response:
    return respond(
        http.HTTPStatus.NOT_FOUND,
        f"{path} not found: WebSocket at /v1/stream, /v1/realtime, /v1/twilio, "
        "/v1/calls/{callSid}; HTTP at /, /healthz, /readyz, /metrics\n",
    )


def _in_daemon_thread(function: Callable[[], object], name: str) -> asyncio.Future:
    """Runs `function` in a daemon thread (an exiting process does not wait for it); a future of its result."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = function(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def _within(awaitable, deadline: float) -> None:
    """Awaits until `deadline` (time.monotonic) at most; what is left over is logged, not raised."""
    try:
        await asyncio.wait_for(awaitable, max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        log.warning("shutdown: gave up waiting at the drain timeout")
    except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
        log.warning("shutdown: %s", exc)


# --- `breeze-stream serve` (its options: streaming.options) -------------------------------------------


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    segmenter = SegmenterConfig(**{name: getattr(args, f"segmenter_{name}") for name, _ in SEGMENTER_FLAGS.values()})
    transcriber = TranscriberConfig(
        partial_interval=args.partial_interval,
        partial_window=args.partial_window,
        final_window=args.final_window,
        speculative=args.speculative,
        max_queued_audio=args.max_queued_audio,
        segmenter=segmenter,
        condition_on_previous=args.condition_on_previous,
    )
    if args.max_send_queue < 1 or args.max_frame_bytes < 1 or args.max_queued_audio < 0 or args.idle_timeout < 0:
        raise ValueError(
            "--max-send-queue and --max-frame-bytes must be >= 1, --max-queued-audio and --idle-timeout >= 0"
        )
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    if (args.max_batch is not None and args.max_batch < 1) or (
        args.window_bucket is not None and args.window_bucket <= 0
    ):
        raise ValueError("--max-batch must be >= 1 and --window-bucket > 0")
    session = SessionConfig(
        max_frame_bytes=args.max_frame_bytes,
        idle_timeout=args.idle_timeout,
        language=args.language,
        max_send_queue=args.max_send_queue,
        transcriber=transcriber,
        prompt=check_prompt(args.prompt, "--prompt"),
    )
    limits = Limits(
        max_sessions=args.max_sessions,
        max_per_client=args.max_connections_per_client,
        trusted_proxies=tuple(c.strip() for c in args.trusted_proxies.split(",") if c.strip()),
        max_session_seconds=args.max_session_seconds,
        drain_timeout=args.drain_timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
    )
    admission = AdmissionConfig(
        mode=args.admission,
        floor=args.admission_floor,
        utilization=args.admission_utilization,
        max_wait=args.admission_max_wait,
    )
    if args.api_key_file is not None:
        read_keys(args.api_key_file)  # AuthConfigError (a ValueError) now, not at the first connection
    auth = AuthConfig(
        api_key_file=None if args.api_key_file is None else str(args.api_key_file),
        allowed_origins=parse_origins(args.allowed_origins),
    )
    tls_context(args.certfile, args.keyfile)  # the same: refuse to start with unusable TLS files
    whisperlive = WhisperLiveConfig(
        port=args.whisperlive_port,
        max_clients=args.whisperlive_max_clients,
        max_connection_time=args.whisperlive_max_connection_time,
    )
    calls = CallConfig(webhook=args.call_webhook, log_dir=args.call_log)
    return ServerConfig(
        host=args.host,
        port=args.port,
        engine=EngineConfig(
            model=args.model,
            device=args.device,
            script=args.script,
            backend=args.backend,
            trtllm_engine_dir=args.trtllm_engine_dir,
            self_test=args.self_test,
            medusa=args.medusa,
            fp32_weights=args.fp32_weights,
            cuda_graphs=args.cuda_graphs,
            max_batch=args.max_batch,
            window_bucket=args.window_bucket,
        ),
        session=session,
        whisperlive=whisperlive,
        calls=calls,
        limits=limits,
        admission=admission,
        auth=auth,
        certfile=args.certfile,
        keyfile=args.keyfile,
        workers=args.workers,
    )


async def serve_until_stopped(config: ServerConfig) -> int:
    """Serves until SIGINT/SIGTERM; 1 when the port is taken or the model cannot be loaded."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = Server(config)

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
        else:
            log.warning("second signal: closing every connection now")
            server.force_close()

    if config.engine_address is None:
        loop.add_signal_handler(signal.SIGINT, on_signal)
    else:  # a worker: a terminal's Ctrl-C reaches the whole group, and the parent passes each signal on as SIGTERM
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, on_signal)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1
    try:
        ws, web = ("wss", "https") if server.ssl_context is not None else ("ws", "http")
        log.info(
            "listening on %s://%s:%d/v1/stream, /v1/realtime, /v1/twilio, /v1/calls/{callSid} (demo page "
            "%s://%s:%d/); loading model %r",
            ws,
            config.host,
            server.port,
            web,
            config.host,
            server.port,
            config.engine.model,
        )
        if server.gate.keys is not None:
            log.info("API keys required (%d keys in %s)", len(server.gate.keys), config.auth.api_key_file)
        if server.whisperlive is not None:
            log.info("WhisperLive clients: %s://%s:%d", ws, config.host, server.whisperlive.port)
        ready = asyncio.ensure_future(server.wait_ready())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            stopping.cancel()
            return 1
        if isinstance(server.engine, RemoteEngine):  # a worker without its engine process has nothing to serve
            server.engine.on_lost.append(lambda: loop.call_soon_threadsafe(stop.set))
        await stopping
        ready.cancel()  # still loading: close() does not wait for it
        log.info(
            "shutting down: flushing the finals of %d sessions (at most %g s)",
            server.session_count,
            config.limits.drain_timeout,
        )
        return 0
    finally:
        await server.close()


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:  # SegmenterConfig, WhisperLiveConfig, Limits check their ranges; unusable key/TLS files
        log.error("bad option: %s", exc)
        return 2
    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    if config.workers:
        return run_workers(config, config.workers)
    return run_server(config)


def run_server(config: ServerConfig) -> int:
    """Serves in this process (uvloop where installed) until SIGINT/SIGTERM."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve_until_stopped(config))
    return uvloop.run(serve_until_stopped(config))
