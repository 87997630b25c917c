"""`serve --workers N`: N front-end processes in front of one engine process that owns the model.

One Python process serving hundreds of real-time streams spends most of its interpreter on
socket frames, VAD, resampling and JSON events, and the engine thread's per-step host work waits
for the same interpreter lock. With `--workers N` the parent process loads the model and runs
only the engine; N worker processes each run the whole server (every protocol, limits, drain) on
the same port (SO_REUSEPORT: the kernel spreads new connections over them) with a `RemoteEngine`
in place of the engine. The default (`--workers 0`) stays one process, which is best on a CPU,
where the engine's compute and not the interpreter is the limit.

Transport: `multiprocessing.connection` over a Unix socket in a private directory, with an
authentication key (the standard library's framed pickles; no protocol of ours beyond the tuples
below). Each worker holds one connection; a request is ("submit", id, audio, options, keywords),
answered by ("result", id, transcript) or ("error", id, exception); ("cancel", id) withdraws one
whose client left. Every `STATE_INTERVAL` the engine process sends ("state", {...}): the engine's
health and load figures, which the workers report in /healthz, /readyz and /metrics without a
round trip. Partials of one stream supersede each other in the engine as in one process: the
stream key becomes (worker, stream id).

Metrics: prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set here before the
workers start): each worker's counters live in files that any worker's /metrics sums up, so a
scrape that lands on any worker sees the whole server. Limits are per worker: `--max-sessions`
is divided among the workers (rounded up); the per-client limit counts per worker.

Shutdown: SIGTERM/SIGINT to the parent goes to every worker (a second one too: it closes what is
left); workers drain their sessions (finals, `end`, close 1001) while the engine still runs, and
the engine stops after the last worker has exited. A worker that dies is started again; if the
engine process dies, the workers see their connection end, report the engine down and exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any

import numpy as np

from engines.whisper.decoding import DecodingOptions

log = logging.getLogger(__name__)

STATE_INTERVAL = 0.5  # seconds between the engine process's state messages
STATE_STALE = 5.0  # a worker that heard nothing for this long reports the engine down
WORKER_RESTART_PAUSE = 1.0  # seconds before a dead worker is started again
QUICK_DEATH = 10.0  # a worker that exits this soon after its start counts towards giving up


@dataclass(frozen=True)
class EngineAddress:
    """Where a worker finds the engine process: a Unix socket path and its authentication key."""

    path: str
    authkey: bytes

    def __repr__(self) -> str:  # configs are logged; the key is not
        return f"EngineAddress({self.path!r})"


class RemoteEngine:
    """The engine of another process, with the surface the server uses: `submit` (a Future of a
    Transcript, or None when a newer partial of the stream superseded it), `transcribe_async`,
    `health`, `load_stats`, `name`, `device`, `close`."""

    def __init__(self, connection: Connection, hello: dict[str, Any]) -> None:
        self.name: str = hello["name"]
        self.device: str = hello["device"]
        self._connection = connection
        self._ids = itertools.count()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state: dict[str, Any] = hello.get("state", {})
        self._heard = time.monotonic()
        self._lost: str | None = None
        self._closing = False
        self.on_lost: list[Any] = []  # callables run (in the receiving thread) when the engine process is gone
        threading.Thread(target=self._send_loop, name="breeze-remote-send", daemon=True).start()
        threading.Thread(target=self._receive_loop, name="breeze-remote-receive", daemon=True).start()

    @classmethod
    def connect(cls, address: EngineAddress) -> RemoteEngine:
        """Connects and waits until the engine process has loaded its model (raises what loading raised)."""
        connection = Client(address.path, family="AF_UNIX", authkey=address.authkey)
        kind, payload = connection.recv()
        if kind != "ready":
            connection.close()
            raise RuntimeError(f"the engine process failed to load the model: {payload}")
        return cls(connection, payload)

    def submit(self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **keywords: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if keywords.get("stream") is not None:
            keywords["stream"] = id(keywords["stream"])  # the engine keys partials by stream; objects stay here
        with self._lock:
            if self._lost is not None:
                raise RuntimeError(self._lost)
            request = next(self._ids)
            self._pending[request] = future
        future.add_done_callback(lambda f: self._withdraw(request, f))
        self._outbox.put(("submit", request, np.asarray(audio, dtype=np.float32), options, keywords))
        return future

    def _withdraw(self, request: int, future: Future[Any]) -> None:
        """A request its caller cancelled (the client left) is withdrawn from the engine too."""
        if future.cancelled():
            with self._lock:
                self._pending.pop(request, None)  # no answer comes for a withdrawn request
            self._outbox.put(("cancel", request))

    async def transcribe_async(
        self, audio: np.ndarray, options: DecodingOptions = DecodingOptions(), **keywords: Any
    ) -> Any:
        return await asyncio.wrap_future(self.submit(audio, options, **keywords))

    def health(self) -> dict[str, Any]:
        """The engine's health as last reported; not alive once the engine process is gone or silent."""
        health = dict(self._state.get("health", {}))
        silent = time.monotonic() - self._heard
        if self._lost is not None or silent > STATE_STALE:
            health.update(alive=False, last_error=self._lost or f"no word from the engine process for {silent:.0f} s")
        return health

    def load_stats(self) -> dict[str, float]:
        return self._state.get("stats") or {}

    def close(self, timeout: float = 0.0) -> None:
        self._closing = True
        self._outbox.put(None)

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._connection.send(message)
            except (OSError, ValueError) as exc:
                self._lose(f"the engine process is gone ({exc})")
                return
        self._connection.close()

    def _receive_loop(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except Exception as exc:  # noqa: BLE001 - EOF, a reset, or our own close() under the read
                self._lose(
                    "this worker closed its engine connection"
                    if self._closing
                    else f"the engine process is gone ({type(exc).__name__})"
                )
                return
            self._heard = time.monotonic()
            kind = message[0]
            if kind == "state":
                self._state = message[1]
                continue
            with self._lock:
                future = self._pending.pop(message[1], None)
            if future is not None:
                _settle(future, message[2], kind == "error")

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost is not None:
                return
            self._lost = why
            pending, self._pending = self._pending, {}
        if not self._closing:
            log.error("%s; failing %d requests", why, len(pending))
        for future in pending.values():
            _settle(future, RuntimeError(why), True)
        if not self._closing:
            for callback in self.on_lost:
                callback()


def _settle(future: Future[Any], value: Any, error: bool) -> None:
    try:
        future.set_exception(value) if error else future.set_result(value)
    except InvalidStateError:  # cancelled meanwhile: its client left
        pass


class EngineService:
    """The engine process's side: accepts worker connections and runs their requests on `engine`
    (set once loaded; connections wait for it)."""

    def __init__(self, address: EngineAddress) -> None:
        self.address = address
        self.engine: Any = None
        self.failure: str | None = None
        self._loaded = threading.Event()
        self._outboxes: dict[int, queue.SimpleQueue[Any]] = {}
        self._lock = threading.Lock()
        self._listener = Listener(address.path, family="AF_UNIX", authkey=address.authkey)
        threading.Thread(target=self._accept_loop, name="breeze-service-accept", daemon=True).start()
        threading.Thread(target=self._state_loop, name="breeze-service-state", daemon=True).start()

    def loaded(self, engine: Any) -> None:
        self.engine = engine
        self._loaded.set()

    def failed(self, why: str) -> None:
        self.failure = why
        self._loaded.set()

    def _state(self) -> dict[str, Any]:
        return {"health": self.engine.health(), "stats": self.engine.load_stats()}

    def _accept_loop(self) -> None:
        for worker in itertools.count():
            try:
                connection = self._listener.accept()
            except OSError:  # closed
                return
            except Exception as exc:  # noqa: BLE001 - a bad handshake (wrong key) costs that connection only
                log.warning("refused a connection to the engine socket: %s", exc)
                continue
            threading.Thread(
                target=self._serve, args=(worker, connection), name=f"breeze-service-{worker}", daemon=True
            ).start()

    def _serve(self, worker: int, connection: Connection) -> None:
        self._loaded.wait()
        if self.failure is not None:
            connection.send(("failed", self.failure))
            connection.close()
            return
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        connection.send(
            ("ready", {"name": self.engine.name, "device": str(self.engine.device), "state": self._state()})
        )
        sender = threading.Thread(
            target=_drain_outbox, args=(connection, outbox), name=f"breeze-service-send-{worker}", daemon=True
        )
        sender.start()
        with self._lock:
            self._outboxes[worker] = outbox
        futures: dict[int, Future[Any]] = {}
        try:
            while True:
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    return
                if message[0] == "cancel":
                    future = futures.pop(message[1], None)
                    if future is not None:
                        future.cancel()
                    continue
                _, request, audio, options, keywords = message
                if keywords.get("stream") is not None:
                    keywords["stream"] = (worker, keywords["stream"])
                try:
                    future = self.engine.submit(audio, options, **keywords)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    outbox.put(("error", request, exc))
                    continue
                futures[request] = future
                future.add_done_callback(lambda f, r=request: _answer(outbox, futures, r, f))
        finally:
            with self._lock:
                self._outboxes.pop(worker, None)
            for future in list(futures.values()):
                future.cancel()
            outbox.put(None)

    def _state_loop(self) -> None:
        self._loaded.wait()
        while self.failure is None:
            state = ("state", self._state())
            with self._lock:
                outboxes = list(self._outboxes.values())
            for outbox in outboxes:
                outbox.put(state)
            time.sleep(STATE_INTERVAL)

    def close(self) -> None:
        self._listener.close()


def _answer(outbox: queue.SimpleQueue[Any], futures: dict[int, Future[Any]], request: int, future: Future[Any]) -> None:
    futures.pop(request, None)
    if future.cancelled():
        return
    error = future.exception()
    outbox.put(("error", request, error) if error is not None else ("result", request, future.result()))


def _drain_outbox(connection: Connection, outbox: queue.SimpleQueue[Any]) -> None:
    while (message := outbox.get()) is not None:
        try:
            connection.send(message)
        except (OSError, ValueError):  # the worker is gone
            return
        except Exception as exc:  # noqa: BLE001 - something that does not pickle: its request fails alone
            what = message[2] if message[0] == "error" else exc
            connection.send(("error", message[1], RuntimeError(f"{type(what).__name__}: {what}")))
    connection.close()


# --- the parent process -------------------------------------------------------------------------


def worker_config(config: Any, address: EngineAddress, workers: int) -> Any:
    """A worker's ServerConfig: the remote engine, the shared port, its share of the session limit."""
    limits = config.limits
    if limits.max_sessions:
        limits = replace(limits, max_sessions=math.ceil(limits.max_sessions / workers))
    return replace(config, engine_address=address, reuse_port=True, limits=limits)


def _worker_main(config: Any, index: int, serve: Callable[[Any], int]) -> None:
    """A front-end worker: the whole server with a RemoteEngine; exits when it drained or the engine is gone."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    raise SystemExit(serve(config))


def run_workers(config: Any, workers: int, load_engine: Callable[[Any], Any], serve: Callable[[Any], int]) -> int:
    """Serves with `workers` front-end processes, each running `serve(config)` (a module-level function:
    it travels to the spawned process by name), and this process as the engine, `load_engine(config)`;
    returns the exit status."""
    if config.port == 0:
        log.error("--workers needs a fixed --port (the workers share it)")
        return 2
    private = tempfile.mkdtemp(prefix="breeze-")  # mode 0700: only this user reaches the socket
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir = os.path.join(private, "metrics")
    os.mkdir(metrics_dir)
    address = EngineAddress(os.path.join(private, "engine.sock"), secrets.token_bytes(32))
    service = EngineService(address)
    context = multiprocessing.get_context("spawn")
    child_config = worker_config(config, address, workers)
    stopping = threading.Event()
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        stopping.set()
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)  # a second signal closes what is left, in the workers too

    processes: list[Any] = []
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        processes.append(
            context.Process(target=_worker_main, args=(child_config, index, serve), name=f"breeze-worker-{index}")
        )
        processes[-1].start()
    log.info(
        "%d front-end workers on port %d; loading model %r in the engine process",
        workers,
        config.port,
        config.engine.model,
    )
    try:
        started = time.perf_counter()
        try:
            engine = load_engine(config)
        except Exception as exc:
            log.error("loading the model %r failed: %s", config.engine.model, exc)
            service.failed(str(exc))
            stopping.set()
            _wait_for(processes, config.limits.drain_timeout)
            return 1
        service.loaded(engine)
        log.info("model %s loaded on %s in %.1f s", engine.name, engine.device, time.perf_counter() - started)
        status = _supervise(processes, context, child_config, serve, stopping, config.limits.drain_timeout)
        engine.close()
        return status
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        service.close()
        shutil.rmtree(private, ignore_errors=True)


def _supervise(
    processes: list[Any],
    context: Any,
    config: Any,
    serve: Callable[[Any], int],
    stopping: threading.Event,
    drain_timeout: float,
) -> int:
    """Restarts workers that die until a signal, then waits for them to drain. Gives up (1) when
    workers keep dying within seconds of their start (a port in use, a bad option)."""
    started = {index: time.monotonic() for index in range(len(processes))}
    quick_deaths = 0
    while not stopping.is_set():
        wait([p.sentinel for p in processes], timeout=0.5)
        if stopping.is_set():
            break
        for index, process in enumerate(processes):
            if process.exitcode is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]  # unannotated upstream
                quick_deaths += time.monotonic() - started[index] < QUICK_DEATH
                if quick_deaths >= 2 * len(processes):
                    log.error("workers keep exiting at start (the last with %s); giving up", process.exitcode)
                    stopping.set()
                    _wait_for(processes, drain_timeout)
                    return 1
                log.error("worker %d exited with %s; starting it again", index, process.exitcode)
                time.sleep(WORKER_RESTART_PAUSE)
                processes[index] = context.Process(target=_worker_main, args=(config, index, serve), name=process.name)
                processes[index].start()
                started[index] = time.monotonic()
    log.info("shutting down: the workers flush their sessions' finals (at most %g s)", drain_timeout)
    return 0 if _wait_for(processes, drain_timeout + 5.0) else 1


def _wait_for(processes: list[Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    return all(p.exitcode is not None for p in processes)
