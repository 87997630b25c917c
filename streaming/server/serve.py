"""`breeze-stream serve` (its options: streaming.options): a `ServerConfig` from the command line, and
the process that serves until SIGINT/SIGTERM, drains, and exits (or starts `--workers N`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from engines.backend import Backend, create_engine
from engines.config import EngineConfig

from ..audio.hypothesis_text import check_prompt
from ..audio.segmenter import SegmenterConfig
from ..audio.transcriber import TranscriberConfig
from ..options import SEGMENTER_FLAGS
from ..protocols.base import SessionConfig
from ..protocols.calls import CallConfig
from ..protocols.routes import WEBSOCKET_PATHS
from ..protocols.whisperlive import WhisperLiveConfig
from .admission import AdmissionConfig
from .app import Server, ServerConfig
from .auth import parse_origins, read_keys, tls_context
from .gate import AuthConfig, Limits
from .workers import RemoteEngine, run_workers

log = logging.getLogger(__name__)


def session_config(args: argparse.Namespace) -> SessionConfig:
    """The session and transcriber settings of `serve`'s options; ValueError names a bad one."""
    segmenter = SegmenterConfig(**{name: getattr(args, f"segmenter_{name}") for name, _ in SEGMENTER_FLAGS.values()})
    transcriber = TranscriberConfig(
        partial_interval=args.partial_interval,
        partial_window=args.partial_window,
        final_window=args.final_window,
        early_finals=args.early_finals,
        speculative=args.speculative,
        max_queued_audio=args.max_queued_audio,
        segmenter=segmenter,
        condition_on_previous=args.condition_on_previous,
    )
    if args.max_send_queue < 1 or args.max_frame_bytes < 1 or args.max_queued_audio < 0 or args.idle_timeout < 0:
        raise ValueError(
            "--max-send-queue and --max-frame-bytes must be >= 1, --max-queued-audio and --idle-timeout >= 0"
        )
    return SessionConfig(
        max_frame_bytes=args.max_frame_bytes,
        idle_timeout=args.idle_timeout,
        language=args.language,
        max_send_queue=args.max_send_queue,
        transcriber=transcriber,
        prompt=check_prompt(args.prompt, "--prompt"),
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server `serve`'s options ask for; ValueError names a bad option or an unusable key or TLS file."""
    session = session_config(args)
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    if (args.max_batch is not None and args.max_batch < 1) or (
        args.window_bucket is not None and args.window_bucket <= 0
    ):
        raise ValueError("--max-batch must be >= 1 and --window-bucket > 0")
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
            padding_stride=args.padding_stride,
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
            "listening on %s://%s:%d%s (demo page %s://%s:%d/); loading model %r",
            ws,
            config.host,
            server.port,
            WEBSOCKET_PATHS,
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
        return run_workers(config, config.workers, start_engine, run_server)
    return run_server(config)


def run_server(config: ServerConfig) -> int:
    """Serves in this process (uvloop where installed) until SIGINT/SIGTERM."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve_until_stopped(config))
    return uvloop.run(serve_until_stopped(config))


def start_engine(config: ServerConfig) -> Backend:
    """The engine of `config` in this process: the engine process of `serve --workers N`."""
    return create_engine(config.engine)
