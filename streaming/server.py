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
Shutdown (SIGINT/SIGTERM) stops accepting connections, then every session flushes its open
segment, sends its final and `end`, and closes with 1001.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import http
import json
import logging
import signal
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

from engines.engine import Engine
from engines.trtllm.backend import create_engine

from .cli import window_argument
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .realtime import realtime_session
from .segmenter import SegmenterConfig
from .session import LANGUAGES, NativeSession, SessionConfig
from .transcriber import TranscriberConfig
from .twilio import CALLS_PREFIX, CallConfig, CallHub, call_subscriber_session, twilio_session
from .whisperlive import WhisperLiveConfig, WhisperLiveListener

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
SHUTDOWN_GRACE = 30.0  # seconds sessions get to flush their finals before connections are cut
FRAME_SLACK = 4  # the WebSocket layer cuts frames over FRAME_SLACK x the limit without reading them


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    model: str = "default"
    device: str = "auto"
    script: str = "traditional"
    backend: str = "torch"  # torch | trtllm-encoder | trtllm (engines/trtllm/backend.py)
    trtllm_engine_dir: str | None = None
    self_test: bool = True
    medusa: str | None = None  # Medusa heads file; None: the shipped heads where they fit the model
    session: SessionConfig = field(default_factory=SessionConfig)
    web_root: Path = WEB_ROOT
    whisperlive: WhisperLiveConfig = field(default_factory=WhisperLiveConfig)
    calls: CallConfig = field(default_factory=CallConfig)


class Session(Protocol):
    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...


SessionFactory = Callable[[ServerConnection, "Server"], Session]


def native_session(connection: ServerConnection, server: Server) -> NativeSession:
    return NativeSession(connection, server.engine, server.metrics, server.config.session)


class Server:
    """`async with Server(config, engine=...) as server:` listens on `server.port` (0 picks a free one).

    Without an engine it loads `config.model` in a thread after the socket is listening.
    """

    def __init__(self, config: ServerConfig = ServerConfig(), engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = Metrics()
        self.routes: dict[str, SessionFactory] = {"/v1/stream": native_session, "/v1/realtime": realtime_session,
                                                  "/v1/twilio": twilio_session, CALLS_PREFIX: call_subscriber_session}
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

    async def start(self) -> None:
        max_size = FRAME_SLACK * self.config.session.max_frame_bytes
        self._ws = await serve(self._handle, self.config.host, self.config.port, process_request=self._http,
                               max_size=max_size, compression=None)  # PCM barely compresses; deflate costs CPU
        if self.config.whisperlive.port is not None:
            self.whisperlive = WhisperLiveListener(self)
            try:
                await self.whisperlive.start()
            except OSError:
                self._ws.close()
                raise
        if self.engine is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))

    def _load(self) -> Engine:
        started = time.perf_counter()
        try:
            engine = create_engine(self.config.backend, model=self.config.model, device=self.config.device,
                                   engine_dir=self.config.trtllm_engine_dir, script=self.config.script,
                                   self_test=self.config.self_test, medusa=self.config.medusa)
        except Exception as exc:
            log.error("loading the model %r failed: %s", self.config.model, exc)
            self._load_error = exc
            raise
        self.engine = engine  # one reference assignment: safe to publish from this thread
        log.info("model %s loaded on %s in %.1f s", engine.name, engine.device, time.perf_counter() - started)
        return engine

    async def wait_ready(self) -> Engine:
        """The engine, once loaded; raises what loading raised."""
        if self._loading is not None:
            return await asyncio.shield(self._loading)
        return self.engine

    async def close(self) -> None:
        """Stop accepting, let sessions flush their finals (up to SHUTDOWN_GRACE), then close."""
        if self._ws is None:
            return
        self._ws.close(close_connections=False)
        if self.whisperlive is not None:
            self.whisperlive.close()
        try:
            await asyncio.wait_for(self._drain(), SHUTDOWN_GRACE)
        except asyncio.TimeoutError:
            connections = list(self._ws.connections) + (self.whisperlive.connections() if self.whisperlive else [])
            log.warning("sessions did not finish within %g s of shutdown; closing %d connections",
                        SHUTDOWN_GRACE, len(connections))
            await asyncio.gather(*(c.close(CloseCode.GOING_AWAY, "server shutting down") for c in connections))
            await self._ws.wait_closed()
            if self.whisperlive is not None:
                await self.whisperlive.wait_closed()
        await self.calls.aclose()  # webhook posts still queued get a few seconds
        if self._loading is not None:  # we loaded the engine, so we stop it
            engine = await asyncio.gather(self._loading, return_exceptions=True)
            if isinstance(engine[0], Engine):
                await asyncio.to_thread(engine[0].close)

    async def _drain(self) -> None:
        await asyncio.gather(*(session.shutdown() for session in list(self._sessions)))
        await self._ws.wait_closed()
        if self.whisperlive is not None:
            await self.whisperlive.wait_closed()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- WebSocket ------------------------------------------------------------------------------

    def route(self, path: str) -> SessionFactory | None:
        """The session factory of a WebSocket path: an exact key, or the longest key ending in "/" above it."""
        if path in self.routes:
            return self.routes[path]
        prefixes = [key for key in self.routes if key.endswith("/") and path.startswith(key)]
        return self.routes[max(prefixes, key=len)] if prefixes else None

    async def _handle(self, connection: ServerConnection) -> None:
        await self.run_session(self.route(urlsplit(connection.request.path).path)(connection, self))

    async def run_session(self, session: Session) -> None:
        """Runs a session to its end; shutdown flushes it (the WhisperLive listener's too)."""
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    # --- HTTP -----------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if self.route(path) is not None:
            if self.engine is None:
                why = ("failed to load (see the server log)" if self._load_error is not None
                       else "is still loading; connect again when GET /healthz answers 200")
                return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"the model {why}\n")
            return None  # go on with the WebSocket handshake
        if path == "/healthz":
            return self._health()
        if path == "/metrics":
            return respond(http.HTTPStatus.OK, self.metrics.render(), METRICS_CONTENT_TYPE)
        return self._static(path)

    def _health(self) -> Response:
        if self.engine is not None:
            body = {"status": "ok", "model": self.engine.name, "sessions": self.session_count}
            return respond(http.HTTPStatus.OK, json.dumps(body) + "\n", "application/json")
        if self._load_error is not None:
            body = {"status": "failed", "error": f"loading the model failed: {self._load_error}"}
        else:
            body = {"status": "loading"}
        return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body) + "\n", "application/json")

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
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return Response(status.value, status.phrase, headers, data)


def not_found(path: str) -> Response:
    return respond(http.HTTPStatus.NOT_FOUND, f"{path} not found: WebSocket at /v1/stream, /v1/realtime, /v1/twilio, "
                   "/v1/calls/{callSid}; HTTP at /, /healthz, /metrics\n")


# --- `breeze-stream serve` -------------------------------------------------------------------------

# flag -> SegmenterConfig field; defaults come from SegmenterConfig itself
_SEGMENTER_FLAGS = {
    "--vad-aggressiveness": ("aggressiveness", "webrtcvad mode 0-3 (3 rejects the most non-speech)"),
    "--vad-frame-ms": ("frame_ms", "VAD frame: 10, 20 or 30 ms"),
    "--start-frames": ("start_voiced_frames", "voiced frames among the last --start-window-frames that open a segment"),
    "--start-window-frames": ("start_window_frames", "window of the start trigger, in VAD frames"),
    "--silence-ms": ("hangover_ms", "silence after speech that closes a segment (adds to final latency)"),
    "--pre-roll-ms": ("pre_roll_ms", "audio kept before the first voiced frame"),
    "--end-padding-ms": ("end_padding_ms", "audio kept after the last voiced frame"),
    "--min-speech-ms": ("min_speech_ms", "voiced audio a segment needs to be transcribed"),
    "--max-segment-ms": ("max_segment_ms", "longest segment; longer speech is cut at its quietest point"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `serve` besides --model and --device (streaming.cli adds those)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on, 0.0.0.0 for all (default %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port of WebSocket and HTTP, 0 for any free one (default %(default)s)")
    parser.add_argument("--language", choices=LANGUAGES, default="zh",
                        help="language of sessions whose start message names none (default %(default)s)")
    parser.add_argument("--script", choices=["traditional", "as-is"], default="traditional",
                        help="convert Chinese output to Taiwan Traditional with OpenCC s2twp, or keep the model's script "
                             "(default %(default)s)")
    parser.add_argument("--partial-interval", type=float, default=TranscriberConfig.partial_interval, metavar="SECONDS",
                        help="new audio between partial hypotheses, 0 for none (default %(default)s)")
    parser.add_argument("--partial-window", type=window_argument, default=TranscriberConfig.partial_window, metavar="SECONDS|full",
                        help="encoder window of partials: the segment plus this much silence, or 'full' for 30 s "
                             "(default %(default)s)")
    parser.add_argument("--final-window", type=window_argument, default=TranscriberConfig.final_window, metavar="SECONDS|full",
                        help="encoder window of finals, as --partial-window (default full)")
    parser.add_argument("--speculative", choices=["off", "hypothesis", "medusa", "both"], default="both",
                        help="draft sources for exact speculative decoding; medusa needs heads (default %(default)s)")
    parser.add_argument("--max-frame-bytes", type=int, default=SessionConfig.max_frame_bytes, metavar="BYTES",
                        help="largest WebSocket frame a client may send (default %(default)s)")
    parser.add_argument("--idle-timeout", type=float, default=SessionConfig.idle_timeout, metavar="SECONDS",
                        help="a session without frames this long flushes its finals and ends, 0 for never (default %(default)s)")
    compat = parser.add_argument_group("compatible protocols (OpenAI Realtime at /v1/realtime is always on)")
    compat.add_argument("--whisperlive-port", type=int, default=None, metavar="PORT",
                        help="also listen for WhisperLive clients on this port, any path (default: off)")
    compat.add_argument("--whisperlive-max-clients", type=int, default=WhisperLiveConfig.max_clients, metavar="N",
                        help="WhisperLive sessions at once; more get WAIT (default %(default)s)")
    compat.add_argument("--whisperlive-max-connection-time", type=float, default=WhisperLiveConfig.max_connection_time,
                        metavar="SECONDS", help="WhisperLive session limit, then DISCONNECT (default %(default)s)")
    compat.add_argument("--call-webhook", default=None, metavar="URL",
                        help="POST each final of Twilio calls (/v1/twilio) to this URL as JSON (default: off)")
    compat.add_argument("--call-log", type=Path, default=None, metavar="DIR",
                        help="append the finals of each Twilio call to DIR/{callSid}.jsonl (default: off)")
    vad = parser.add_argument_group("segmenter (webrtcvad)")
    defaults = SegmenterConfig()
    for flag, (name, text) in _SEGMENTER_FLAGS.items():
        vad.add_argument(flag, dest=f"segmenter_{name}", type=int, default=getattr(defaults, name), metavar="N",
                         help=f"{text} (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    segmenter = SegmenterConfig(**{name: getattr(args, f"segmenter_{name}") for name, _ in _SEGMENTER_FLAGS.values()})
    transcriber = TranscriberConfig(partial_interval=args.partial_interval, partial_window=args.partial_window,
                                    final_window=args.final_window, speculative=args.speculative, segmenter=segmenter)
    session = SessionConfig(max_frame_bytes=args.max_frame_bytes, idle_timeout=args.idle_timeout,
                            language=args.language, transcriber=transcriber)
    whisperlive = WhisperLiveConfig(port=args.whisperlive_port, max_clients=args.whisperlive_max_clients,
                                    max_connection_time=args.whisperlive_max_connection_time)
    calls = CallConfig(webhook=args.call_webhook, log_dir=args.call_log)
    return ServerConfig(host=args.host, port=args.port, model=args.model, device=args.device, script=args.script,
                        backend=args.backend, trtllm_engine_dir=args.trtllm_engine_dir, self_test=args.self_test,
                        medusa=args.medusa, session=session, whisperlive=whisperlive, calls=calls)


async def serve_until_stopped(config: ServerConfig) -> int:
    """Serves until SIGINT/SIGTERM; 1 when the port is taken or the model cannot be loaded."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        return 1
    try:
        log.info("listening on ws://%s:%d/v1/stream, /v1/realtime, /v1/twilio, /v1/calls/{callSid} (demo page "
                 "http://%s:%d/); loading model %r", config.host, server.port, config.host, server.port, config.model)
        if server.whisperlive is not None:
            log.info("WhisperLive clients: ws://%s:%d", config.host, server.whisperlive.port)
        ready = asyncio.ensure_future(server.wait_ready())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            stopping.cancel()
            return 1
        await stopping
        ready.cancel()  # still loading: close() waits for the load, then stops the engine
        log.info("shutting down: flushing the finals of %d sessions", server.session_count)
        return 0
    finally:
        await server.close()


def run_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:  # SegmenterConfig and WhisperLiveConfig check their ranges
        log.error("bad option: %s", exc)
        return 2
    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve_until_stopped(config))
    return uvloop.run(serve_until_stopped(config))
