"""Admission by measured capacity: new sessions only while the engine can serve them in real time.

`--max-sessions` bounds connections whatever the engine can do. A 2-core CPU serving whisper-base
keeps up with a handful of real-time streams, a GPU with hundreds; past that, every admitted
session's finals wait longer and longer (issue 27 measured a p95 of 102 s). So the server
estimates how many sessions it can serve from what it measures and refuses new ones above that:
HTTP 503 + Retry-After at the upgrade (the `overloaded` error after it), and `/readyz` 503 so that
a load balancer sends new calls elsewhere. Sessions already admitted are never cut for it.

The estimate (`Admission.capacity`) comes from `LoadMeter`, which every session's transcriber
feeds (every endpoint), over the last `horizon` seconds (sums whose terms fade by e per horizon,
so recent work counts most and a changed load shows within a horizon):

- rtf: engine seconds per second of audio of finals, as the engine reports each request's encoder
  and decoder time (on a GPU, its share of a batch, so batching shows as a lower cost). Finals
  are the work that cannot be dropped; partials are skipped while the engine is behind
  (streaming.audio.transcriber), so they get what `utilization` leaves.
- speech: seconds of audio sent for finals per session-second (segments closed / session time):
  a phone call is partly silence, a replay at twice real time counts twice.
- one session costs rtf x speech engine seconds per second, and finals may use `utilization` of
  the engine's time: capacity = utilization / (rtf x speech) sessions.

That is what the engine sustains on average. Two signals say whether it keeps up right now:
- backlog: seconds of audio of closed segments still waiting for their finals, all sessions;
  times rtf, the engine time a new final would wait behind them;
- queue delay: how long recent finals waited for the engine (wall time minus engine time), while
  a backlog stands.
Past `max_wait` seconds of either (pressure > 1) nobody is admitted, whatever the estimate: the
estimate lags by design, a burst of long segments or a slower engine shows here at once.

With `serve --workers N` each front-end worker measures its own sessions and takes 1/N of the
capacity (the kernel spreads connections evenly over the workers), and counts its backlog N
times; the queue delay is measured on the shared engine.

The floor and the utilization depend on the device the engine runs on (`DEVICE_DEFAULTS`). A
CPU serves finals about one at a time, each taking 0.5-1 s of engine time, and its partials
compete with them for the same cores: a queue of finals there waits in units of that service
time (a queue of one server at load rho waits rho / (2 (1 - rho)) service times on average), so
keeping the admitted sessions' latency within twice the unloaded figure needs rho near a half
(measured in BENCHMARKS.md, issue 27: four streams kept p95 within 1.9x, eight went to 6x).
A GPU decodes its finals together in one batch of rows, each in milliseconds of the
engine's time, so it may run its finals at higher use; but its steps slow down as rows and
encoder calls pile up: on an H100 (BENCHMARKS.md, issue 20, call 3) 0.8 admitted 312 Breeze-shape
streams at p95 2.2x the unloaded figure, where 200 streams gave 1.3x; 0.6 admits three quarters
of that.

Until something is measured (a fresh server, or one idle for many horizons) the capacity is
`floor` sessions, and a server without sessions always admits. Hysteresis keeps `/readyz` from
flapping: once refusing, the server refuses for at least `hold` seconds and admits again only
with a tenth of its capacity free and the pressure below half.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MODES = ("measured", "off")
MIN_AUDIO = 1.0  # seconds of decoded final audio (faded) below which the rtf is not known
MIN_SESSION_TIME = 10.0  # session-seconds (faded) below which the speech rate is taken as 1 (all speech)
READMIT_FREE = 0.1  # share of the capacity that must be free to admit again after refusing
DEVICE_DEFAULTS = {"cpu": (8, 0.5), "cuda": (32, 0.6)}
"""(floor, utilization) where the command line leaves them out, by the engine's device type."""


@dataclass(frozen=True)
class AdmissionConfig:
    mode: str = "measured"
    """measured: refuse new sessions above the measured capacity; off: only --max-sessions limits them
    (the estimate is still reported)."""
    floor: int | None = None
    """Sessions admitted while nothing is measured yet (by each worker of `serve --workers N`);
    None: the device's default (`DEVICE_DEFAULTS`)."""
    utilization: float | None = None
    """Share of the engine's time the finals of admitted sessions may take; None: the device's default."""
    max_wait: float = 2.0
    """Seconds a final may wait for the engine (measured, or the backlog's work) before no one is admitted."""
    hold: float = 5.0
    """Seconds the server refuses at least, once it refuses (also the Retry-After it sends)."""
    horizon: float = 30.0
    """Seconds over which measurements fade (by e)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--admission must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (
            (self.floor is not None and self.floor < 1)
            or (self.utilization is not None and not 0 < self.utilization <= 1)
            or self.max_wait <= 0
            or self.hold < 0
            or self.horizon <= 0
        ):
            raise ValueError(
                "--admission-floor must be >= 1, --admission-utilization in (0, 1], --admission-max-wait > 0"
            )


class Fading:
    """A sum whose terms fade by e every `horizon` seconds; `level` adds that much per second
    (the faded integral of a piecewise-constant quantity, such as the number of open sessions)."""

    def __init__(self, horizon: float, clock: Callable[[], float]) -> None:
        self._horizon, self._clock = horizon, clock
        self._value = self._level = 0.0
        self._at = clock()

    @property
    def value(self) -> float:
        now = self._clock()
        keep = math.exp(-(now - self._at) / self._horizon)
        self._value = self._value * keep + self._level * self._horizon * (1.0 - keep)
        self._at = now
        return self._value

    def add(self, amount: float) -> None:
        self._value = self.value + amount

    def set_level(self, level: float) -> None:
        self._value = self.value
        self._level = level


class LoadMeter:
    """The engine's work on finals, as the sessions' transcribers and the server report it."""

    def __init__(self, horizon: float = AdmissionConfig.horizon, clock: Callable[[], float] = time.monotonic) -> None:
        def fading() -> Fading:
            return Fading(horizon, clock)

        self._final_audio, self._final_engine = fading(), fading()  # decoded finals: audio, engine seconds
        self._asked, self._session_time = fading(), fading()  # audio of closed segments; session-seconds
        self._delay, self._delays = fading(), fading()  # queue delays of finals, and how many
        self.backlog = 0.0
        """Seconds of audio of closed segments waiting for their finals."""
        self.sessions = 0

    def session_opened(self) -> None:
        self.sessions += 1
        self._session_time.set_level(self.sessions)

    def session_closed(self) -> None:
        self.sessions -= 1
        self._session_time.set_level(self.sessions)

    def queued(self, seconds: float) -> None:
        """A segment closed (`seconds` > 0) or its final was resolved (< 0)."""
        self.backlog = max(0.0, self.backlog + seconds)
        if seconds > 0:
            self._asked.add(seconds)

    def final_decoded(self, seconds: float, engine_seconds: float, wall_seconds: float) -> None:
        self._final_audio.add(seconds)
        self._final_engine.add(engine_seconds)
        self._delay.add(max(0.0, wall_seconds - engine_seconds))
        self._delays.add(1.0)

    @property
    def rtf(self) -> float | None:
        """Engine seconds per second of final audio, None before a measurement."""
        audio = self._final_audio.value
        return self._final_engine.value / audio if audio >= MIN_AUDIO else None

    @property
    def speech(self) -> float | None:
        """Seconds of audio sent for finals per session-second, None before a measurement."""
        time_ = self._session_time.value
        return self._asked.value / time_ if time_ >= MIN_SESSION_TIME else None

    @property
    def queue_delay(self) -> float:
        """Mean wait of recent finals for the engine; 0 when no audio waits for a final."""
        count = self._delays.value
        return self._delay.value / count if self.backlog > 0 and count > 1e-3 else 0.0


class Admission:
    """Whether the server takes one more session, by the measured capacity (module docstring)."""

    def __init__(
        self, config: AdmissionConfig, meter: LoadMeter, clock: Callable[[], float] = time.monotonic, workers: int = 1
    ) -> None:
        self.config = config
        self.meter = meter
        self.workers = workers  # front ends sharing the engine (serve --workers N); this one's share is 1/N
        self._clock = clock
        self.admitting = True
        self._since = clock()
        self.device = "cpu"
        """Type of the engine's device ("cpu", "cuda"): it picks the defaults of floor and utilization."""

    @property
    def floor(self) -> int:
        default = DEVICE_DEFAULTS.get(self.device, DEVICE_DEFAULTS["cpu"])[0]
        return default if self.config.floor is None else self.config.floor

    @property
    def utilization(self) -> float:
        default = DEVICE_DEFAULTS.get(self.device, DEVICE_DEFAULTS["cpu"])[1]
        return default if self.config.utilization is None else self.config.utilization

    @property
    def capacity(self) -> float:
        """Sessions this server can serve in real time (`floor` before a measurement; inf without speech)."""
        rtf = self.meter.rtf
        if rtf is None:
            return float(self.floor)  # per front end: connections do not spread evenly enough for a share
        speech = self.meter.speech
        cost = rtf * (1.0 if speech is None else speech)
        return max(1.0, self.utilization / cost / self.workers) if cost > 0 else math.inf

    @property
    def pressure(self) -> float:
        """The engine's wait for a final now, as a share of `max_wait` (over 1: admit no one)."""
        backlog_work = self.meter.backlog * self.workers * (self.meter.rtf or 0.0)
        return max(backlog_work, self.meter.queue_delay) / self.config.max_wait

    def update(self, sessions: int) -> None:
        """Moves between admitting and refusing, with hysteresis, for `sessions` open now."""
        capacity, pressure, now = self.capacity, self.pressure, self._clock()
        if self.admitting and sessions and (sessions + 1 > capacity or pressure > 1):
            self.admitting, self._since = False, now
            log.warning(
                "%s new sessions: %d open, capacity %.1f, pressure %.2f (rtf %s, backlog %.1f s, queue delay %.2f s)",
                "refusing" if self.config.mode != "off" else "over capacity (admission off: still admitting)",
                sessions,
                capacity,
                pressure,
                _round(self.meter.rtf),
                self.meter.backlog,
                self.meter.queue_delay,
            )
        elif not self.admitting and (
            not sessions
            or (
                now - self._since >= self.config.hold
                and pressure < 0.5
                and sessions + 1 + READMIT_FREE * capacity <= capacity
            )
        ):
            self.admitting, self._since = True, now
            log.info(
                "%s: %d open, capacity %.1f",
                "admitting new sessions again" if self.config.mode != "off" else "back within capacity",
                sessions,
                capacity,
            )

    def admits(self, sessions: int) -> bool:
        """Whether one more session may join `sessions` open ones (always, with mode off)."""
        self.update(sessions)
        if self.config.mode == "off":
            return True
        return self.admitting and (not sessions or sessions + 1 <= self.capacity)

    @property
    def ready(self) -> bool:
        """What `/readyz` says (after an `update`)."""
        return self.admitting or self.config.mode == "off"

    def free(self, sessions: int) -> float:
        """More sessions it would admit now (inf: nothing limits them yet)."""
        if not self.ready:
            return 0.0
        return max(0.0, math.floor(self.capacity) - sessions) if math.isfinite(self.capacity) else math.inf

    def report(self, sessions: int) -> dict[str, Any]:
        """The estimate and its inputs, for `/healthz` and the metrics."""
        self.update(sessions)
        capacity, free = self.capacity, self.free(sessions)
        return {
            "mode": self.config.mode,
            "admitting": self.ready,
            "sessions": sessions,
            "capacity": round(capacity, 1) if math.isfinite(capacity) else None,
            "free": int(free) if math.isfinite(free) else None,
            "rtf": _round(self.meter.rtf),
            "speech": _round(self.meter.speech),
            "backlog_s": round(self.meter.backlog, 2),
            "queue_delay_s": round(self.meter.queue_delay, 3),
            "pressure": round(self.pressure, 3),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
