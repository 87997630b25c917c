"""A call's transcript as JSON POSTs to a webhook (`serve --call-webhook URL`), from a queue that never
blocks audio: in order, retried with exponential backoff on network errors, 408, 429 and 5xx."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

log = logging.getLogger(__name__)


class WebhookSender:
    """POSTs JSON payloads to one URL in order, from a queue; retries with exponential backoff."""

    def __init__(
        self, url: str, retries: int = 5, backoff: float = 0.5, timeout: float = 10.0, limit: int = 10000
    ) -> None:
        self.url = url
        self.retries = retries
        self.backoff = backoff
        """Seconds before the first retry; doubles with each retry (at most 30 s)."""
        self.timeout = timeout
        self.limit = limit
        """Posts waiting at most; past that the oldest is dropped (and logged)."""
        self._queue: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    def post(self, payload: dict[str, Any]) -> None:
        """Queues a payload; never waits."""
        if len(self._queue) >= self.limit:
            dropped = self._queue.popleft()
            self.failed += 1
            log.error(
                "call webhook %s: %d posts waiting; dropped the oldest (%s of call %s)",
                self.url,
                len(self._queue) + 1,
                dropped.get("type"),
                dropped.get("call_sid"),
            )
        self._queue.append(payload)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def aclose(self, timeout: float) -> None:
        """Waits up to `timeout` for the queue to drain, then stops."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._queue:
            log.error("call webhook %s: %d posts not delivered at shutdown", self.url, len(self._queue))
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._deliver(self._queue[0])
                if self._queue:
                    self._queue.popleft()

    async def _deliver(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        for attempt in range(self.retries + 1):
            try:
                status = await asyncio.to_thread(self._post, data)
                why = f"HTTP {status}"
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections are OSErrors
                status, why = None, str(getattr(exc, "reason", exc))
            if status is not None and 200 <= status < 300:
                self.delivered += 1
                return
            if status is not None and status not in (408, 429) and status < 500:
                break  # the receiver refuses it: retrying won't help
            if attempt < self.retries:
                delay = min(self.backoff * 2**attempt, 30.0)
                log.warning(
                    "call webhook %s: %s for %s of call %s; retry %d/%d in %.1f s",
                    self.url,
                    why,
                    payload.get("type"),
                    payload.get("call_sid"),
                    attempt + 1,
                    self.retries,
                    delay,
                )
                await asyncio.sleep(delay)
        self.failed += 1
        log.error(
            "call webhook %s: gave up on %s of call %s (%s)",
            self.url,
            payload.get("type"),
            payload.get("call_sid"),
            why,
        )

    def _post(self, data: bytes) -> int:
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "breeze-stream"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
