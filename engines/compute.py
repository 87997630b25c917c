"""One thread for the torch work of every CPU engine in the process.

PyTorch's CPU kernels run on OpenMP, which keeps a team of threads for every thread that ran
parallel work; once libgomp manages more threads than there are CPUs, its idle workers stop
spinning between parallel regions and sleep (its "throttled" spin count, 100 iterations, not
settable). A decoder step is a hundred short parallel regions: with a second team beside the
engine worker's (the thread that loaded the model, or a second engine) a step on the 2-core box
took 12 ms instead of 6.5 ms, and the dev set's offline pass 13 s instead of 8.5 s
(BENCHMARKS.md, issue 25). So on the CPU every engine loads its model and runs its encoder calls
and decoder steps here, on one long-lived thread, and no other thread of the engine runs torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_thread: threading.Thread | None = None
_jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()


def _serve(threads: int) -> None:
    torch.set_num_threads(threads)  # per thread under OpenMP: the creator's count
    while True:
        work, done = _jobs.get()
        try:
            done.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done.set_exception(exc)


def run(work: Callable[[], T]) -> T:
    """`work()` on the compute thread (inline when called from it), its result or its exception."""
    global _thread
    if threading.current_thread() is _thread:
        return work()
    with _lock:
        if _thread is None:
            _thread = threading.Thread(
                target=_serve, args=(torch.get_num_threads(),), name="breeze-compute", daemon=True
            )
            _thread.start()
    done: Future[object] = Future()
    _jobs.put((work, done))
    return done.result()  # type: ignore[return-value]


TRIM_INTERVAL = 1.0
"""Seconds between the heap trims after encoder calls (engines/worker.py): glibc keeps the blocks
that activations and outgrown pools free, ~80 MiB of the server's peak under ten streams; a trim
costs ~6 ms on the 2-core box (BENCHMARKS.md, issue 25)."""

_last_trim = float("-inf")


def release_free_memory(every: float = 0.0) -> bool:
    """Hands the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere): the
    float32 weights that loading frees stay resident in the loading thread's heap otherwise (the
    server's resident set after loading: 635 against 512 MiB). Not again within `every` seconds of
    the last time; whether it trimmed now."""
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < every:
        return False
    _last_trim = now
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")  # may run ldconfig: looked up once
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
