"""Work off the event loop and waits with a deadline, for loading and stopping the server."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def in_daemon_thread(function: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Runs `function` in a daemon thread (an exiting process does not wait for it); a future of its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only with an error

    def target() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def within(awaitable: Awaitable[object], deadline: float) -> None:
    """Awaits until `deadline` (time.monotonic) at most; what is left over is logged, not raised."""
    try:
        await asyncio.wait_for(awaitable, max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        log.warning("shutdown: gave up waiting at the drain timeout")
    except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
        log.warning("shutdown: %s", exc)
